"""Tests of the PyTorch optimizer oracle alone (docs/numerics.md#optimizer; upstream's test_optim.py behaviours).

Expected values are recomputed here from upstream's rules (a float64 numpy Muon step, the group
table, the schedule formulas), never read back from the module under test.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="tests of the torch reference backend need torch")

from nanochat_jax.config import GPTConfig  # noqa: E402
from nanochat_jax.torch_ref import (  # noqa: E402
    GPT,
    MuonAdamW,
    apply_schedules,
    lr_multiplier,
    muon_momentum,
    muon_weight_decay,
    setup_optimizer,
)

PE = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def test_polar_express_table_is_exact():
    from nanochat_jax.torch_ref.optim import POLAR_EXPRESS_COEFFS

    assert [tuple(c) for c in POLAR_EXPRESS_COEFFS] == PE  # exact floats, order included


def muon_group(params, **kw):
    return {"kind": "muon", "params": params, **kw}


# ---------------------------------------------------------------- AdamW


def test_adamw_group_matches_torch_adamw():
    gen = torch.Generator().manual_seed(0)
    shapes = [(5,), (16, 8), (300, 64)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    opt = MuonAdamW([{"kind": "adamw", "params": ours, "lr": 0.01, "betas": (0.9, 0.95), "eps": 1e-8,
                      "weight_decay": 0.1}])  # fmt: skip
    ref_opt = torch.optim.AdamW(ref, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(10):
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for a, b, x in zip(ours, ref, init):
        assert not torch.equal(a, x)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, ref):  # upstream's state layout: python int step + moments in the param dtype
        st, rst = opt.state[a], ref_opt.state[b]
        assert st["step"] == 10 and isinstance(st["step"], int)
        torch.testing.assert_close(st["exp_avg"], rst["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(st["exp_avg_sq"], rst["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_adamw_bf16_param_keeps_bf16_state():
    p = torch.nn.Parameter(torch.randn(64, 16).to(torch.bfloat16))
    opt = MuonAdamW([{"kind": "adamw", "params": [p], "lr": 0.1, "betas": (0.8, 0.995), "eps": 1e-10,
                      "weight_decay": 0.001}])  # fmt: skip
    p.grad = torch.randn(64, 16).to(torch.bfloat16)
    opt.step()
    assert p.dtype == torch.bfloat16
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16 and opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16


# ---------------------------------------------------------------- Muon


@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])
def test_first_muon_update_is_near_semi_orthogonal(shape):
    """momentum 0 (U = G), β2 = 1 (S stays at its zero init ⇒ a uniform rsqrt(1e-10) factor
    that the Frobenius-preserving rescale removes: NorMuon is the identity), lr 1, wd 0."""
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(shape, generator=gen)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = MuonAdamW([muon_group([p], lr=1.0, momentum=0.0, beta2=1.0, weight_decay=0.0)])
    p.grad = g
    opt.step()
    update = -p.detach().double()
    sv = torch.linalg.svdvals(update)
    sv = sv / sv.mean()
    assert sv.max() / sv.min() < 4
    assert sv.max() / sv.min() < 1.6  # PE reaches ~1.3 here; the raw G has ~5
    # Muon+ norm sqrt(min(m, n)), times the tall lr factor sqrt(max(1, m/n)).
    m, n = shape
    want = math.sqrt(min(m, n)) * math.sqrt(max(1.0, m / n))
    assert torch.linalg.matrix_norm(update).item() == pytest.approx(want, rel=1e-4)
    assert opt.state[p]["second_momentum_buffer"].abs().max() == 0


def numpy_muon_step(P, G, M, S, *, lr, wd, mu, beta2):
    """The 7 Muon steps (docs/numerics.md#muon) for one (m, n) matrix in float64. Returns (P, M, S) updated."""
    m, n = P.shape
    # 1. Nesterov momentum
    M = mu * M + (1 - mu) * G
    X = (1 - mu) * G + mu * M
    # 2. (fp32 compute dtype: no bf16 cast)
    # 3. MuonEq: every row to the RMS row norm
    target = np.linalg.norm(X) / np.sqrt(m)
    X = X * (target / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-6))
    # 4. Polar Express, computed as the wide-branch polynomial for every shape
    X = X / (np.linalg.norm(X) * 1.01 + 1e-6)
    for a, b, c in PE:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    O = X
    # 5. Muon+
    O = O * np.sqrt(min(m, n)) / max(np.linalg.norm(O), 1e-6)
    # 6. NorMuon
    axis = 1 if m >= n else 0
    vmean = np.mean(O**2, axis=axis, keepdims=True)
    S = beta2 * S + (1 - beta2) * vmean
    step = 1 / np.sqrt(np.maximum(S, 1e-10))
    O = O * step * np.linalg.norm(O) / max(np.linalg.norm(O * step), 1e-10)
    # 7. cautious WD and update
    lr_eff = lr * np.sqrt(max(1.0, m / n))
    mask = (O * P) >= 0
    P = P - lr_eff * O - lr_eff * wd * P * mask
    return P, M, S


@pytest.mark.parametrize("shape", [(48, 24), (24, 48), (32, 32)])
def test_muon_step_matches_handwritten_float64(shape):
    """Two matrices of very different scale in one group (norms must be per matrix), two
    steps (momentum and S carry over), nonzero WD (the cautious mask matters)."""
    rng = np.random.default_rng(sum(shape))
    m, n = shape
    K = 2
    P0 = [rng.standard_normal(shape) * s for s in (0.05, 3.0)]
    grads = [[rng.standard_normal(shape) * s for s in (1.0, 1e-3)] for _ in range(2)]
    params = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float32)) for x in P0]
    lr, wd, mu, beta2 = 0.05, 0.3, 0.9, 0.8
    opt = MuonAdamW([muon_group(params, lr=lr, weight_decay=wd, momentum=mu, beta2=beta2)])

    P = [x.astype(np.float32).astype(np.float64) for x in P0]
    M = [np.zeros(shape) for _ in range(K)]
    S = [np.zeros((m, 1) if m >= n else (1, n)) for _ in range(K)]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        for k in range(K):
            g = step_grads[k].astype(np.float32).astype(np.float64)
            P[k], M[k], S[k] = numpy_muon_step(P[k], g, M[k], S[k], lr=lr, wd=wd, mu=mu, beta2=beta2)
        for k in range(K):
            np.testing.assert_allclose(params[k].detach().numpy(), P[k], rtol=1e-5, atol=1e-5)
            assert not np.allclose(P[k], P0[k], atol=1e-3)

    # Upstream's state layout: only the group's first param holds the (K, ...) buffers.
    assert set(opt.state[params[0]]) == {"momentum_buffer", "second_momentum_buffer"}
    assert params[1] not in opt.state
    state = opt.state[params[0]]
    assert state["momentum_buffer"].shape == (K, m, n)
    assert state["second_momentum_buffer"].shape == ((K, m, 1) if m >= n else (K, 1, n))
    assert state["second_momentum_buffer"].dtype == torch.float32
    for k in range(K):
        np.testing.assert_allclose(state["momentum_buffer"][k].numpy(), M[k], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(state["second_momentum_buffer"][k].numpy(), S[k], rtol=1e-4, atol=1e-9)


def test_muon_bf16_ns_dtype_runs_close_to_fp32():
    """ns_dtype bf16 routes the PE through bf16: close to, but not equal to, fp32."""
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(32, 64, generator=gen)
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(torch.zeros(32, 64))
        opt = MuonAdamW([muon_group([p], lr=1.0, ns_dtype=dt)])
        p.grad = g.clone()
        opt.step()
        assert p.dtype == torch.float32
        out[dt] = p.detach().clone()
    assert not torch.equal(out[torch.float32], out[torch.bfloat16])
    torch.testing.assert_close(out[torch.bfloat16], out[torch.float32], rtol=0.1, atol=0.03)


# ---------------------------------------------------------------- setup_optimizer


def expected_table(model, cfg, unemb=0.004, emb=0.2, matrix=0.02, wd=0.0, scalar=0.5):
    scale = (cfg.n_embd / 768) ** -0.5
    ve = [model.value_embeds[str(i)].weight for i in range(cfg.n_layer) if str(i) in model.value_embeds]
    adamw = [
        ([model.lm_head.weight], unemb * scale, (0.8, 0.96), 0.01),
        ([model.transformer.wte.weight], emb * scale, (0.8, 0.995), 0.001),
        (ve, emb * scale * 0.5, (0.8, 0.995), 0.01),
        ([model.resid_lambdas], scalar * 0.01, (0.8, 0.95), 0.05),
        ([model.x0_lambdas], scalar, (0.96, 0.95), 0.0),
        ([model.smear_gate.weight, model.smear_lambda, model.backout_lambda], 0.2, (0.8, 0.95), 0.0),
    ]
    # Muon shapes from upstream's inventory (out, in): C=n_embd, kv=n_kv_head·head_dim.
    C, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
    kv = cfg.n_kv_head * hd
    muon: dict[tuple, list] = {}
    for i, block in enumerate(model.transformer.h):
        a = block.attn
        entries = [((C, C), a.c_q.weight), ((kv, C), a.c_k.weight), ((kv, C), a.c_v.weight), ((C, C), a.c_proj.weight)]
        if a.ve_gate is not None:
            entries.append(((cfg.n_kv_head, 12), a.ve_gate.weight))
        entries += [((4 * C, C), block.mlp.c_fc.weight), ((C, 4 * C), block.mlp.c_proj.weight)]
        for shape, w in entries:
            muon.setdefault(shape, []).append(w)
    return adamw, [(s, muon[s]) for s in sorted(muon)], matrix, wd


@pytest.mark.parametrize("n_embd,n_head", [(64, 4), (768, 6)])
def test_setup_optimizer_group_table(n_embd, n_head):
    cfg = GPTConfig(sequence_len=64, vocab_size=300, n_layer=3, n_head=n_head, n_kv_head=2, n_embd=n_embd)
    model = GPT(cfg, dtype=torch.float32)
    kw = dict(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.03, weight_decay=0.2, scalar_lr=0.7)
    opt = setup_optimizer(model, **kw)
    adamw, muon, matrix_lr, wd = expected_table(model, cfg, 0.008, 0.3, 0.03, 0.2, 0.7)
    groups = opt.param_groups
    assert len(groups) == len(adamw) + len(muon)
    if n_embd == 768:
        assert groups[0]["lr"] == pytest.approx(0.008) and groups[1]["lr"] == pytest.approx(0.3)
    for g, (params, lr, betas, w) in zip(groups[:6], adamw):
        assert g["kind"] == "adamw"
        assert [id(p) for p in g["params"]] == [id(p) for p in params]
        assert g["lr"] == pytest.approx(lr, rel=1e-12) and g["initial_lr"] == g["lr"]
        assert tuple(g["betas"]) == betas and g["eps"] == 1e-10 and g["weight_decay"] == w
    shapes = []
    for g, (shape, params) in zip(groups[6:], muon):
        assert g["kind"] == "muon"
        assert [id(p) for p in g["params"]] == [id(p) for p in params]
        assert {tuple(p.shape) for p in g["params"]} == {shape}
        assert g["lr"] == matrix_lr and g["initial_lr"] == matrix_lr
        assert (g["momentum"], g["ns_steps"], g["beta2"], g["weight_decay"]) == (0.95, 5, 0.9, wd)
        assert g["ns_dtype"] == torch.float32
        shapes.append(shape)
    assert shapes == sorted(shapes)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}

    # Upstream's state dict: global consecutive indices in group order; kind and initial_lr kept.
    sd = opt.state_dict()
    flat = [i for g in sd["param_groups"] for i in g["params"]]
    assert flat == list(range(len(ids)))
    assert [g["kind"] for g in sd["param_groups"]] == [g["kind"] for g in groups]


def test_setup_optimizer_bf16_model_sets_bf16_ns_dtype():
    cfg = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    opt = setup_optimizer(GPT(cfg, dtype=torch.bfloat16))
    assert {g["ns_dtype"] for g in opt.param_groups if g["kind"] == "muon"} == {torch.bfloat16}


def test_setup_optimizer_trains_a_small_gpt_and_round_trips_state():
    cfg = GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    model = GPT(cfg, dtype=torch.float32)
    opt = setup_optimizer(model, weight_decay=0.1)
    idx = torch.randint(0, 300, (2, 33))
    losses = []
    for it in range(6):
        apply_schedules(opt, it, 10, 0.1, warmup_steps=2)
        loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    sd = opt.state_dict()
    muon_first = [g["params"][0] for g in sd["param_groups"] if g["kind"] == "muon"]
    muon_rest = [i for g in sd["param_groups"] if g["kind"] == "muon" for i in g["params"][1:]]
    assert all(set(sd["state"][i]) == {"momentum_buffer", "second_momentum_buffer"} for i in muon_first)
    assert not any(i in sd["state"] for i in muon_rest)
    opt2 = setup_optimizer(model, weight_decay=0.1)
    opt2.load_state_dict(sd)
    for a, b in zip(opt.param_groups, opt2.param_groups):
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "params")


# ---------------------------------------------------------------- schedules


def test_lr_multiplier():
    N = 1000
    Wd = round(0.65 * N)
    assert lr_multiplier(0, N) == pytest.approx(1 / 40)
    assert lr_multiplier(20, N) == pytest.approx(21 / 40)
    assert lr_multiplier(39, N) == pytest.approx(1.0)
    assert lr_multiplier(40, N) == 1.0 and lr_multiplier(N - Wd, N) == 1.0
    mid = N - Wd // 2
    p = (N - mid) / Wd
    assert lr_multiplier(mid, N) == pytest.approx(p + (1 - p) * 0.05)
    assert lr_multiplier(N, N) == pytest.approx(0.05)
    assert lr_multiplier(N - 1, N) > lr_multiplier(N, N)
    # Wd uses Python round: 0.65·10 = 6.5 → 6 (ties to even), so it = 4 is flat.
    assert lr_multiplier(4, 10, warmup_steps=0) == 1.0 and lr_multiplier(5, 10, warmup_steps=0) < 1.0
    # Warmup wins over warmdown in a short run.
    assert lr_multiplier(30, 40) == pytest.approx(31 / 40)


def test_muon_momentum():
    N = 2000
    Wd = round(0.65 * N)
    assert muon_momentum(0, N) == pytest.approx(0.85)
    assert muon_momentum(200, N) == pytest.approx(0.91)
    assert muon_momentum(400, N) == pytest.approx(0.97)
    assert muon_momentum(N - Wd - 1, N) == pytest.approx(0.97)
    assert muon_momentum(N - Wd, N) == pytest.approx(0.97)
    assert muon_momentum(N - Wd // 2, N) == pytest.approx(0.935)
    assert muon_momentum(N, N) == pytest.approx(0.90)
    # it < 400 takes precedence over the warmdown for short runs.
    assert muon_momentum(100, 200) == pytest.approx(0.85 + 0.25 * 0.12)


def test_muon_weight_decay():
    N, wd = 1000, 0.28
    assert muon_weight_decay(0, N, wd) == pytest.approx(wd)
    assert muon_weight_decay(N // 2, N, wd) == pytest.approx(wd / 2)
    assert muon_weight_decay(N, N, wd) == pytest.approx(0.0, abs=1e-15)
    assert muon_weight_decay(250, N, wd) == pytest.approx(wd * 0.5 * (1 + math.cos(math.pi / 4)))


def test_apply_schedules_sets_groups():
    cfg = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    opt = setup_optimizer(GPT(cfg, dtype=torch.float32), weight_decay=0.5)
    N, it, wd = 1000, 900, 0.3
    apply_schedules(opt, it, N, wd)
    lrm, mom, w = lr_multiplier(it, N), muon_momentum(it, N), muon_weight_decay(it, N, wd)
    assert lrm < 1 and mom < 0.97 and 0 < w < wd
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["initial_lr"] * lrm)
        if g["kind"] == "muon":
            assert g["momentum"] == mom and g["weight_decay"] == w
        else:
            assert "momentum" not in g and g["weight_decay"] in (0.01, 0.001, 0.05, 0.0)


# ---------------------------------------------------------------- convergence


def test_convergence_on_quadratic():
    gen = torch.Generator().manual_seed(7)
    shapes_adamw = [(4,), (300, 64)]
    shapes_muon = [(32, 64), (64, 32)]
    targets = [0.1 * torch.randn(s, generator=gen) for s in shapes_adamw + shapes_muon]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes_adamw + shapes_muon]
    opt = MuonAdamW(
        [
            {"kind": "adamw", "params": params[:2], "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-10,
             "weight_decay": 0.0},  # fmt: skip
            muon_group([params[2]], lr=0.05),
            muon_group([params[3]], lr=0.05),
        ]
    )
    d0 = [torch.linalg.vector_norm(p - t).item() for p, t in zip(params, targets)]
    for _ in range(50):
        loss = sum(((p - t) ** 2).sum() for p, t in zip(params, targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p, t, d in zip(params, targets, d0):
        assert torch.isfinite(p).all()
        assert torch.linalg.vector_norm(p - t).item() < 0.5 * d
