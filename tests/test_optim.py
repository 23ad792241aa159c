"""nanochat's MuonAdamW in Optax: groups, schedules, Polar Express, and state (parity with torch_ref: test_optim_torch.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanochat_jax import model, optim
from nanochat_jax.config import GPTConfig

CFG = GPTConfig(sequence_len=64, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)


def test_schedules_match_spec_formulas():
    N = 1000  # warmdown = 650 steps, starting after step 350
    lrm = lambda it: float(optim.lr_multiplier(it, N))  # noqa: E731
    assert lrm(0) == pytest.approx(1 / 40) and lrm(20) == pytest.approx(21 / 40) and lrm(39) == pytest.approx(1.0)
    assert lrm(40) == lrm(350) == 1.0
    assert lrm(351) == pytest.approx((649 / 650) + (1 / 650) * 0.05)
    assert lrm(1000) == pytest.approx(0.05) and lrm(675) == pytest.approx(0.5 + 0.5 * 0.05)
    mom = lambda it: float(optim.muon_momentum(it, 2 * N))  # noqa: E731  (warmdown 1300 steps, from 700)
    assert mom(0) == pytest.approx(0.85) and mom(200) == pytest.approx(0.91) and mom(399) == pytest.approx(0.85 + 0.12 * 399 / 400)
    assert mom(400) == mom(699) == pytest.approx(0.97) and mom(2000) == pytest.approx(0.90)
    assert mom(700 + 650) == pytest.approx(0.935)
    # the first-400-steps ramp wins over the warmdown when both apply (short runs)
    assert float(optim.muon_momentum(10, 100)) == pytest.approx(0.85 + 0.12 * 10 / 400)
    wd = lambda it: float(optim.muon_weight_decay(it, N, 0.2))  # noqa: E731
    assert wd(0) == pytest.approx(0.2) and wd(500) == pytest.approx(0.1) and wd(1000) == pytest.approx(0.0, abs=1e-9)


def test_changing_the_step_does_not_recompile():
    params = model.init_params(CFG, jax.random.key(0))
    tx = optim.make_optimizer(CFG, num_iterations=20, weight_decay=0.1)
    grads = jax.tree.map(jnp.ones_like, params)
    step = jax.jit(lambda p, s: tx.update(grads, s, p))
    state = tx.init(params)
    lrs = []
    for _ in range(5):
        updates, state = step(params, state)
        lrs.append(float(jnp.abs(updates["wte"]).max()))
    assert step._cache_size() == 1
    assert lrs[0] < lrs[1] < lrs[2]  # warmup really advanced inside the one compiled update


def test_param_groups_and_labels():
    params = model.init_params(CFG, jax.random.key(0))
    labels = optim.param_labels(params)
    assert labels["wte"] == "wte" and labels["lm_head"]["kernel"] == "lm_head"
    assert labels["ve_0"] == labels["ve_2"] == "value_embeds"
    assert labels["smear_gate"]["kernel"] == labels["smear_lambda"] == labels["backout_lambda"] == "scalars"
    assert labels["h_2"]["attn"]["ve_gate"]["kernel"] == "muon" and labels["h_1"]["mlp"]["c_fc"]["kernel"] == "muon"
    groups = optim.adamw_groups(GPTConfig(n_embd=1536, n_head=12, n_kv_head=12), unembedding_lr=0.008,
                                embedding_lr=0.3, scalar_lr=0.5)
    s = (1536 / 768) ** -0.5
    assert groups["lm_head"] == (pytest.approx(0.008 * s), (0.8, 0.96), 0.01)
    assert groups["wte"] == (pytest.approx(0.3 * s), (0.8, 0.995), 0.001)
    assert groups["value_embeds"] == (pytest.approx(0.15 * s), (0.8, 0.995), 0.01)
    assert groups["resid_lambdas"] == (pytest.approx(0.005), (0.8, 0.95), 0.05)
    assert groups["x0_lambdas"] == (0.5, (0.96, 0.95), 0.0)
    assert groups["scalars"] == (0.2, (0.8, 0.95), 0.0)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        optim.make_optimizer(CFG, 10, name="sgd")
    params = model.init_params(CFG, jax.random.key(0))
    params["lora_A"] = jnp.zeros((4, 4))
    with pytest.raises(ValueError, match="parameter lora_A matches no optimizer group"):
        optim.make_optimizer(CFG, 10).init(params)
    with pytest.raises(ValueError, match="num_iterations"):
        optim.make_optimizer(CFG, 0)


def _composed_polynomial(s):
    for a, b, c in optim.POLAR_EXPRESS:
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48), (256, 16), (16, 200)])
def test_polar_express_maps_singular_values_through_nanochat_polynomial(shape):
    X = np.asarray(jax.random.normal(jax.random.key(sum(shape)), shape), np.float64)
    sv_in = np.linalg.svd(X, compute_uv=False)
    want = _composed_polynomial(sv_in / (np.linalg.norm(X) * 1.01 + 1e-6))
    got = np.linalg.svd(np.asarray(optim.polar_express(jnp.asarray(X, jnp.float32)), np.float64), compute_uv=False)
    np.testing.assert_allclose(np.sort(got), np.sort(want), rtol=2e-4, atol=2e-5)
    # the band nanochat's coefficients produce: nothing above ~1.14; well-conditioned shapes land near 1
    assert got.max() < 1.15
    if shape[0] != shape[1]:
        assert got.min() > 0.7
    # the tall and wide branches are the same polynomial
    np.testing.assert_allclose(optim.polar_express(jnp.asarray(X.T, jnp.float32)),
                               np.asarray(optim.polar_express(jnp.asarray(X, jnp.float32))).T, atol=2e-5)


def test_polar_express_in_bf16_stays_in_band():
    X = jax.random.normal(jax.random.key(1), (64, 256))
    out = optim.polar_express(X, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    sv = np.linalg.svd(np.asarray(out.astype(jnp.float32)), compute_uv=False)
    assert 0.7 < sv.min() and sv.max() < 1.2


def test_state_layout_dtypes_and_shapes():
    params = model.init_params(CFG, jax.random.key(0), jnp.bfloat16)
    state = optim.make_optimizer(CFG, 10).init(params)
    inner = state.inner_states
    adam_wte = inner["wte"].inner_state
    assert adam_wte.mu["wte"].dtype == jnp.bfloat16 and adam_wte.nu["wte"].dtype == jnp.bfloat16
    mu = inner["muon"].inner_state
    fc = params["h_0"]["mlp"]["c_fc"]["kernel"]  # (in=C, out=4C): tall in nanochat's terms → per-row stats
    assert mu.momentum["h_0"]["mlp"]["c_fc"]["kernel"].shape == fc.shape
    assert mu.momentum["h_0"]["mlp"]["c_fc"]["kernel"].dtype == jnp.float32
    assert mu.second["h_0"]["mlp"]["c_fc"]["kernel"].shape == (1, 4 * 64)
    assert mu.second["h_0"]["mlp"]["c_proj"]["kernel"].shape == (4 * 64, 1)  # wide (C, 4C): per-column
    assert mu.second["h_0"]["attn"]["c_q"]["kernel"].shape == (1, 64)  # square: per-row
    # no two state leaves share a buffer, so the whole state can be donated to the step
    leaves = jax.tree.leaves(state)
    assert len({id(x) for x in leaves}) == len(leaves)


@pytest.mark.slow  # the 3.12 leg deselects it: ~20 s of compiles
def test_gradient_accumulation_with_multisteps_equals_one_big_step():
    params = model.init_params(CFG, jax.random.key(0))
    params = jax.tree.map(lambda a: a + 0.01, params)
    g1 = jax.tree.map(lambda a: jax.random.normal(jax.random.key(1), a.shape, a.dtype), params)
    g2 = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), a.shape, a.dtype), params)
    tx = optim.make_optimizer(CFG, 10, weight_decay=0.1)
    u, _ = jax.jit(tx.update)(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), tx.init(params), params)
    want = optax.apply_updates(params, u)
    acc = optax.MultiSteps(tx, every_k_schedule=2)
    acc_update = jax.jit(acc.update)
    st = acc.init(params)
    u1, st = acc_update(g1, st, params)
    p1 = optax.apply_updates(params, u1)
    assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    u2, st = acc_update(g2, st, p1)
    got = optax.apply_updates(p1, u2)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_overfits_a_tiny_batch(name):
    cfg = GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    params = model.init_params(cfg, jax.random.key(0))
    tok = np.random.default_rng(0).integers(0, 100, (4, 33))
    tx = optim.make_optimizer(cfg, 30, name=name, weight_decay=0.1, warmup_steps=0)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(model.loss_fn)(p, tok[:, :-1], tok[:, 1:], cfg)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state, losses = tx.init(params), []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(np.log(100), abs=0.05)
    assert losses[-1] < 0.3 * losses[0] and np.isfinite(losses).all()


def test_optimizer_for_applies_dial_scaling():
    from nanochat_jax import scaling
    from nanochat_jax.config import Dial

    dial = Dial(2, head_dim=32, max_seq_len=64, vocab_size=100)
    cfg = dial.config
    B = 2**20
    tx = optim.optimizer_for(cfg, 100, lr_scale=scaling.batch_lr_scale(B), weight_decay=scaling.scaled_weight_decay(dial, B))
    ref = optim.make_optimizer(cfg, 100, unembedding_lr=0.008 * 2**0.5, embedding_lr=0.3 * 2**0.5,
                               matrix_lr=0.02 * 2**0.5, scalar_lr=0.5 * 2**0.5,
                               weight_decay=scaling.scaled_weight_decay(dial, B))
    params = model.init_params(cfg, jax.random.key(0))
    grads = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), params)
    u_a, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    u_b, _ = jax.jit(ref.update)(grads, ref.init(params), params)
    for a, b in zip(jax.tree.leaves(u_a), jax.tree.leaves(u_b)):
        np.testing.assert_array_equal(a, b)


def test_state_is_a_plain_pytree_orbax_saves_and_restores(tmp_path):
    import orbax.checkpoint as ocp

    params = model.init_params(CFG, jax.random.key(0))
    tx = optim.make_optimizer(CFG, 10, weight_decay=0.1)
    grads = jax.tree.map(lambda a: jax.random.normal(jax.random.key(4), a.shape, a.dtype), params)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "opt", state)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(tmp_path / "opt", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
