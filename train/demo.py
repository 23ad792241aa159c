"""The main job, as far as the pipeline exists: build a model from --depth, show what it
costs, run a forward pass and sample from it. Later stages (tokenizer, pretraining, SFT)
extend this into the full tiny-scale pipeline.

    python -m train.demo --depth 4
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from nanochat_jax import flops, model
from nanochat_jax.common import resolve_dtype
from nanochat_jax.config import config_for_depth


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4, help="the one dial: width, heads and windows derive from it")
    ap.add_argument("--aspect-ratio", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--window-pattern", default="SSSL")
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--sample-tokens", type=int, default=16)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: by platform)")
    ap.add_argument("--attention", default="auto", help="auto | xla | cudnn | splash")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)

    config = config_for_depth(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                              max_seq_len=args.max_seq_len, window_pattern=args.window_pattern,
                              vocab_size=args.vocab_size)
    dtype = resolve_dtype(args.dtype)
    print(f"JAX {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s)), compute dtype {dtype.name}")
    print(flops.summary(config))

    params = model.init_params(config, jax.random.key(args.seed), dtype)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert n_params == flops.num_scaling_params(config)["total"], "model and flops.py disagree on the parameter count"

    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, config.vocab_size, (args.batch_size, config.sequence_len), dtype=np.int32)
    loss = jax.jit(lambda p, t: model.loss_fn(p, t[:, :-1], t[:, 1:], config, dtype=dtype, backend=args.attention))
    t0 = time.perf_counter()
    first = float(loss(params, tokens))
    t1 = time.perf_counter()
    float(loss(params, tokens))
    t2 = time.perf_counter()
    print(f"forward + loss on ({args.batch_size}, {config.sequence_len - 1}) tokens: loss {first:.4f} "
          f"(ln V = {np.log(config.vocab_size):.4f} expected at init); compile+run {t1 - t0:.2f}s, run {t2 - t1:.3f}s")

    prompt = [int(t) for t in tokens[0, :8]]
    t0 = time.perf_counter()
    sample = list(model.generate(params, prompt, config, args.sample_tokens, dtype=dtype, backend=args.attention))
    print(f"greedy sample from an untrained model (token ids; the tokenizer stage will decode them):\n"
          f"  prompt {prompt}\n  -> {sample}  ({time.perf_counter() - t0:.2f}s)")


if __name__ == "__main__":
    main()
