"""nanochat's MuonAdamW as an Optax chain, with its schedules (docs/numerics.md#optimizer).

Six AdamW groups (torch.optim.AdamW semantics, fp32 math) and nanochat's Muon for every
block matrix, combined with `optax.partition` over labels derived from parameter paths.
Schedules are pure functions of each transform's step count, evaluated inside the jitted
update, so changing the step never recompiles.

Muon's shape rules (tall/wide, MuonEq rows, NorMuon's reduction axis, the LR ratio) are
nanochat's, stated for torch's (out, in) weights. Our kernels are Flax's (in, out):
`_out_in` views a kernel the torch way (via `model.linear_fans`), the math runs there,
and the result is viewed back. XLA folds the transposes into the matmuls.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanochat_jax import scaling
from nanochat_jax.common import resolve_dtype
from nanochat_jax.config import GPTConfig
from nanochat_jax.model import linear_fans

# Polar Express coefficients (a, b, c), one triple per iteration, upstream's table (docs/numerics.md#polar-express).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

OPTIMIZERS = ("nanochat", "optax_muon", "adamw")
ScheduleFn = Callable[[jax.Array], jax.Array]


# ---- schedules (docs/numerics.md#schedules); `it` may be a traced int------------------------------

def lr_multiplier(it, num_iterations: int, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                  final_lr_frac: float = 0.05):
    """Linear warmup to 1 over `warmup_steps`, flat, then linear warmdown to final_lr_frac at N."""
    it = jnp.asarray(it, jnp.float32)
    warmdown = round(warmdown_ratio * num_iterations)
    warm = (it + 1) / max(warmup_steps, 1)
    p = (num_iterations - it) / max(warmdown, 1)
    down = p + (1 - p) * final_lr_frac
    return jnp.where(it < warmup_steps, warm, jnp.where(it <= num_iterations - warmdown, 1.0, down))


def muon_momentum(it, num_iterations: int, warmdown_ratio: float = 0.65):
    """0.85 → 0.97 over the first 400 steps (takes precedence), 0.97 → 0.90 over the warmdown."""
    it = jnp.asarray(it, jnp.float32)
    warmdown = round(warmdown_ratio * num_iterations)
    start = num_iterations - warmdown
    ramp_up = (1 - it / 400) * 0.85 + (it / 400) * 0.97
    frac = (it - start) / max(warmdown, 1)
    ramp_down = 0.97 * (1 - frac) + 0.90 * frac
    return jnp.where(it < 400, ramp_up, jnp.where(it >= start, ramp_down, 0.97))


def finetune_momentum(it, ramp_steps: int = 300, start: float = 0.85, end: float = 0.95):
    """SFT's Muon momentum: start → end linearly over the first ramp_steps, then flat."""
    frac = jnp.minimum(jnp.asarray(it, jnp.float32) / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end


def muon_weight_decay(it, num_iterations: int, weight_decay: float):
    """Cosine from weight_decay at step 0 to 0 at step N."""
    it = jnp.asarray(it, jnp.float32)
    return weight_decay * 0.5 * (1 + jnp.cos(jnp.pi * it / num_iterations))


# ---- parameter groups (docs/numerics.md#parameter-groups)------------------------------------------

def param_label(path: tuple[str, ...]) -> str:
    """Which optimizer group a parameter (by its path in our params tree) belongs to."""
    top = path[0]
    if top.startswith("h_"):
        return "muon"
    if top.startswith("ve_"):
        return "value_embeds"
    labels = {"lm_head": "lm_head", "wte": "wte", "resid_lambdas": "resid_lambdas", "x0_lambdas": "x0_lambdas",
              "smear_gate": "scalars", "smear_lambda": "scalars", "backout_lambda": "scalars"}
    if top not in labels:
        raise ValueError(f"parameter {'/'.join(path)} matches no optimizer group; known top-level names: "
                         f"{sorted(labels)} plus h_<i> (Muon) and ve_<i> (value embeddings)")
    return labels[top]


def param_labels(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: param_label(tuple(k.key for k in p)), params)


def adamw_groups(config: GPTConfig, *, unembedding_lr: float, embedding_lr: float, scalar_lr: float) -> dict:
    """label → (lr, (beta1, beta2), decoupled weight decay), exactly nanochat's table."""
    s = scaling.dmodel_lr_scale(config)
    return {
        "lm_head": (unembedding_lr * s, (0.8, 0.96), 0.01),
        "wte": (embedding_lr * s, (0.8, 0.995), 0.001),
        "value_embeds": (embedding_lr * s * 0.5, (0.8, 0.995), 0.01),
        "resid_lambdas": (scalar_lr * 0.01, (0.8, 0.95), 0.05),
        "x0_lambdas": (scalar_lr, (0.96, 0.95), 0.0),
        "scalars": (0.2, (0.8, 0.95), 0.0),  # smear gate/λ and backout λ: fixed, not batch-scaled
    }


# ---- AdamW, torch semantics ----------------------------------------------------------------

class AdamWState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def adamw(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
          lr_schedule: ScheduleFn = lambda it: 1.0) -> optax.GradientTransformation:
    """torch.optim.AdamW: decay p by lr·wd, lerp the moments, bias-correct, step.

    Math in fp32; moments stored in the parameter's dtype (bf16 tables keep bf16 state).
    The returned update is new_p − p (fp32), so optax.apply_updates lands on new_p.
    """
    b1, b2 = betas

    def init(params):  # two separate buffers: the state is donated to the jitted step
        return AdamWState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params),
                          jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params):
        if params is None:
            raise ValueError("nanochat AdamW needs params (decoupled weight decay)")
        t = state.count + 1
        lr_t = lr * lr_schedule(state.count)
        bc1, bc2 = 1 - b1 ** t.astype(jnp.float32), 1 - b2 ** t.astype(jnp.float32)

        def one(g, p, m, v):
            g32, p32 = g.astype(jnp.float32), p.astype(jnp.float32)
            m32 = m.astype(jnp.float32) + (1 - b1) * (g32 - m.astype(jnp.float32))
            v32 = v.astype(jnp.float32) + (1 - b2) * (g32 * g32 - v.astype(jnp.float32))
            new_p = p32 * (1 - lr_t * weight_decay)
            new_p = new_p - (lr_t / bc1) * m32 / (jnp.sqrt(v32) / jnp.sqrt(bc2) + eps)
            return new_p - p32, m32.astype(m.dtype), v32.astype(v.dtype)

        out = jax.tree.map(one, grads, params, state.mu, state.nu)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)  # noqa: E731
        return pick(0), AdamWState(t, pick(1), pick(2))

    return optax.GradientTransformation(init, update)


# ---- nanochat Muon --------------------------------------------------------------------------

class MuonState(NamedTuple):
    count: jax.Array
    momentum: optax.Updates  # like the params (fp32 masters)
    second: optax.Updates    # NorMuon factored second moment, fp32, stored in the kernel's (in, out) layout


def _out_in(kernel):
    """View a Flax (in, out) kernel as nanochat's (out, in) matrix; its own inverse."""
    return jnp.swapaxes(kernel, -1, -2)


def _out_in_shape(kernel_shape) -> tuple[int, int]:
    fan_in, fan_out = linear_fans(kernel_shape)
    return fan_out, fan_in  # (m, n) in nanochat's terms


def _normuon_axis(m: int, n: int) -> int:
    """Per-row statistics (reduce over inputs) when m >= n, else per-column; (out, in) axes."""
    return -1 if m >= n else -2


def _fro(x):
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1), keepdims=True))


def polar_express(X, ns_dtype=jnp.float32):
    """Approximate the orthogonal polar factor of X (m, n) with nanochat's 5 PE iterations."""
    m, n = X.shape[-2:]
    X = X.astype(ns_dtype)
    X = X / (_fro(X) * 1.01 + 1e-6).astype(ns_dtype)
    for a, b, c in POLAR_EXPRESS:
        if m > n:  # tall: work with the small n×n Gram matrix
            A = jnp.swapaxes(X, -1, -2) @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ jnp.swapaxes(X, -1, -2)
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def muon_direction(U, second, beta2: float, ns_dtype=jnp.float32):
    """Muon steps 2–6 (docs/numerics.md#muon) on one (out, in) matrix: MuonEq → PE → Muon+ → NorMuon.

    Returns the fp32 update direction and the new second moment.
    """
    m, n = U.shape[-2:]
    X = U.astype(ns_dtype)
    # MuonEq: every row rescaled to the RMS row norm (norms in fp32).
    rows = jnp.sqrt(jnp.sum(jnp.square(X.astype(jnp.float32)), axis=-1, keepdims=True))
    target = _fro(X) / math.sqrt(m)
    X = X * (target / jnp.maximum(rows, 1e-6)).astype(ns_dtype)
    O = polar_express(X, ns_dtype).astype(jnp.float32)
    # Muon+: snap the Frobenius norm to that of a semi-orthogonal matrix.
    O = O * math.sqrt(min(m, n)) / jnp.maximum(_fro(O), 1e-6)
    # NorMuon: normalize by a factored second moment, keeping the Frobenius norm.
    axis = _normuon_axis(m, n)
    red = O.shape[axis]
    vmean = jnp.mean(jnp.square(O), axis=axis, keepdims=True)
    second = second + (1 - beta2) * (vmean - second)
    step = jax.lax.rsqrt(jnp.maximum(second, 1e-10))
    norm = jnp.sqrt(jnp.sum(vmean, axis=(-2, -1), keepdims=True) * red)
    norm_new = jnp.sqrt(jnp.sum(vmean * jnp.square(step), axis=(-2, -1), keepdims=True) * red)
    return O * step * (norm / jnp.maximum(norm_new, 1e-10)), second


def muon(lr: float, *, momentum_schedule: ScheduleFn, weight_decay_schedule: ScheduleFn,
         lr_schedule: ScheduleFn = lambda it: 1.0, beta2: float = 0.9, ns_dtype=jnp.float32) -> optax.GradientTransformation:
    """nanochat's Muon for 2-D kernels: Nesterov (lerp, no bias correction) → MuonEq →
    Polar Express ×5 → Muon+ → NorMuon → cautious weight decay, lr × sqrt(max(1, out/in)).

    `ns_dtype` is the dtype of the PE iteration (bf16 when the model computes in bf16).
    """

    def init(params):
        def second(p):
            if p.ndim != 2:
                raise ValueError(f"Muon needs 2-D kernels, got shape {p.shape}")
            m, n = _out_in_shape(p.shape)
            shape = (m, 1) if _normuon_axis(m, n) == -1 else (1, n)
            return jnp.zeros(shape[::-1], jnp.float32)  # stored in the kernel's (in, out) layout
        return MuonState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params), jax.tree.map(second, params))

    def update(grads, state, params):
        if params is None:
            raise ValueError("nanochat Muon needs params (cautious weight decay)")
        mu = momentum_schedule(state.count)
        wd = weight_decay_schedule(state.count)
        lr_t = lr * lr_schedule(state.count)

        def one(g, p, buf, second):
            m, n = _out_in_shape(p.shape)
            g32, p32 = _out_in(g).astype(jnp.float32), _out_in(p).astype(jnp.float32)
            buf32 = _out_in(buf).astype(jnp.float32)
            buf32 = buf32 + (1 - mu) * (g32 - buf32)
            U = g32 + mu * (buf32 - g32)  # Nesterov: lerp(g, buf, μ)
            O, second = muon_direction(U, _out_in(second), beta2, ns_dtype)
            lr_eff = lr_t * math.sqrt(max(1.0, m / n))
            mask = (O * p32 >= 0).astype(jnp.float32)
            delta = -lr_eff * O - lr_eff * wd * p32 * mask
            return _out_in(delta), _out_in(buf32).astype(buf.dtype), _out_in(second)

        out = jax.tree.map(one, grads, params, state.momentum, state.second)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)  # noqa: E731
        return pick(0), MuonState(state.count + 1, pick(1), pick(2))

    return optax.GradientTransformation(init, update)


# ---- assembling the optimizer ------------------------------------------------------------

def make_optimizer(config: GPTConfig, num_iterations: int, *, name: str = "nanochat", unembedding_lr: float = 0.004,
                   embedding_lr: float = 0.2, matrix_lr: float = 0.02, scalar_lr: float = 0.5,
                   weight_decay: float = 0.0, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                   final_lr_frac: float = 0.05, dtype=None, lr_schedule: ScheduleFn | None = None,
                   momentum_schedule: ScheduleFn | None = None) -> optax.GradientTransformation:
    """The optimizer from explicit (already scaled) LRs: nanochat's setup_optimizer + schedules.

    lr_schedule / momentum_schedule replace base_train's LR multiplier and Muon momentum
    schedules (functions of the step count), e.g. for SFT and RL.

    name: "nanochat" (MuonAdamW), "optax_muon" (optax.contrib.muon on the block matrices,
    nanochat's AdamW groups elsewhere) or "adamw" (stock optax.adamw everywhere, block
    matrices at matrix_lr/5 as an untuned starting point).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1 for the schedules, got {num_iterations}")
    lrm = lr_schedule or (lambda it: lr_multiplier(it, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac))
    momentum = momentum_schedule or (lambda it: muon_momentum(it, num_iterations, warmdown_ratio))
    groups = adamw_groups(config, unembedding_lr=unembedding_lr, embedding_lr=embedding_lr, scalar_lr=scalar_lr)
    if name == "adamw":
        stock = lambda lr, betas, wd: optax.adamw(lambda it: lr * lrm(it), *betas, eps=1e-10, weight_decay=wd)  # noqa: E731
        transforms = {label: stock(*g) for label, g in groups.items()}
        transforms["muon"] = stock(matrix_lr / 5, (0.9, 0.95), weight_decay)
    else:
        transforms = {label: adamw(lr, betas, 1e-10, wd, lrm) for label, (lr, betas, wd) in groups.items()}
        if name == "nanochat":
            transforms["muon"] = muon(
                matrix_lr, lr_schedule=lrm, beta2=0.9, ns_dtype=resolve_dtype(dtype),
                momentum_schedule=momentum,
                weight_decay_schedule=lambda it: muon_weight_decay(it, num_iterations, weight_decay))
        else:
            transforms["muon"] = optax.contrib.muon(
                lambda it: matrix_lr * lrm(it), ns_coeffs=POLAR_EXPRESS, ns_steps=len(POLAR_EXPRESS), beta=0.95,
                weight_decay=weight_decay, nesterov=True)
    return optax.partition(transforms, param_labels)


def optimizer_for(config: GPTConfig, num_iterations: int, *, lr_scale: float, weight_decay: float,
                  name: str = "nanochat", embedding_lr: float = 0.3, unembedding_lr: float = 0.008,
                  matrix_lr: float = 0.02, scalar_lr: float = 0.5, warmup_steps: int = 40,
                  warmdown_ratio: float = 0.65, final_lr_frac: float = 0.05, dtype=None) -> optax.GradientTransformation:
    """base_train's optimizer from its plan's numbers: the CLI-default LRs times lr_scale
    (scaling.batch_lr_scale) and Muon's already scaled weight decay (scaling.scaled_weight_decay)."""
    return make_optimizer(config, num_iterations, name=name, unembedding_lr=unembedding_lr * lr_scale,
                          embedding_lr=embedding_lr * lr_scale, matrix_lr=matrix_lr * lr_scale,
                          scalar_lr=scalar_lr * lr_scale,
                          weight_decay=weight_decay, warmup_steps=warmup_steps, warmdown_ratio=warmdown_ratio,
                          final_lr_frac=final_lr_frac, dtype=dtype)
