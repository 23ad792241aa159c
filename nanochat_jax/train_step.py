"""The sharded training step: gradient accumulation over micro-batches, one optimizer update.

Everything is created sharded (params and optimizer state never exist whole on one
device), and the step is one jit with explicit in/out shardings and the state donated.
Micro-batches are a leading axis of the batch, scanned inside the jit, so accumulation
costs no extra dispatch or compile.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanochat_jax import model, sharding
from nanochat_jax.common import resolve_dtype
from nanochat_jax.config import GPTConfig


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState


def abstract_train_state(config: GPTConfig, tx: optax.GradientTransformation, mesh: Mesh, dtype=None) -> TrainState:
    """A fresh state's shapes and dtypes with `mesh`'s shardings (the restore target): one trace of the init."""
    params = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0), dtype))
    opt_state = jax.eval_shape(tx.init, params)
    p_sh = sharding.param_shardings(model.param_axes(config), mesh)
    shardings = TrainState(p_sh, sharding.state_shardings(opt_state, p_sh, mesh))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        TrainState(params, opt_state), shardings)


def train_state_shardings(config: GPTConfig, tx: optax.GradientTransformation, mesh: Mesh, dtype=None) -> TrainState:
    return jax.tree.map(lambda x: x.sharding, abstract_train_state(config, tx, mesh, dtype))


def init_train_state(config: GPTConfig, tx: optax.GradientTransformation, mesh: Mesh, key, dtype=None,
                     params=None) -> TrainState:
    """Fresh (or given) params and optimizer state, laid out on the mesh from the start."""
    shardings = train_state_shardings(config, tx, mesh, dtype)
    if params is None:
        params = jax.jit(lambda k: model.init_params(config, k, dtype), out_shardings=shardings.params)(key)
    else:
        params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return TrainState(params, opt_state)


def make_train_step(config: GPTConfig, tx: optax.GradientTransformation, mesh: Mesh, *, dtype=None,
                    backend=None, weighted: bool = False, lr_scaled: bool = False):
    """train_step(state, inputs_ABT, targets_ABT[, weights_ABT][, lrm]) -> (state, {"loss"}), A = micro-steps.

    Default: the loss is the mean over micro-steps of each micro-batch's mean loss, like
    nanochat's loss/grad_accum; gradients accumulate in fp32.
    weighted: the loss is instead Σ over every micro-step and token of CE·weight (RL's
    advantage-weighted objective; the weights carry the whole normalization).
    lr_scaled: the update is multiplied by the scalar `lrm` (a host-side LR multiplier, e.g.
    SFT's progress-based schedule). Exact, since every nanochat update, decoupled weight
    decay included, is proportional to its LR.
    """
    dtype = resolve_dtype(dtype)
    state_sh = train_state_shardings(config, tx, mesh, dtype)
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    replicated = NamedSharding(mesh, P())

    def micro_loss(params, inputs_BT, targets_BT, weights_BT):
        if not weighted:
            return model.loss_fn(params, inputs_BT, targets_BT, config, dtype=dtype, backend=backend)
        nll = model.loss_fn(params, inputs_BT, targets_BT, config, reduction="none", dtype=dtype, backend=backend)
        return jnp.sum(nll * weights_BT.reshape(-1).astype(jnp.float32))

    def step(state: TrainState, inputs_ABT, targets_ABT, weights_ABT, lrm):
        grad_fn = jax.value_and_grad(micro_loss)

        def micro(carry, xyw):
            grads_acc, loss_acc = carry
            loss, grads = grad_fn(state.params, *xyw)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return (grads_acc, loss_acc + loss), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        zeros = jax.lax.with_sharding_constraint(zeros, state_sh.params)
        xs = (inputs_ABT, targets_ABT, weights_ABT if weighted else jnp.zeros(inputs_ABT.shape[0]))
        (grads, loss), _ = jax.lax.scan(micro, (zeros, jnp.zeros([], jnp.float32)), xs)
        n = 1 if weighted else inputs_ABT.shape[0]
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if lr_scaled:
            updates = jax.tree.map(lambda u: (u * lrm).astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state), {"loss": loss / n}

    in_sh = (state_sh, batch_sh, batch_sh) + ((batch_sh,) if weighted else ()) + ((replicated,) if lr_scaled else ())

    def flat(state, inputs_ABT, targets_ABT, *rest):
        rest = list(rest)
        weights = rest.pop(0) if weighted else None
        lrm = rest.pop(0) if lr_scaled else None
        return step(state, inputs_ABT, targets_ABT, weights, lrm)

    jitted = jax.jit(flat, in_shardings=in_sh, out_shardings=(state_sh, replicated), donate_argnums=0)

    def train_step(state: TrainState, inputs_ABT, targets_ABT, *rest):
        if len(rest) != weighted + lr_scaled:
            raise TypeError(f"train_step takes {'weights, ' if weighted else ''}{'lrm' if lr_scaled else ''} "
                            f"after the targets; got {len(rest)} extra argument(s)")
        if lr_scaled:
            rest = (*rest[:-1], jnp.asarray(rest[-1], jnp.float32))
        with jax.set_mesh(mesh):  # model code reads the mesh for activation constraints / shard_map
            return jitted(state, inputs_ABT, targets_ABT, *rest)

    train_step.jitted = jitted
    train_step.shardings = state_sh
    return train_step
