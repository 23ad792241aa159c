"""Preference losses (DPO, IPO) and their sharded training step.

For a prompt x with a preferred reply y_c and a dispreferred one y_r, let

    h = [log π(y_c|x) − log π_ref(y_c|x)] − [log π(y_r|x) − log π_ref(y_r|x)]

with sequence log-probs summed over the reply's tokens only (the chat template's mask).

- dpo (Rafailov et al. 2023): loss = −log σ(β·h); with label smoothing ε (the pair's label is
  wrong with probability ε, "conservative DPO"): −(1 − ε)·log σ(β·h) − ε·log σ(−β·h).
- ipo (Azar et al. 2023): loss = (h − 1/(2β))², the squared distance of h from a fixed target,
  which does not keep pushing h once the target is reached.

The implicit reward of a reply is β·(log π − log π_ref); the step reports the pairs' reward
accuracy (chosen reward above the rejected one; a tie counts half, so the untrained policy,
where every reward is 0, scores exactly 50 %), the mean reward margin β·h and the mean chosen
and rejected log-probs.

Batches are (A, 2P, T): A micro-steps of P pairs, row 2k the chosen and 2k+1 the rejected reply
of pair k (data/preference.py). The reference's log-probs, one per row (A, 2P), come either from
frozen reference params inside the step (first epoch) or as an input (the loader's cache, later
epochs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanochat_jax import model, sharding
from nanochat_jax.common import resolve_dtype
from nanochat_jax.config import GPTConfig
from nanochat_jax.train_step import TrainState, train_state_shardings

LOSSES = ("dpo", "ipo")


def sequence_logps(params, inputs_BT, targets_BT, config: GPTConfig, *, dtype=None, backend=None):
    """(B,) fp32: Σ log p(target) over each row's non-ignored targets (the fused head + loss)."""
    nll = model.loss_fn(params, inputs_BT, targets_BT, config, reduction="none", dtype=dtype, backend=backend)
    return -nll.reshape(targets_BT.shape).sum(axis=-1)


def preference_loss(policy_c, policy_r, ref_c, ref_r, *, loss_type: str = "dpo", beta: float = 0.1,
                    label_smoothing: float = 0.0):
    """Per-pair loss (P,) and the implicit rewards (chosen (P,), rejected (P,)), from sequence log-probs."""
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type must be one of {LOSSES}, got {loss_type!r}")
    h = (policy_c - ref_c) - (policy_r - ref_r)
    if loss_type == "dpo":
        loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    else:
        loss = (h - 1 / (2 * beta)) ** 2
    return loss, beta * (policy_c - ref_c), beta * (policy_r - ref_r)


def check_hparams(loss_type: str, beta: float, label_smoothing: float) -> None:
    """One-line errors for settings the formulas cannot take."""
    if loss_type not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"--beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("--label-smoothing applies to the dpo loss only")


def pair_metrics(loss_P, reward_c, reward_r, policy_c, policy_r) -> dict:
    """Means over pairs; accuracy counts a tie as half."""
    margin = reward_c - reward_r
    acc = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))
    return {"loss": loss_P.mean(), "reward_acc": acc.mean(), "margin": margin.mean(),
            "chosen_reward": reward_c.mean(), "rejected_reward": reward_r.mean(),
            "chosen_logp": policy_c.mean(), "rejected_logp": policy_r.mean()}


def dpo_objective(params, inputs_BT, targets_BT, ref_logps_B, config: GPTConfig, *, loss_type="dpo", beta=0.1,
                  label_smoothing=0.0, dtype=None, backend=None):
    """(mean loss over the P = B/2 pairs, metrics) of one micro-batch whose rows alternate chosen and
    rejected; ref_logps_B are the reference's log-probs of the same rows. The loss the parity tests check."""
    logps = sequence_logps(params, inputs_BT, targets_BT, config, dtype=dtype, backend=backend).reshape(-1, 2)
    ref = jax.lax.stop_gradient(ref_logps_B.astype(jnp.float32)).reshape(-1, 2)
    loss_P, rc, rr = preference_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], loss_type=loss_type, beta=beta,
                                     label_smoothing=label_smoothing)
    return loss_P.mean(), pair_metrics(loss_P, rc, rr, logps[:, 0], logps[:, 1])


def make_dpo_step(config: GPTConfig, tx: optax.GradientTransformation, mesh: Mesh, *, loss_type="dpo", beta=0.1,
                  label_smoothing=0.0, dtype=None, backend=None, with_reference: bool):
    """step(state, ref, inputs_ABT, targets_ABT, lrm) -> (state, metrics incl. "ref_logps" (A, 2P)).

    with_reference: `ref` is the frozen reference params (sharded like params, never donated) and
    its log-probs are computed here; otherwise `ref` is the (A, 2P) reference log-probs of the rows. The loss
    is the mean over micro-steps of each micro-batch's mean pair loss; gradients accumulate in
    fp32 and the update is scaled by the host LR multiplier lrm (as SFT's step)."""
    check_hparams(loss_type, beta, label_smoothing)
    dtype = resolve_dtype(dtype)
    state_sh = train_state_shardings(config, tx, mesh, dtype)
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    replicated = NamedSharding(mesh, P())
    kw = dict(config=config, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, dtype=dtype,
              backend=backend)
    grad_fn = jax.value_and_grad(functools.partial(dpo_objective, **kw), has_aux=True)

    def step(state: TrainState, ref, inputs_ABT, targets_ABT, lrm):
        def micro(grads_acc, xs):
            x_BT, y_BT, ref_in = xs
            ref_B = sequence_logps(ref, x_BT, y_BT, config, dtype=dtype, backend=backend) if with_reference else ref_in
            (_, metrics), grads = grad_fn(state.params, x_BT, y_BT, ref_B)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return grads_acc, {**metrics, "ref_logps": ref_B}

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        zeros = jax.lax.with_sharding_constraint(zeros, state_sh.params)
        A = inputs_ABT.shape[0]
        ref_xs = jnp.zeros(A) if with_reference else ref
        grads, per_micro = jax.lax.scan(micro, zeros, (inputs_ABT, targets_ABT, ref_xs))
        grads = jax.tree.map(lambda g: g / A, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: (u * lrm).astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: (v if k == "ref_logps" else v.mean()) for k, v in per_micro.items()}
        return TrainState(params, opt_state), metrics

    ref_sh = state_sh.params if with_reference else NamedSharding(mesh, P(None, sharding.BATCH))
    jitted = jax.jit(step, in_shardings=(state_sh, ref_sh, batch_sh, batch_sh, replicated),
                     out_shardings=(state_sh, replicated), donate_argnums=0)

    def dpo_step(state: TrainState, ref, inputs_ABT, targets_ABT, lrm=1.0):
        with jax.set_mesh(mesh):
            return jitted(state, ref, inputs_ABT, targets_ABT, jnp.asarray(lrm, jnp.float32))

    return dpo_step


def make_logps_fn(config: GPTConfig, mesh: Mesh, *, dtype=None, backend=None):
    """logps(params, inputs_BT, targets_BT) -> (B,) replicated sequence log-probs, for evaluation and
    for the reference's log-probs of held-out pairs."""
    dtype = resolve_dtype(dtype)
    p_sh = sharding.param_shardings(model.param_axes(config), mesh)
    fn = jax.jit(functools.partial(sequence_logps, config=config, dtype=dtype, backend=backend),
                 in_shardings=(p_sh, sharding.batch_sharding(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=NamedSharding(mesh, P()))

    def logps(params, inputs_BT, targets_BT):
        with jax.set_mesh(mesh):
            return fn(params, inputs_BT, targets_BT)

    return logps
