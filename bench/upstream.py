"""Upstream nanochat's own Engine and training step, timed on our weights, for the benches
(decode, prefix, quant, train).

    git clone https://github.com/karpathy/nanochat /path/to/nanochat
    python -m bench.decode --nanochat-src /path/to/nanochat

The parent half (`check_src`, `run`) writes our params in upstream's checkpoint layout with
convert.export_nanochat_checkpoint and starts this file as a script in a fresh interpreter
with PYTHONPATH=<checkout>: upstream's modules are imported there only, never by the library.
The child half (`main`) loads the checkpoint with upstream's build_model, runs the job it reads
as JSON on stdin, and prints one JSON line per measurement; the parent turns them into rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_NEEDED = ("nanochat/engine.py", "nanochat/gpt.py", "nanochat/checkpoint_manager.py", "nanochat/optim.py")


def check_src(src) -> Path:
    """The checkout's root, or a one-line SystemExit that says how to get one."""
    root = Path(src).expanduser().resolve()
    missing = [p for p in _NEEDED if not (root / p).is_file()]
    if missing:
        raise SystemExit(f"--nanochat-src {src}: not a nanochat checkout (no {missing[0]}); "
                         "fetch one with `git clone https://github.com/karpathy/nanochat DIR`")
    return root


def run(src, params, config, job, dtype="float32", device=None):
    """Run `job` in upstream's code on `params` (exported to a temp checkpoint); its JSON lines.
    device: torch's, by default the one JAX runs on here (cuda beside a GPU backend, else cpu)."""
    import jax

    from nanochat_jax.convert import export_nanochat_checkpoint

    device = device or ("cuda" if jax.default_backend() == "gpu" else "cpu")

    with tempfile.TemporaryDirectory(prefix="nanochat-upstream-") as tmp:
        export_nanochat_checkpoint(params, config, tmp, step=0)
        env = {**os.environ, "PYTHONPATH": str(check_src(src)), "NANOCHAT_DTYPE": dtype,
               "NANOCHAT_BASE_DIR": tmp}  # nothing upstream might cache lands in ~/.cache
        # -P: the script's folder (bench/, with data.py, optim.py, ...) must not shadow top-level modules
        child = subprocess.run([sys.executable, "-P", __file__], input=json.dumps(
            {**job, "checkpoint_dir": tmp, "step": 0, "device": device}), env=env, capture_output=True, text=True)
    if child.returncode:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"upstream nanochat at {src} failed (exit {child.returncode}): {last}")
    return [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]


# ---- the child: runs with PYTHONPATH=<checkout>, imports upstream's modules and torch only -------

class SpecialIds:
    """What upstream's Engine asks its tokenizer: special ids (the state machine's) and the
    vocabulary size (build_model's check). The bench's prompts are ids and its weights never pick
    a special, so the calculator tool (the only user of encode/decode) never runs."""

    def __init__(self, specials, vocab_size):
        self.specials, self.vocab_size = specials, vocab_size

    def encode_special(self, s):
        return self.specials[s]

    def get_bos_token_id(self):
        return self.specials["<|bos|>"]

    def get_vocab_size(self):
        return self.vocab_size


def load(job, phase):
    import torch
    from nanochat import checkpoint_manager

    tok = SpecialIds(job.get("specials", {}), job["vocab_size"])
    # build_model loads upstream's trained tokenizer from its cache dir; the bench's stands in.
    checkpoint_manager.get_tokenizer = lambda: tok
    model, _, _ = checkpoint_manager.build_model(job["checkpoint_dir"], job["step"], torch.device(job["device"]), phase)
    return model, tok


def decode(job):
    """Engine.generate on one prompt with num_samples = each batch: raw timings per run."""
    import torch
    from nanochat.engine import Engine

    model, tok = load(job, "eval")
    eng = Engine(model, tok)
    sync = torch.cuda.synchronize if job["device"] == "cuda" else (lambda: None)
    for threads in job["threads"]:
        torch.set_num_threads(threads)
        for n in job["batches"]:
            for i in range(job["repeats"] + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                ttft, cols = None, []
                for col, _ in eng.generate(job["prompt"], num_samples=n, max_tokens=job["new_tokens"],
                                           temperature=0.0):
                    ttft = ttft or time.perf_counter() - t0
                    cols.append(col)
                sync()
                wall = time.perf_counter() - t0
                if i:
                    yield dict(batch=n, threads=threads, wall=wall, ttft=ttft, tokens=[len(cols)] * n,
                               outs=[list(r) for r in zip(*cols)])


def ttft(job):
    """Time to first token of each prompt (a conversation's turns): upstream's Engine has no prefix
    reuse, so each is a prefill of the whole prompt plus one sampled token. Best of repeats per prompt."""
    import torch
    from nanochat.engine import Engine

    model, tok = load(job, "eval")
    eng = Engine(model, tok)
    sync = torch.cuda.synchronize if job["device"] == "cuda" else (lambda: None)
    for threads in job["threads"]:
        torch.set_num_threads(threads)
        for turn, prompt in enumerate(job["prompts"], start=1):
            times = []
            for _ in range(job["repeats"] + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                gen = eng.generate(prompt, num_samples=1, max_tokens=1, temperature=0.0)
                col, _ = next(gen)  # at the first token, as our TTFT: not the decode step that follows
                sync()
                times.append(time.perf_counter() - t0)
                gen.close()
            yield dict(turn=turn, threads=threads, prompt_tokens=len(prompt), ttft=min(times[1:]), first_token=col[0])


def train(job):
    """upstream's base_train step: torch.compile'd GPT forward/backward, MuonAdamW, zero_grad."""
    import torch

    model, _ = load(job, "train")
    opt = model.setup_optimizer(weight_decay=job["weight_decay"])
    fwd = torch.compile(model, dynamic=False) if job.get("compile", True) else model
    x, y = (torch.tensor(a, dtype=torch.long, device=job["device"]) for a in (job["x"], job["y"]))
    sync = torch.cuda.synchronize if job["device"] == "cuda" else (lambda: None)
    times, losses = [], []
    for _ in range(1 + job["warmup"] + job["iters"]):
        t0 = time.perf_counter()
        loss = fwd(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    yield dict(compile_s=times[0], step_times=times[1 + job["warmup"]:], first_loss=losses[0])


def main():
    job = json.load(sys.stdin)
    from nanochat.common import COMPUTE_DTYPE  # follows NANOCHAT_DTYPE, set by the parent

    for r in {"decode": decode, "ttft": ttft, "train": train}[job["mode"]](job):
        print(json.dumps({**r, "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch.")}), flush=True)


if __name__ == "__main__":
    main()
