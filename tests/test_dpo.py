"""DPO/IPO: the loss and its gradients against the torch reference on identical weights (hypothesis),
a hand-computed case, the β → 0 limit, masked tokens, the cached-reference step, and train.dpo end
to end (preference accuracy rises, report, checkpoints that chat_eval/serve load, exact resume
after SIGKILL, clear errors)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from xla_flags import cpu_devices_flags

from nanochat_jax import dpo, model, optim, sharding
from nanochat_jax.checkpoint import COMMIT_MARKER, Checkpointer, load_params
from nanochat_jax.config import GPTConfig
from nanochat_jax.report import read_metrics
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.train_step import init_train_state
from train import dpo as dpo_cli

REPO = Path(__file__).resolve().parents[1]


def pair_batch(rng, P, T, V):
    """2P rows (chosen, rejected interleaved): a shared prompt, then a reply with targets, then padding."""
    tokens = rng.integers(0, V, (2 * P, T)).astype(np.int32)
    targets = np.full((2 * P, T), -1, np.int32)
    for k in range(P):
        n_prompt = int(rng.integers(1, T // 2))
        tokens[2 * k + 1, :n_prompt] = tokens[2 * k, :n_prompt]
        for row in (2 * k, 2 * k + 1):
            end = int(rng.integers(n_prompt + 1, T + 1))
            targets[row, n_prompt - 1:end - 1] = tokens[row, n_prompt:end]
    return tokens, targets


# ---- parity with the torch reference --------------------------------------------------------------


PARITY_CFG = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


@pytest.fixture(scope="module")
def parity_fns():
    """The JAX objective and its gradient, compiled once per loss type (β and ε are traced)."""
    def make(loss_type):
        def f(p, x, y, ref, beta, eps):
            return dpo.dpo_objective(p, x, y, ref, PARITY_CFG, loss_type=loss_type, beta=beta, label_smoothing=eps,
                                     dtype=jnp.float32)[0]
        return jax.jit(jax.value_and_grad(f))
    return {"dpo": make("dpo"), "ipo": make("ipo"),
            "logps": jax.jit(lambda p, x, y: dpo.sequence_logps(p, x, y, PARITY_CFG, dtype=jnp.float32))}


@settings(max_examples=5, deadline=None)
@given(loss_type=st.sampled_from(["dpo", "ipo"]), beta=st.sampled_from([0.05, 0.1, 0.5, 1.0]),
       smoothing=st.sampled_from([0.0, 0.2]), drift=st.sampled_from([0.0, 0.02]), seed=st.integers(0, 2**16))
def test_loss_and_grads_match_torch_reference(parity_fns, loss_type, beta, smoothing, drift, seed):
    """Identical weights and pairs, fp32 CPU: every gradient tensor within 1e-4 relative; the loss within
    1e-6 relative plus what fp32 can resolve of h: a sequence log-prob of ~100 nats is only known to one
    ulp (7.6e-6) in either framework, and that much of h moves the loss by |dL/dh| times it.
    The reference is the policy's weights moved by `drift` (0: the first step of a run)."""
    torch = pytest.importorskip("torch")
    from nanochat_jax.convert import params_from_state_dict, state_dict_from_params
    from nanochat_jax.torch_ref import GPT as TorchGPT
    from nanochat_jax.torch_ref import dpo as tdpo

    smoothing = smoothing if loss_type == "dpo" else 0.0
    torch.manual_seed(seed)
    policy_t = TorchGPT(PARITY_CFG, dtype=torch.float32)
    policy_t.init_weights(seed=seed)
    with torch.no_grad():  # every path on (projections are zero at init)
        for p in policy_t.parameters():
            p.add_(torch.randn_like(p) * (0.5 / np.sqrt(p.shape[-1]) if p.ndim == 2 else 0.1))
    ref_t = TorchGPT(PARITY_CFG, dtype=torch.float32)
    ref_t.load_state_dict(policy_t.state_dict())
    with torch.no_grad():
        for p in ref_t.parameters():
            p.add_(torch.randn_like(p) * drift)
    x, y = pair_batch(np.random.default_rng(seed), 3, 24, PARITY_CFG.vocab_size)
    xt, yt = torch.from_numpy(x).long(), torch.from_numpy(y).long()
    with torch.no_grad():
        ref_logps_t = tdpo.sequence_logps(ref_t, xt, yt)
    loss_t = tdpo.preference_loss(policy_t, xt, yt, ref_logps_t, loss_type=loss_type, beta=beta,
                                  label_smoothing=smoothing)
    loss_t.backward()
    grads_t = {k: p.grad.numpy() for k, p in policy_t.named_parameters()}

    ref_params = jax.tree.map(jnp.asarray, params_from_state_dict(ref_t.state_dict(), PARITY_CFG))
    np.testing.assert_allclose(np.asarray(parity_fns["logps"](ref_params, x, y)), ref_logps_t.numpy(), rtol=1e-6)
    params = jax.tree.map(jnp.asarray, params_from_state_dict(policy_t.state_dict(), PARITY_CFG))
    loss_j, grads = parity_fns[loss_type](params, x, y, ref_logps_t.numpy(), beta, smoothing)
    lt = ref_logps_t.numpy()
    h = np.asarray(parity_fns["logps"](params, x, y)).reshape(-1, 2) @ [1, -1] - lt.reshape(-1, 2) @ [1, -1]
    dl_dh = np.abs(beta if loss_type == "dpo" else 2 * (h - 1 / (2 * beta))).max()
    h_resolution = 4 * float(np.spacing(np.float32(np.abs(lt).max() * 1.01)))
    assert abs(float(loss_j) - loss_t.item()) <= 1e-6 * abs(loss_t.item()) + dl_dh * h_resolution
    grads_j = state_dict_from_params(grads, PARITY_CFG)
    assert set(grads_j) == set(grads_t)
    # relative 1e-4 per tensor, above a floor of 1e-6 of the global norm (a few tensors' true gradient is 0)
    floor = 1e-6 * np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads_t.values()))
    for k, g_t in grads_t.items():
        err = np.linalg.norm(np.asarray(grads_j[k], np.float64) - g_t)
        assert err <= 1e-4 * np.linalg.norm(g_t) + floor, k


@settings(max_examples=60, deadline=None)
@given(logps=st.lists(st.floats(-300, -0.25, width=32), min_size=8, max_size=8), loss_type=st.sampled_from(["dpo", "ipo"]),
       beta=st.floats(0.01, 2.0), smoothing=st.sampled_from([0.0, 0.1, 0.3]))
def test_loss_formula_matches_torch_on_identical_logps(logps, loss_type, beta, smoothing):
    """The loss layer alone (identical log-probs in): within 1e-6 relative of the papers' formulas in torch,
    plus the fp32 rounding of h (4 ulp of the largest log-prob, times |dL/dh|): the two sides add the
    four log-probs in different orders."""
    torch = pytest.importorskip("torch")
    from nanochat_jax.torch_ref import dpo as tdpo

    smoothing = smoothing if loss_type == "dpo" else 0.0
    a = np.asarray(logps, np.float32).reshape(4, 2)
    pc, pr, rc, rr = a[:2, 0], a[:2, 1], a[2:, 0], a[2:, 1]
    got = np.asarray(dpo.preference_loss(*map(jnp.asarray, (pc, pr, rc, rr)), loss_type=loss_type, beta=beta,
                                         label_smoothing=smoothing)[0], np.float64)
    t = [torch.from_numpy(v) for v in (pc, pr, rc, rr)]
    want = (tdpo.dpo_loss(*t, beta, smoothing) if loss_type == "dpo" else tdpo.ipo_loss(*t, beta)).double().numpy()
    h = (pc.astype(np.float64) - rc) - (pr - rr)
    dl_dh = np.full_like(h, beta) if loss_type == "dpo" else 2 * np.abs(h - 1 / (2 * beta))
    h_resolution = 4 * float(np.spacing(np.float32(np.abs(a).max())))
    assert np.all(np.abs(got - want) <= 1e-6 * np.abs(want) + dl_dh * h_resolution + 1e-12)


def test_hand_computed_pair():
    """π_c = −1, π_r = −2, ref −1.5 each: h = 1."""
    pc, pr, rc, rr = (jnp.asarray([v]) for v in (-1.0, -2.0, -1.5, -1.5))
    loss, rew_c, rew_r = dpo.preference_loss(pc, pr, rc, rr, loss_type="dpo", beta=0.5)
    assert float(loss[0]) == pytest.approx(math.log(1 + math.exp(-0.5)), rel=1e-6)
    assert (float(rew_c[0]), float(rew_r[0])) == pytest.approx((0.25, -0.25))
    smoothed = dpo.preference_loss(pc, pr, rc, rr, loss_type="dpo", beta=0.5, label_smoothing=0.1)[0]
    assert float(smoothed[0]) == pytest.approx(0.9 * math.log(1 + math.exp(-0.5)) + 0.1 * math.log(1 + math.exp(0.5)))
    assert float(dpo.preference_loss(pc, pr, rc, rr, loss_type="ipo", beta=0.5)[0][0]) == pytest.approx(0.0)
    assert float(dpo.preference_loss(pc, pr, rc, rr, loss_type="ipo", beta=0.25)[0][0]) == pytest.approx(1.0)
    # dL/dπ_c = −β σ(−βh) for DPO; 2(h − 1/2β) for IPO
    g = jax.grad(lambda a: dpo.preference_loss(a, pr, rc, rr, loss_type="dpo", beta=0.5)[0].sum())(pc)
    assert float(g[0]) == pytest.approx(-0.5 / (1 + math.exp(0.5)), rel=1e-6)
    g = jax.grad(lambda a: dpo.preference_loss(a, pr, rc, rr, loss_type="ipo", beta=0.25)[0].sum())(pc)
    assert float(g[0]) == pytest.approx(2 * (1 - 2), rel=1e-6)
    m = dpo.pair_metrics(*[jnp.asarray(v) for v in ([0.1, 0.2, 0.3], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0],
                                                    [-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0])])
    assert float(m["reward_acc"]) == pytest.approx(0.5) and float(m["margin"]) == pytest.approx(0.0)


CFG = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda p: np.asarray(p) + 0.02 * rng.standard_normal(p.shape).astype(p.dtype),
                          jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(4)))
    x, y = pair_batch(np.random.default_rng(0), 3, 32, 64)
    logps = jax.jit(dpo.sequence_logps, static_argnums=3)(params, x, y, CFG)
    ref = np.asarray(logps) - np.asarray([0.3, -0.2, 0.5, 0.1, -0.4, 0.2], np.float32)
    return params, x, y, ref


def test_beta_to_zero_is_log2_with_gradient_half_beta_grad_h(tiny):
    params, x, y, ref = tiny
    beta = 1e-6
    loss, g = jax.jit(jax.value_and_grad(lambda p: dpo.dpo_objective(p, x, y, ref, CFG, beta=beta)[0]))(params)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)

    def mean_h(p):
        lp = dpo.sequence_logps(p, x, y, CFG).reshape(-1, 2)
        return (lp[:, 0] - lp[:, 1]).mean()
    g_h = jax.jit(jax.grad(mean_h))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_h)):  # ∇L → −(β/2)·∇h as β → 0
        np.testing.assert_allclose(np.asarray(a) / beta, -0.5 * np.asarray(b), rtol=1e-3, atol=1e-4)


def test_masked_tokens_get_zero_gradient(tiny):
    """Token ids that occur only after the replies (padding: no target, and no later position with a
    target reads them) get exactly zero embedding and value-embedding gradient, and changing them
    changes nothing; a fully masked batch has zero gradient everywhere."""
    params, x, y, ref = tiny
    T = x.shape[1]
    last = np.array([np.nonzero(r >= 0)[0].max() for r in y])  # input last+1 is the last target's answer
    pad = np.arange(T)[None] > last[:, None] + 1
    assert pad.any()
    x2 = np.where(pad, 63, np.where(x == 63, 62, x)).astype(np.int32)  # 63 only in the padding
    grad = jax.jit(jax.grad(lambda p, xx, yy: dpo.dpo_objective(p, xx, yy, ref, CFG)[0]))
    g = grad(params, x2, y)
    assert float(jnp.abs(g["wte"][63]).max()) == 0.0 and float(jnp.abs(g["ve_1"][63]).max()) == 0.0
    assert float(jnp.abs(g["wte"][x2[0, 0]]).max()) > 0  # a prompt token is context: it does get gradient
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grad(params, np.where(pad, 61, x2).astype(np.int32), y))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    g0 = grad(params, x2, np.full_like(y, -1))
    assert all(float(jnp.abs(leaf).max()) == 0.0 for leaf in jax.tree.leaves(g0))


def test_cached_reference_step_equals_reference_params_step(tiny):
    params, x, y, _ = tiny
    params = jax.device_get(params)  # host copies: each state below is donated to its step
    mesh = sharding.make_mesh("data=2", devices=jax.devices()[:2])
    tx = optax.sgd(0.5)  # any optax transform; plain SGD compiles in a fraction of Muon's time
    ref_params = jax.tree.map(lambda p: p * 0.99, params)
    xs, ys = np.stack([x, x[::-1]]), np.stack([y, y[::-1]])  # 2 micro-steps; reversed rows keep pairs together
    s1, m1 = dpo.make_dpo_step(CFG, tx, mesh, beta=0.2, with_reference=True)(
        init_train_state(CFG, tx, mesh, None, params=params), jax.device_put(ref_params), xs, ys, 0.5)
    cached = np.asarray(m1["ref_logps"])
    assert cached.shape == (2, 6)
    want = jax.jit(dpo.sequence_logps, static_argnums=3)(ref_params, x, y, CFG)
    np.testing.assert_allclose(cached[0], np.asarray(want), rtol=1e-5)
    s2, m2 = dpo.make_dpo_step(CFG, tx, mesh, beta=0.2, with_reference=False)(
        init_train_state(CFG, tx, mesh, None, params=params), cached, xs, ys, 0.5)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(params)))
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo.make_dpo_step(CFG, tx, mesh, beta=0.0, with_reference=True)


# ---- train.dpo end to end ------------------------------------------------------------------------

QA = [("What colour is the sky?", "The sky is blue."), ("Say hello.", "Hello there, friend!"),
      ("Count to three.", "One, two, three."), ("Name a fruit.", "An apple is a fruit."),
      ("What do cats say?", "Cats say meow."), ("Where is Paris?", "Paris is in France.")]
RUDE = ["No.", "Go away.", "I refuse to answer.", "Ask someone else.", "Not telling you.", "Whatever, human."]


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory):
    """A tokenizer, a random-init 'SFT run' checkpoint, pairs (chosen = the answer, rejected = a rude reply).
    (At init the blocks' output projections are 0, so the model ignores context: another question's
    answer as the rejected reply would be unlearnable for it in a few steps.)"""
    d = tmp_path_factory.mktemp("dpo")
    tok = Tokenizer.train([t for qa in QA for t in qa] * 20 + RUDE * 20, 300)
    tok.save(d / "tok")
    cfg = GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                    window_pattern="L")
    tx = optim.make_optimizer(cfg, 10)
    state = init_train_state(cfg, tx, sharding.make_mesh("data=-1"), jax.random.key(0))
    convs = d / "convs.jsonl"
    convs.write_text("".join(json.dumps([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) + "\n"
                             for q, a in QA))
    meta = {"step": 7, "model_config": cfg.to_dict(), "max_seq_len": 32,
            "inherited": {"embedding_lr": 0.3, "unembedding_lr": 0.01, "matrix_lr": 0.03},
            "user_config": {"val_mixture": f"jsonl={convs}"}}
    with Checkpointer(d / "sft" / "checkpoints", async_save=False) as ckpt:
        ckpt.save(7, state, meta=meta)
    pairs = [{"prompt": q, "chosen": a, "rejected": RUDE[i]} for i, (q, a) in enumerate(QA)]
    (d / "tasks" / "ARC-Easy").mkdir(parents=True)
    (d / "tasks" / "ARC-Easy" / "test.jsonl").write_text(json.dumps(
        {"id": "a", "question": "Say hello.", "choices": {"text": ["hi", "no"], "label": ["A", "B"]}, "answerKey": "A"}))
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return d, tok


def common_args(d, out, *extra):
    return ["--sft-dir", str(d / "sft"), "--tokenizer-dir", str(d / "tok"), "--out-dir", str(out),
            "--mixture", f"jsonl={d / 'pairs.jsonl'}", "--device-batch-size", "1", "--pairs-per-step", "8",
            "--chatcore-every", "-1", *extra]  # 8 (fake) devices: 8 pairs per micro-step


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_dpo_raises_preference_accuracy_and_writes_a_loadable_model(dpo_setup, tmp_path, capsys):
    d, tok = dpo_setup
    out = tmp_path / "run"
    dpo_cli.main(common_args(d, out, "--val-mixture", f"jsonl={d / 'pairs.jsonl'}", "--epochs", "16", "--beta", "0.5",
                             "--init-lr-frac", "0.1", "--eval-every", "6", "--eval-tokens", "256",
                             "--chatcore-every", "0", "--chatcore-tasks", "ARC-Easy", "--task-data-dir", str(d / "tasks")))
    printed = capsys.readouterr().out
    assert "held-out preference accuracy (implicit reward): 50.0% -> 100.0%" in printed, printed
    records = read_metrics(out / "metrics.jsonl")
    acc = [r["pref/acc"] for r in records if "pref/acc" in r]
    assert acc[0] == 0.5 and acc[-1] == 1.0 and len(acc) == 3  # steps 0, 6, 12
    logp_acc = [r["pref/logp_acc"] for r in records if "pref/logp_acc" in r]
    assert logp_acc[-1] > logp_acc[0]
    assert [r["step"] for r in records if "train/loss_raw" in r] == list(range(12))
    bpb = [r["val/bpb"] for r in records if "val/bpb" in r]
    assert len(bpb) == 3 and all(np.isfinite(bpb))  # the SFT run's own val mixture, by default
    assert [r["step"] for r in records if "chatcore/ARC-Easy" in r] == [0, 12]  # before and after
    report = (out / "report.md").read_text()
    assert "held-out acc | 0.5000 -> 1.0000" in report and "SFT val bpb" in report and "| ChatCORE |" in report
    for png in ("reward_acc.png", "margin.png", "chosen_logp.png", "rejected_logp.png", "heldout_acc.png"):
        assert (out / png).stat().st_size > 1000
    params, config, meta = load_params(out)  # what chat_eval --checkpoint, serve.app and serve.cli call
    assert meta["step"] == 12 and meta["start"]["step"] == 7 and config.sequence_len == 32
    from nanochat_jax.checkpoint import load_engine
    engine = load_engine(str(out / "checkpoints"), False, str(d / "tok"))
    assert engine.complete(tok.render_for_completion({"messages": [{"role": "user", "content": "Say hello."}]}),
                           max_tokens=4, temperature=0.0)


@pytest.mark.slow
def test_exact_resume_after_sigkill(dpo_setup, tmp_path):
    """A run SIGKILLed mid-flight, resumed from its last complete checkpoint, logs exactly the losses of a run
    that never stopped. Two epochs over 6 pairs, so the cached reference (in the data state) is exercised."""
    d, _ = dpo_setup
    args = common_args(d, tmp_path / "killed", "--val-mixture", "none", "--sft-val-mixture", "none",
                       "--epochs", "2", "--warmdown-ratio", "0")  # flat LR: the step count does not change the path
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": cpu_devices_flags(8)}
    proc = subprocess.Popen([sys.executable, "-m", "train.dpo", *args, "--num-iterations", "100000", "--save-every", "2"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while not any((p / COMMIT_MARKER).exists() for p in ckpts.glob("[0-9]*")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Checkpointer(ckpts, async_save=False) as c:
        last = c.latest_step()
    assert last is not None and last >= 2
    n = last + 4
    dpo_cli.main([*args, "--num-iterations", str(n), "--resume"])
    dpo_cli.main([*common_args(d, tmp_path / "straight", "--val-mixture", "none", "--sft-val-mixture", "none",
                               "--epochs", "2", "--warmdown-ratio", "0"), "--num-iterations", str(n)])
    runs = {}
    for run in ("killed", "straight"):
        for r in read_metrics(tmp_path / run / "metrics.jsonl"):
            if "train/loss_raw" in r and r["step"] < n:
                runs.setdefault(run, {})[r["step"]] = (r["train/loss_raw"], r["train/margin"])
    assert runs["killed"] == runs["straight"] and sorted(runs["straight"]) == list(range(n))
    a, _, _ = load_params(tmp_path / "killed")
    b, _, _ = load_params(tmp_path / "straight")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_errors(dpo_setup, tmp_path):
    d, _ = dpo_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    cases = [(["--mixture", f"jsonl={bad}"], r"bad\.jsonl line 2: missing field 'chosen'"),
             (["--beta", "0"], "beta must be > 0"),
             (["--loss", "ipo", "--label-smoothing", "0.1"], "dpo loss only"),
             (["--pairs-per-step", "3"], "not a multiple of one micro-step"),
             (["--sft-dir", str(tmp_path / "none")], "cannot load the starting checkpoint"),
             (["--resume"], "no complete checkpoint")]
    for extra, msg in cases:
        args = common_args(d, tmp_path / "o", "--val-mixture", "none", "--sft-val-mixture", "none")
        with pytest.raises(SystemExit, match=msg):
            dpo_cli.main([*args, *extra])
    # one directory, one run: an earlier run's files are refused, and --overwrite moves them aside
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "metrics.jsonl").write_text("{}\n")
    args = common_args(d, tmp_path / "held", "--val-mixture", "none", "--sft-val-mixture", "none")
    with pytest.raises(SystemExit, match="already holds a run"):
        dpo_cli.main(args)
    with pytest.raises(SystemExit, match="contradict"):
        dpo_cli.main([*args, "--resume", "--overwrite"])


def test_speedrun_dpo_stage_flags():
    """DPO=1 bash runs/gpu_speedrun.sh adds train.dpo (flags it accepts) and its chat_eval after SFT."""
    import shlex

    env = {**os.environ, "DRY_RUN": "1", "NANOCHAT_JAX_HOME": "/nc", "DEPTH": "20"}
    def modules(**extra):
        out = subprocess.run(["bash", "runs/gpu_speedrun.sh"], cwd=REPO, capture_output=True, text=True, check=True,
                             env={**env, **extra}).stdout
        return [shlex.split(line[2:].rstrip(" &")) for line in out.splitlines() if line.startswith("+ ")]
    cmds = modules(DPO="1")
    names = [c[2] for c in cmds]
    i = names.index("train.dpo")
    assert names[i - 2:i] == ["train.sft", "train.chat_eval"] and names[i + 1] == "train.chat_eval"
    args = dpo_cli.parse_args(cmds[i][3:])
    assert (args.sft_dir, args.mesh, args.model_tag) == ("/nc/chatsft_checkpoints/d20", "fsdp=-1", "d20")
    assert args.mixture.startswith("hh-rlhf@train") and args.val_mixture.startswith("hh-rlhf@test")
    assert "/nc/chatdpo_checkpoints/d20" in cmds[i + 1]
    assert "train.dpo" not in [c[2] for c in modules()]  # only when asked


def test_cpu_demo_dpo_stage_flags():
    """The main job's DPO stage (runs/cpu_demo.sh) passes flags train.dpo accepts, on the offline pairs."""
    import shlex

    text = (REPO / "runs" / "cpu_demo.sh").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "-m train.dpo" in ln)
    argv = shlex.split(line.replace("$PY", "python").replace("$NANOCHAT_JAX_HOME", "/h").replace("$TOK", "/h/tok"))
    args = dpo_cli.parse_args(argv[argv.index("train.dpo") + 1:])
    assert args.sft_dir == "/h/chatsft_checkpoints/d4" and args.out_dir == "/h/chatdpo_checkpoints/d4"
    assert (args.mixture, args.val_mixture) == ("chatterbot-pairs[:-100]", "chatterbot-pairs[-100:]")
    assert "chatdpo_checkpoints" in text.split("-m train.dpo")[1]  # the chat stage also answers with the DPO model
