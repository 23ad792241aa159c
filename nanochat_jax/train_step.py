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


def jit_train_step(config: GPTConfig, tx: optax.GradientTransformation, mesh: Mesh, *, dtype=None, backend=None):
    """The jitted step(state, inputs_ABT, targets_ABT, weights_ABT, lrm) -> (state, {"loss"}), A = micro-steps,
    to call under the mesh (make_train_step does; bench/sharding.py lowers it).

    weights_ABT None: the loss is the mean over micro-steps of each micro-batch's mean loss, like
    nanochat's loss/grad_accum; else Σ over every micro-step and token of CE·weight (RL's
    advantage-weighted objective; the weights carry the whole normalization). lrm None: the update
    as it is; else times lrm, a host-side LR multiplier (SFT's schedule), exact since every nanochat
    update, decoupled weight decay included, is proportional to its LR. Gradients accumulate in fp32.
    """
    dtype = resolve_dtype(dtype)
    state_sh = train_state_shardings(config, tx, mesh, dtype)
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    replicated = NamedSharding(mesh, P())

    def step(state: TrainState, inputs_ABT, targets_ABT, weights_ABT, lrm):
        weighted = weights_ABT is not None

        def micro_loss(params, inputs_BT, targets_BT, weights_BT):
            if not weighted:
                return model.loss_fn(params, inputs_BT, targets_BT, config, dtype=dtype, backend=backend)
            nll = model.loss_fn(params, inputs_BT, targets_BT, config, reduction="none", dtype=dtype, backend=backend)
            return jnp.sum(nll * weights_BT.reshape(-1).astype(jnp.float32))
        grad_fn = jax.value_and_grad(micro_loss)

        def micro(carry, xyw):
            grads_acc, loss_acc = carry
            loss, grads = grad_fn(state.params, *xyw)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return (grads_acc, loss_acc + loss), None

        xs = (inputs_ABT, targets_ABT, weights_ABT if weighted else jnp.zeros(inputs_ABT.shape[0]))
        if inputs_ABT.shape[0] == 1:  # no accumulator to zero and add into: one pass over the grads fewer
            loss, grads = grad_fn(state.params, *(a[0] for a in xs))
            grads = jax.lax.with_sharding_constraint(jax.tree.map(lambda g: g.astype(jnp.float32), grads),
                                                     state_sh.params)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zeros = jax.lax.with_sharding_constraint(zeros, state_sh.params)
            (grads, loss), _ = jax.lax.scan(micro, (zeros, jnp.zeros([], jnp.float32)), xs)
        n = 1 if weighted else inputs_ABT.shape[0]
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if lrm is not None:
            updates = jax.tree.map(lambda u: (u * lrm).astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state), {"loss": loss / n}

    return jax.jit(step, in_shardings=(state_sh, batch_sh, batch_sh, batch_sh, replicated),
                   out_shardings=(state_sh, replicated), donate_argnums=0)


def make_train_step(config: GPTConfig, tx: optax.GradientTransformation, mesh: Mesh, *, dtype=None, backend=None):
    """train_step(state, inputs_ABT, targets_ABT, weights_ABT=None, lrm=None) -> (state, {"loss"}): one optimizer
    step over A micro-batches, `state` donated; weights_ABT and lrm as in jit_train_step."""
    jitted = jit_train_step(config, tx, mesh, dtype=dtype, backend=backend)

    def train_step(state: TrainState, inputs_ABT, targets_ABT, weights_ABT=None, lrm=None):
        lrm = None if lrm is None else jnp.asarray(lrm, jnp.float32)
        with jax.set_mesh(mesh):  # model code reads the mesh for activation constraints / shard_map
            return jitted(state, inputs_ABT, targets_ABT, weights_ABT, lrm)

    return train_step
