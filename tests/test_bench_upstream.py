"""bench --nanochat-src: upstream's Engine and training step beside ours (bench/upstream.py):
bench.decode, bench.prefix, bench.quant and bench.train.

A fake checkout written here (a tiny `nanochat` package shaped like upstream's) keeps these tests
independent of a fetched one; NANOCHAT_SRC=<a real checkout> adds the parity tests against it.
"""

import contextlib
import io
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench import decode, prefix, quant, train, upstream  # noqa: E402
from nanochat_jax.scheduler import Engine, Scheduler  # noqa: E402
from nanochat_jax.config import config_for_depth  # noqa: E402

TINY = ["--depth", "1", "--seq-len", "32", "--vocab-size", "256", "--prompt-tokens", "5", "--new-tokens", "6",
        "--streams", "2", "--steps-per-call", "1", "--repeats", "1", "--torch-threads", "1", "--no-torch"]
TINY_TRAIN = ["--depth", "1", "--seq-len", "16", "--batch-size", "8", "--vocab-size", "256", "--warmup", "0",
              "--iters", "1", "--framework", "jax"]

FAKE = {
    "__init__.py": "",
    "optim.py": "",
    "common.py": """
import os, torch
COMPUTE_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}[os.environ.get("NANOCHAT_DTYPE", "float32")]
""",
    "gpt.py": """
import torch, torch.nn.functional as F

class GPT(torch.nn.Module):
    def __init__(self, state_dict, config):
        super().__init__()
        self.config = config
        self.wte = torch.nn.Parameter(state_dict["transformer.wte.weight"].clone())
        self.head = torch.nn.Parameter(state_dict["lm_head.weight"].clone())

    def forward(self, idx, targets):
        return F.cross_entropy((self.wte[idx] @ self.head.T).flatten(0, 1), targets.flatten())

    def setup_optimizer(self, weight_decay=0.0):
        return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=weight_decay)
""",
    "checkpoint_manager.py": """
import json, os, torch
from nanochat.gpt import GPT

def get_tokenizer():
    raise FileNotFoundError("no trained tokenizer in this cache dir")

def build_model(checkpoint_dir, step, device, phase):
    sd = torch.load(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"), map_location=device)
    with open(os.path.join(checkpoint_dir, f"meta_{step:06d}.json")) as f:
        meta = json.load(f)
    tok = get_tokenizer()
    assert tok.get_vocab_size() == meta["model_config"]["vocab_size"]
    return GPT(sd, meta["model_config"]), tok, meta
""",
    # what it emits per prompt length ("len<n>") or else per num_samples is planted by the test in tokens.json
    "engine.py": """
import json
from pathlib import Path

class Engine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        assert temperature == 0.0 and self.tokenizer.encode_special("<|assistant_end|>") >= 0
        planted = json.loads(Path(__file__).with_name("tokens.json").read_text())
        out = planted.get(f"len{len(tokens)}") or planted[str(num_samples)]
        for t in out[:max_tokens]:
            yield [t] * num_samples, [1] * num_samples
""",
}


def fake_checkout(root, tokens=None):
    (root / "nanochat").mkdir(parents=True)
    for name, text in FAKE.items():
        (root / "nanochat" / name).write_text(text)
    (root / "nanochat" / "tokens.json").write_text(json.dumps(tokens or {}))
    return root


def our_greedy_tokens():
    """What bench.decode's Engine row decodes for TINY's first prompt (the same seeds as main)."""
    config = config_for_depth(1, max_seq_len=32, vocab_size=256)
    tok = decode.BenchTokenizer(config.vocab_size)
    prompt = np.random.default_rng(0).integers(0, tok.n_text, (8, 5)).tolist()[0]
    eng = Engine(decode.make_params(config), config, tok)
    return [col[0] for col, _ in eng.generate(prompt, max_tokens=6, temperature=0.0)]


def lines(text):
    return [json.loads(s) for s in text.splitlines() if s.startswith("{")]


@pytest.fixture(scope="module")
def decode_run(tmp_path_factory):
    """One bench.decode run on the fake: batch 1 gives our tokens, batch 8 gives others."""
    ours = our_greedy_tokens()
    src = fake_checkout(tmp_path_factory.mktemp("fake"), {"1": ours, "8": [t + 1 for t in ours]})
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        decode.main(TINY + ["--streams", "2", "8", "--nanochat-src", str(src)])
    return lines(out.getvalue()), err.getvalue()


@pytest.mark.slow  # the 3.12 leg deselects it: bench plumbing, ~40 s of decode_run
def test_decode_lines_carry_both_sides_and_the_ratio(decode_run):
    rows, _ = decode_run
    impls = {(r.get("impl"), r.get("batch")) for r in rows}
    assert {("jax-engine", 1), ("jax-scheduler", 2), ("upstream-engine", 1), ("upstream-engine", 8)} <= impls
    up = [r for r in rows if r.get("impl") == "upstream-engine"]
    assert all(r["tok_per_s"] > 0 and r["ms_per_step"] > 0 and r["ttft_s"] > 0 for r in up)
    assert all(r["compute_dtype"] == "float32" for r in up)
    summary = rows[-1]["batch1"]
    assert summary["ours_over_upstream"] == pytest.approx(summary["ours"] / summary["upstream"])
    # no figure written into the bench (upstream's 470 tok/s once was): the keys and text only name rows
    keys = [k for b in ("batch1", "batch8") for k in rows[-1][b]]
    assert not any("470" in k for k in keys + [rows[-1]["summary"]]) and not hasattr(decode, "UPSTREAM")


@pytest.mark.slow  # the 3.12 leg deselects it: bench plumbing (decode_run)
def test_decode_counts_batch_8_both_ways(decode_run):
    """8 samples of one prompt (upstream's counting: one prefill, 8 slots) beside 8 different prompts."""
    rows, _ = decode_run
    (samples,) = [r for r in rows if r.get("impl") == "jax-engine-samples"]
    assert samples["batch"] == 8 and samples["prompts"] == 1 and samples["tokens"] == 8 * 6
    assert samples["tokens_match"] is True and samples["tok_per_s"] > 0  # greedy: every sample is batch 1's
    (sched8,) = [r for r in rows if r.get("impl") == "jax-scheduler" and r["batch"] == 8]
    (up8,) = [r for r in rows if r.get("impl") == "upstream-engine" and r["batch"] == 8]
    assert sched8["prompts"] == 8 and up8["prompts"] == 1
    s = rows[-1]["batch8"]
    assert s["ours_samples"] == samples["tok_per_s"] and s["ours_prompts"] == sched8["tok_per_s"]
    assert s["upstream_samples"] == up8["tok_per_s"]
    assert s["samples_over_upstream"] == pytest.approx(samples["tok_per_s"] / up8["tok_per_s"])
    assert s["prompts_over_upstream"] == pytest.approx(sched8["tok_per_s"] / up8["tok_per_s"])
    assert "jax-engine-samples" in rows[-1]["summary"] and "jax-scheduler" in rows[-1]["summary"]


@pytest.mark.slow  # the 3.12 leg deselects it: bench plumbing (decode_run)
def test_decode_token_match_and_mismatch_are_reported(decode_run):
    rows, err = decode_run
    by_batch = {r["batch"]: r for r in rows if r.get("impl") == "upstream-engine"}
    assert by_batch[1]["tokens_match"] is True
    assert by_batch[8]["tokens_match"] is False
    errors = [r for r in rows if "error" in r]
    assert len(errors) == 1 and errors[0]["batch"] == 8 and errors[0]["rows_differing"] == 8
    assert errors[0]["first_diff_at"] == 0 and "ERROR" in err


@pytest.mark.parametrize("bench", [decode, prefix, quant, train])
def test_missing_or_invalid_checkout_is_one_clear_line(tmp_path, bench):
    for src in (tmp_path / "absent", tmp_path):
        with pytest.raises(SystemExit) as e:
            bench.main(["--nanochat-src", str(src)])
        msg = str(e.value.code)
        assert "\n" not in msg and "not a nanochat checkout" in msg and "git clone" in msg


def test_a_failing_upstream_is_one_clear_line(tmp_path):
    src = fake_checkout(tmp_path)
    (src / "nanochat" / "engine.py").write_text("import wandb\n")
    config = config_for_depth(1, max_seq_len=32, vocab_size=256)
    with pytest.raises(SystemExit) as e:
        upstream.run(src, decode.make_params(config), config, dict(mode="decode", vocab_size=256))
    msg = str(e.value.code)
    assert "\n" not in msg and "failed" in msg and "wandb" in msg


@pytest.mark.slow  # two compiles: our step and torch.compile of the fake
def test_train_lines_carry_both_sides(tmp_path, capsys):
    train.main(TINY_TRAIN + ["--nanochat-src", str(fake_checkout(tmp_path))])
    rows = lines(capsys.readouterr().out)
    jax_row, up_row, ratio = rows
    assert jax_row["framework"] == "jax" and up_row["framework"] == "upstream+compile"
    assert up_row["step_s"] > 0 and np.isfinite(up_row["first_loss"])
    assert ratio["speedup_of_jax_over_upstream"] == pytest.approx(up_row["step_s"] / jax_row["step_s"])


TINY_PREFIX = ["--depth", "1", "--seq-len", "128", "--vocab-size", "256", "--turns", "3", "--tokens", "10", "8", "3",
               "--repeats", "1", "--torch-threads", "1"]


def our_first_tokens():
    """Each turn's prompt length and our greedy first reply token, as bench.prefix's TINY_PREFIX run has them."""
    config = config_for_depth(1, max_seq_len=128, vocab_size=256)
    tok = decode.BenchTokenizer(config.vocab_size)
    rng = np.random.default_rng(0)
    turns = [rng.integers(0, tok.n_text, n).tolist() for n in [10, 8, 8, 8]]
    sched = Scheduler(Engine(decode.make_params(config), config, tok), slots=1, thread=False)
    return [(len(p), first) for p, _, _, first in prefix.converse(sched, turns, 3)]


@pytest.mark.slow  # our conversation twice (here and in the bench), upstream's in a subprocess
def test_prefix_puts_upstream_ttft_beside_ours(tmp_path, capsys):
    ours = our_first_tokens()
    assert [n for n, _ in ours] == [18, 29, 40]
    wrong = (ours[1][1] + 1) % 200  # turn 2 planted wrong: its mismatch must show
    planted = {f"len{n}": [wrong if k == 1 else first] for k, (n, first) in enumerate(ours)}
    prefix.main(TINY_PREFIX + ["--nanochat-src", str(fake_checkout(tmp_path, planted))])
    rows = lines(capsys.readouterr().out)
    up = [r for r in rows if r.get("mode") == "upstream"]
    assert [(r["turn"], r["prompt_tokens"]) for r in up] == [(1, 18), (2, 29), (3, 40)]
    assert [r["first_token_match"] for r in up] == [True, False, True]
    side = [r for r in rows if "side_by_side" in r]
    cold = {r["turn"]: r["ttft_s"] for r in rows if r.get("mode") == "cold"}
    reuse = {r["turn"]: r["ttft_s"] for r in rows if r.get("mode") == "reuse" and "turn" in r}
    for r, u in zip(side, up):
        assert r["ttft_upstream_s"] == u["ttft_s"] >= 0  # the fake answers in microseconds: 0.0 at 4 decimals
        assert (r["ttft_cold_s"], r["ttft_reuse_s"]) == (cold[r["side_by_side"]], reuse[r["side_by_side"]])
        # the ratio is of the unrounded upstream time (printed at 4 decimals, so within 5e-5 of it) over our
        # printed reuse time, itself printed at 2 decimals: it must lie between the two extremes that allows
        lo, hi = ((u["ttft_s"] + d) / r["ttft_reuse_s"] for d in (-5e-5, 5e-5))
        assert lo - 0.005 - 1e-9 <= r["upstream_over_reuse"] <= hi + 0.005 + 1e-9
    assert [r["first_token_match"] for r in side] == [True, False, True]
    summary = rows[-1]
    assert summary["summary"] == "last turn" and summary["ttft_upstream_s"] == up[-1]["ttft_s"]
    assert summary["upstream_over_cold"] == side[-1]["upstream_over_cold"] and summary["first_token_match"] is True


TINY_QUANT = ["--depth", "1", "--batches", "1", "--new-tokens", "4", "--eval-rows", "1", "--repeats", "1",
              "--steps-per-call", "1", "--torch-threads", "1"]


@pytest.mark.slow  # three variants' compiles and bpb evals
def test_quant_puts_upstream_batch1_beside_int8_and_fp32(tmp_path, capsys):
    quant.main(TINY_QUANT + ["--nanochat-src", str(fake_checkout(tmp_path, {"1": [-1] * 4}))])
    rows = lines(capsys.readouterr().out)
    dec = {r["variant"]: r for r in rows if r.get("part") == "decode"}
    assert dec["upstream"]["impl"] == "upstream-engine" and dec["upstream"]["tok_per_s"] > 0
    assert dec["upstream"]["tokens_match"] is False  # planted: never our tokens
    assert not any("out" in r for r in rows)
    (vs,) = [r for r in rows if r.get("part") == "vs_upstream"]
    assert vs["upstream_tok_per_s"] == dec["upstream"]["tok_per_s"]
    for name in ("fp32", "int8"):
        assert vs[f"{name}_over_upstream"] == pytest.approx(dec[name]["tok_per_s"] / dec["upstream"]["tok_per_s"])
    (acc,) = [r for r in rows if r.get("part") == "accuracy" and r["variant"] == "int8"]
    assert vs["int8_bpb_delta"] == acc["bpb_delta"]


@pytest.mark.slow
def test_train_upstream_alone_runs_uncompiled(tmp_path, capsys):
    """--framework upstream (the GPU kit's own phase for it): no JAX or torch-reference row."""
    args = [a for a in TINY_TRAIN if a not in ("--framework", "jax")]
    train.main(args + ["--framework", "upstream", "--torch-eager", "--nanochat-src", str(fake_checkout(tmp_path))])
    rows = lines(capsys.readouterr().out)
    assert [r.get("framework") for r in rows] == ["upstream"]
    assert rows[0]["step_s"] > 0 and np.isfinite(rows[0]["first_loss"])
    with pytest.raises(SystemExit):
        train.main(args + ["--framework", "upstream"])


# ---- against a real checkout ----------------------------------------------------------------------

REAL = os.environ.get("NANOCHAT_SRC")
needs_real = pytest.mark.skipif(not REAL, reason="set NANOCHAT_SRC to a checkout of upstream nanochat")


@needs_real
def test_real_upstream_engine_decodes_our_tokens(capsys):
    decode.main(TINY + ["--nanochat-src", REAL])
    rows = lines(capsys.readouterr().out)
    up = [r for r in rows if r.get("impl") == "upstream-engine"]
    assert {r["batch"] for r in up} == {1, 8} and all(r["tokens_match"] for r in up)
    assert not [r for r in rows if "error" in r]
    assert [r["tokens_match"] for r in rows if r.get("impl") == "jax-engine-samples"] == [True]


@needs_real
@pytest.mark.slow
def test_real_upstream_prefill_gives_our_first_tokens(capsys):
    prefix.main(TINY_PREFIX + ["--nanochat-src", REAL])
    side = [r for r in lines(capsys.readouterr().out) if "side_by_side" in r]
    assert len(side) == 3 and all(r["first_token_match"] and r["ttft_upstream_s"] > 0 for r in side)


@needs_real
@pytest.mark.slow
def test_real_upstream_beside_quant_decodes_our_fp32_tokens(capsys):
    quant.main(TINY_QUANT + ["--nanochat-src", REAL])
    (up,) = [r for r in lines(capsys.readouterr().out) if r.get("variant") == "upstream"]
    assert up["tokens_match"] is True and up["compute_dtype"] == "float32"


@needs_real
@pytest.mark.slow
def test_real_upstream_training_step_runs_on_our_weights(capsys):
    train.main(TINY_TRAIN + ["--nanochat-src", REAL])
    up = [r for r in lines(capsys.readouterr().out) if r.get("framework") == "upstream+compile"]
    assert up and up[0]["first_loss"] == pytest.approx(np.log(256), rel=0.05)  # near-uniform at init
    assert up[0]["compute_dtype"] == "float32"
