"""PyTorch oracle of nanochat's optimizer (docs/numerics.md#optimizer), written from upstream's rules alone.

`MuonAdamW` is the single-process (world size 1) form of nanochat's combined optimizer:
every param group carries `kind` ∈ {'adamw', 'muon'}. With one process nanochat's
distributed machinery (sharded stacks, collectives) reduces to "update the whole tensor / the whole stack", so
there is no communication code here; the numbers are those of a W = 1 run.

State layout (a plain `torch.optim.Optimizer.state_dict()`, as upstream's):

* AdamW param `p`: `state[p] = {"step": int, "exp_avg": T, "exp_avg_sq": T}`, the moments
  in `p`'s dtype (bf16 for wte/VE when the model's compute dtype is bf16), `step` a python
  int counting the updates applied so far (1 after the first update).
* Muon group with params `[p0, ..., p_{K-1}]`, all of shape (m, n) in torch's (out, in)
  layout: only `state[p0]` exists, `{"momentum_buffer": (K, m, n) in p0's dtype,
  "second_momentum_buffer": fp32 (K, m, 1) if m >= n else (K, 1, n)}`; slot k belongs to
  `params[k]`. Both buffers start at zero (see `_normuon` for why zero is the right start
  for the second moment).

Group fields: adamw groups hold `lr, initial_lr, betas, eps, weight_decay`; muon groups
hold `lr, initial_lr, momentum, ns_steps, beta2, weight_decay` and `ns_dtype` (a
`torch.dtype`, this module's addition: the Polar Express runs in bf16 iff it is
`torch.bfloat16`, i.e. iff the model's compute dtype is bf16; otherwise in the param dtype).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# Polar Express (a, b, c) per iteration, in order (docs/numerics.md#polar-express).
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

_ADAMW_REQUIRED = ("lr", "betas", "eps", "weight_decay")
_MUON_DEFAULTS = {"momentum": 0.95, "ns_steps": 5, "beta2": 0.9, "weight_decay": 0.0, "ns_dtype": torch.float32}


def _fro(x: torch.Tensor) -> torch.Tensor:
    """Per-matrix Frobenius norm of a (K, m, n) stack, in fp32, shape (K, 1, 1)."""
    return x.float().square().sum(dim=(-2, -1), keepdim=True).sqrt()


def _muon_eq(x: torch.Tensor) -> torch.Tensor:
    """MuonEq (Muon step 3, docs/numerics.md#muon): rescale every row to the matrix's RMS row norm ‖X‖_F/sqrt(m).

    Norms in fp32, the scaling multiplies in x's dtype (bf16 when the PE runs in bf16).
    """
    m = x.shape[-2]
    xf = x.float()
    row_norm = xf.square().sum(dim=-1, keepdim=True).sqrt()  # (K, m, 1)
    target = _fro(xf) / math.sqrt(m)  # (K, 1, 1)
    scale = target / row_norm.clamp_min(1e-6)
    return x * scale.to(x.dtype)


def _polar_express(x: torch.Tensor, ns_steps: int) -> torch.Tensor:
    """Polar Express (Muon step 4) in x's dtype; the first normalization uses an fp32 norm.

    Tall (m > n, strict) uses the n×n Gram matrix XᵀX, wide/square the m×m Gram XXᵀ;
    both compute the same odd polynomial a·X + b·(XXᵀ)X + c·(XXᵀ)²X.
    """
    if not 0 <= ns_steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"ns_steps={ns_steps} must be in [0, {len(POLAR_EXPRESS_COEFFS)}]")
    m, n = x.shape[-2:]
    x = x / (_fro(x) * 1.01 + 1e-6).to(x.dtype)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if m > n:
            A = x.mT @ x
            B = b * A + c * (A @ A)
            x = a * x + x @ B
        else:
            A = x @ x.mT
            B = b * A + c * (A @ A)
            x = a * x + B @ x
    return x


def _normuon(o: torch.Tensor, s: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (Muon step 6): factored second moment `s` (updated in place), Frobenius kept.

    Reduction dim is −1 (per-row, s (K, m, 1)) when m >= n, else −2 (per-column, s (K, 1, n)).
    ‖O‖_F and ‖O·step‖_F are both computed from vmean × the reduced-dim size.

    `s` starts at zero. Because the final rescale preserves ‖O‖_F, the result is
    invariant to one positive factor on `s` per matrix; a zero-initialized EMA after t
    steps is exactly (1 − β2ᵗ) × the bias-corrected EMA, so zero init *is* bias correction
    here (and the first step uses vmean itself). With β2 = 1, `s` stays 0, `step` is the
    uniform 1e5 and the rescale undoes it: NorMuon becomes the identity.
    """
    m, n = o.shape[-2:]
    red_dim = -1 if m >= n else -2
    red_size = o.shape[red_dim]
    vmean = o.float().square().mean(dim=red_dim, keepdim=True)
    norm_before = (vmean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    s.lerp_(vmean.to(s.dtype), 1.0 - beta2)
    step = s.clamp_min(1e-10).rsqrt().float()
    norm_after = ((vmean * red_size) * step.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    scale = step * (norm_before / norm_after.clamp_min(1e-10))
    return o * scale.to(o.dtype)


def muon_update(
    params: torch.Tensor,
    grads: torch.Tensor,
    momentum_buffer: torch.Tensor,
    second_momentum_buffer: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    beta2: float,
    ns_steps: int = 5,
    ns_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One Muon step (steps 1–7 of docs/numerics.md#muon) on a (K, m, n) stack; returns the new params.

    `momentum_buffer` and `second_momentum_buffer` are updated in place; `params` and
    `grads` are left untouched.
    """
    if params.ndim != 3 or grads.shape != params.shape:
        raise ValueError(f"expected matching (K, m, n) stacks, got {tuple(params.shape)} and {tuple(grads.shape)}")
    m, n = params.shape[-2:]
    # 1. Nesterov momentum (buffer dtype = param dtype, fp32 for nanochat's matrices).
    g = grads.to(momentum_buffer.dtype)
    momentum_buffer.lerp_(g, 1.0 - momentum)
    u = torch.lerp(g, momentum_buffer, momentum)
    # 2. bf16 only when the group's PE dtype is bf16 (fp16 is never used).
    x = u.to(torch.bfloat16) if ns_dtype == torch.bfloat16 else u
    # 3.–4. MuonEq, Polar Express, back to the param dtype.
    x = _muon_eq(x)
    o = _polar_express(x, ns_steps).to(params.dtype)
    # 5. Muon+: snap ‖O‖_F to sqrt(min(m, n)), the norm of a semi-orthogonal matrix.
    o = o * (math.sqrt(min(m, n)) / _fro(o).clamp_min(1e-6)).to(o.dtype)
    # 6. NorMuon.
    o = _normuon(o, second_momentum_buffer, beta2)
    # 7. Cautious weight decay (mask from the pre-update params) and the update.
    lr_eff = lr * math.sqrt(max(1.0, m / n))
    mask = (o * params) >= 0
    return params - (lr_eff * o + (lr_eff * weight_decay) * params * mask)


class MuonAdamW(torch.optim.Optimizer):
    """nanochat's MuonAdamW for one process (world size W = 1).

    Every param group needs `kind`: 'adamw' (fields lr, betas, eps, weight_decay) or
    'muon' (lr; optional momentum 0.95, ns_steps 5, beta2 0.9, weight_decay 0.0,
    ns_dtype torch.float32; all params of one muon group share one 2-D shape).
    `initial_lr` defaults to `lr`. Params without a grad are skipped (AdamW); a muon group
    is skipped when none of its params has a grad, and a missing grad inside an otherwise
    live group counts as zero (nanochat never hits either case).
    """

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})

    def add_param_group(self, param_group: dict) -> None:
        kind = param_group.get("kind")
        if kind == "adamw":
            missing = [k for k in _ADAMW_REQUIRED if k not in param_group]
            if missing:
                raise ValueError(f"adamw group is missing {missing}")
        elif kind == "muon":
            if "lr" not in param_group:
                raise ValueError("muon group is missing 'lr'")
            for key, value in _MUON_DEFAULTS.items():
                param_group.setdefault(key, value)
            params = list(param_group["params"])
            shapes = {tuple(p.shape) for p in params}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise ValueError(f"a muon group needs params of one 2-D shape, got {sorted(shapes)}")
        else:
            raise ValueError(f"param group kind must be 'adamw' or 'muon', got {kind!r}")
        param_group.setdefault("initial_lr", param_group["lr"])
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """Standard load; a muon group saved without `ns_dtype` (e.g. by nanochat) keeps the current one."""
        current = [g.get("ns_dtype") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, ns_dtype in zip(self.param_groups, current):
            if group["kind"] == "muon" and "ns_dtype" not in group:
                group["ns_dtype"] = ns_dtype if ns_dtype is not None else torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw_group(group)
            else:
                self._muon_group(group)
        return loss

    def _adamw_group(self, group: dict) -> None:
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = (float(b) for b in group["betas"])
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = state["step"]
            # All math in fp32; p and the moments are written back in their storage dtype.
            p32, g32 = p.float(), p.grad.float()
            m32, v32 = state["exp_avg"].float(), state["exp_avg_sq"].float()
            p32 = p32 * (1.0 - lr * wd)
            m32 = m32.lerp(g32, 1.0 - beta1)
            v32 = v32.lerp(g32.square(), 1.0 - beta2)
            bias1 = 1.0 - beta1**t
            bias2 = 1.0 - beta2**t
            denom = (v32 / bias2).sqrt() + eps
            p32 = p32 - (lr / bias1) * m32 / denom
            state["exp_avg"].copy_(m32)
            state["exp_avg_sq"].copy_(v32)
            p.copy_(p32)

    def _muon_group(self, group: dict) -> None:
        params = group["params"]
        if all(p.grad is None for p in params):
            return
        p0 = params[0]
        K, (m, n) = len(params), p0.shape
        state = self.state[p0]
        if not state:
            state["momentum_buffer"] = torch.zeros((K, m, n), dtype=p0.dtype, device=p0.device)
            s_shape = (K, m, 1) if m >= n else (K, 1, n)
            state["second_momentum_buffer"] = torch.zeros(s_shape, dtype=torch.float32, device=p0.device)
        grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        stacked = torch.stack([p.detach() for p in params])
        new = muon_update(
            stacked,
            grads,
            state["momentum_buffer"],
            state["second_momentum_buffer"],
            lr=float(group["lr"]),
            weight_decay=float(group["weight_decay"]),
            momentum=float(group["momentum"]),
            beta2=float(group["beta2"]),
            ns_steps=int(group["ns_steps"]),
            ns_dtype=group.get("ns_dtype", torch.float32),
        )
        for p, q in zip(params, new.unbind(0)):
            p.copy_(q)


def setup_optimizer(
    model: nn.Module,
    unembedding_lr: float = 0.004,
    embedding_lr: float = 0.2,
    matrix_lr: float = 0.02,
    weight_decay: float = 0.0,
    scalar_lr: float = 0.5,
) -> MuonAdamW:
    """nanochat's `GPT.setup_optimizer` (numerics.md#parameter-groups): 6 AdamW groups, then one Muon group per shape.

    dmodel_lr_scale = (C/768)^-0.5 multiplies lm_head, wte and VE (VE also ×0.5). The
    smear group's lr is a fixed 0.2. Muon groups: every param under `transformer.h`
    (ve_gate included), grouped by shape, shapes sorted ascending as tuples, module order
    within a group. `ns_dtype` is bf16 iff `model.compute_dtype` is bf16, else fp32.
    Every group gets `initial_lr = lr`. Raises if a parameter lands in no group or in two.
    """
    C = model.config.n_embd
    dmodel_lr_scale = (C / 768) ** -0.5
    ns_dtype = torch.bfloat16 if getattr(model, "compute_dtype", torch.float32) == torch.bfloat16 else torch.float32

    def adamw(params, lr, betas, wd):
        return {"kind": "adamw", "params": list(params), "lr": lr, "initial_lr": lr,
                "betas": betas, "eps": 1e-10, "weight_decay": wd}  # fmt: skip

    groups = [
        adamw([model.lm_head.weight], unembedding_lr * dmodel_lr_scale, (0.8, 0.96), 0.01),
        adamw([model.transformer.wte.weight], embedding_lr * dmodel_lr_scale, (0.8, 0.995), 0.001),
        adamw(
            [model.value_embeds[k].weight for k in sorted(model.value_embeds.keys(), key=int)],
            embedding_lr * dmodel_lr_scale * 0.5,
            (0.8, 0.995),
            0.01,
        ),
        adamw([model.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
        adamw([model.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
        adamw([model.smear_gate.weight, model.smear_lambda, model.backout_lambda], 0.2, (0.8, 0.95), 0.0),
    ]
    by_shape: dict[tuple[int, ...], list[nn.Parameter]] = {}
    for p in model.transformer.h.parameters():
        by_shape.setdefault(tuple(p.shape), []).append(p)
    for shape in sorted(by_shape):
        groups.append(
            {"kind": "muon", "params": by_shape[shape], "lr": matrix_lr, "initial_lr": matrix_lr,
             "momentum": 0.95, "ns_steps": 5, "beta2": 0.9, "weight_decay": weight_decay,
             "ns_dtype": ns_dtype}  # fmt: skip
        )

    seen: dict[int, int] = {}
    for group in groups:
        for p in group["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    names = {id(p): name for name, p in model.named_parameters()}
    missing = [name for pid, name in names.items() if pid not in seen]
    doubled = [names.get(pid, "?") for pid, count in seen.items() if count > 1]
    if missing or doubled or len(seen) != len(names):
        raise RuntimeError(f"parameter grouping is broken: missing={missing} doubled={doubled}")
    return MuonAdamW(groups)


def _warmdown_iters(num_iterations: int, warmdown_ratio: float) -> int:
    return round(warmdown_ratio * num_iterations)  # python round: ties go to even


def lr_multiplier(
    it: int, num_iterations: int, warmup_steps: int = 40, warmdown_ratio: float = 0.65, final_lr_frac: float = 0.05
) -> float:
    """LR multiplier (docs/numerics.md#schedules); the branches are tried in this order:

    1. it < warmup_steps: (it + 1) / warmup_steps (step 0 → 1/40, step 39 → 1.0);
    2. it <= N − Wd (Wd = round(warmdown_ratio·N)): 1.0 — so at it = N − Wd the value is
       1.0, which the warmdown line also gives there;
    3. otherwise p + (1 − p)·final_lr_frac with p = (N − it)/Wd: reaches final_lr_frac at
       it = N and keeps falling linearly (unclamped) past N.
    Warmup wins over warmdown when they overlap (short runs). With Wd = 0 branch 3 only
    sees it > N and returns final_lr_frac (nanochat would divide by zero there).
    """
    Wd = _warmdown_iters(num_iterations, warmdown_ratio)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= num_iterations - Wd:
        return 1.0
    if Wd == 0:
        return final_lr_frac
    p = (num_iterations - it) / Wd
    return p * 1.0 + (1 - p) * final_lr_frac


def muon_momentum(it: int, num_iterations: int, warmdown_ratio: float = 0.65) -> float:
    """Muon momentum (docs/numerics.md#schedules); the branches are tried in this order:

    1. it < 400: (1 − it/400)·0.85 + (it/400)·0.97 (0.85 at 0; this takes precedence even
       inside the warmdown of a short run, so e.g. N = 100 never reaches 0.90);
    2. it >= N − Wd: 0.97·(1 − q) + 0.90·q with q = (it − (N − Wd))/Wd: 0.97 at the
       warmdown start, 0.90 at it = N (unclamped past N);
    3. otherwise 0.97 (also the value at it = 400 when 400 < N − Wd).
    With Wd = 0 branch 2 returns 0.97 (nanochat would divide by zero at it >= N).
    """
    Wd = _warmdown_iters(num_iterations, warmdown_ratio)
    warmdown_start = num_iterations - Wd
    if it < 400:
        frac = it / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if it >= warmdown_start:
        if Wd == 0:
            return 0.97
        q = (it - warmdown_start) / Wd
        return 0.97 * (1 - q) + 0.90 * q
    return 0.97


def muon_weight_decay(it: int, num_iterations: int, weight_decay: float) -> float:
    """Muon weight decay (docs/numerics.md#weight-decay): cosine wd·0.5·(1 + cos(π·it/N)); wd at 0, 0 at it = N."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


def apply_schedules(
    optimizer: MuonAdamW,
    it: int,
    num_iterations: int,
    weight_decay: float,
    warmup_steps: int = 40,
    warmdown_ratio: float = 0.65,
    final_lr_frac: float = 0.05,
) -> None:
    """Set every group's lr = initial_lr·lr_multiplier and Muon groups' momentum and WD.

    `weight_decay` is the (already scaled, docs/numerics.md#scaling) Muon WD the cosine starts from; AdamW
    weight decays are not scheduled.
    """
    lrm = lr_multiplier(it, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac)
    mom = muon_momentum(it, num_iterations, warmdown_ratio)
    wd = muon_weight_decay(it, num_iterations, weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = mom
            group["weight_decay"] = wd
