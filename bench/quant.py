"""Weight-only int8 (serving's --quantize int8) against fp32: bytes, accuracy, decode speed.

    python -m bench.quant                       # CPU: d4 (n_embd 256), vocab 32768, fp32 compute
    python -m bench.quant --depth 20 --bf16     # a GPU (bf16 compute)

One JSON line per measurement, same weights for every variant (bench.decode's perturbed random
init; no trained checkpoint is needed, so bpb here is of random weights on random tokens and
only its fp32 → int8 delta means anything):

  size        param bytes per variant
  accuracy    logits' relative (Frobenius) error and top-1 agreement vs fp32, and val bpb via
              evals/bpb.py (its fused head reads the lm_head kernel directly, so the int8 head
              goes in dequantized: the same numbers quantize.dot computes)
  decode      tok/s: Engine batch 1 and Scheduler batch 8 (bench.decode's counting)

"bf16-weights" stores the matmul kernels in bf16 and computes in fp32: the candidate second
option, left out of --quantize because it did not pay (bench/RESULTS.md, "Quantized decode").
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from bench.decode import BenchTokenizer, bench_engine, bench_scheduler, best_run, make_params
from nanochat_jax import model
from nanochat_jax.config import config_for_depth
from nanochat_jax.evals.bpb import evaluate_bpb
from nanochat_jax.quantize import nbytes, quantize_params
from nanochat_jax.scheduler import Engine, Scheduler


def bf16_weights(params):
    return {k: bf16_weights(v) if isinstance(v, dict) else v.astype(jnp.bfloat16) if k == "kernel" else v
            for k, v in params.items()}


def head_dequantized(params):
    kernel = params["lm_head"]["kernel"]
    return {**params, "lm_head": {"kernel": qwix.dequantize(kernel) if isinstance(kernel, qwix.QArray) else kernel}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4, help="vocab 32768, context 256 (bench.decode's model)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="1: Engine; N > 1: Scheduler, N slots")
    ap.add_argument("--new-tokens", type=int, default=64, help="after a 32-token random prompt")
    ap.add_argument("--steps-per-call", type=int, default=8)
    ap.add_argument("--eval-rows", type=int, default=8, help="random 256-token rows for bpb and logits")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 compute (accelerators)")
    args = ap.parse_args(argv)

    config = config_for_depth(args.depth, max_seq_len=256, vocab_size=32768)
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    params = make_params(config)
    variants = {"fp32": params, "int8": quantize_params(params, "int8"), "bf16-weights": bf16_weights(params)}
    tok = BenchTokenizer(config.vocab_size)
    rng = np.random.default_rng(0)
    rows_BT = rng.integers(0, tok.n_text, (args.eval_rows, config.sequence_len + 1))
    batches = [{"inputs": rows_BT[i:i + 1, :-1], "targets": rows_BT[i:i + 1, 1:]} for i in range(args.eval_rows)]
    token_bytes = (np.arange(config.vocab_size) < tok.n_text).astype(np.int32)  # random weights: 1 byte a text id
    prompts = rng.integers(0, tok.n_text, (max(args.batches), 32)).tolist()
    base = dict(depth=args.depth, n_embd=config.n_embd, vocab=config.vocab_size, dtype=jnp.dtype(dtype).name,
                device=str(jax.devices()[0].device_kind))
    emit = lambda r: print(json.dumps({**base, **r}), flush=True)  # noqa: E731

    ref = model.forward(params, jnp.asarray(rows_BT[:, :-1]), config, dtype=dtype)
    ref_bpb = evaluate_bpb(params, batches, config, token_bytes, dtype=dtype)
    for name, p in variants.items():
        emit({"part": "size", "variant": name, "param_bytes": nbytes(p), "vs_fp32": nbytes(p) / nbytes(params)})
        logits = model.forward(p, jnp.asarray(rows_BT[:, :-1]), config, dtype=dtype)
        bpb = evaluate_bpb(head_dequantized(p), batches, config, token_bytes, dtype=dtype)
        emit({"part": "accuracy", "variant": name, "weights": "random (no trained checkpoint)",
              "logits_rel_err": float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref)),
              "top1_agree": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
              "bpb": bpb, "bpb_delta": bpb - ref_bpb})
    for name, p in variants.items():
        eng = Engine(p, config, tok, dtype=dtype, steps_per_call=args.steps_per_call)
        for n in args.batches:
            if n == 1:
                run = bench_engine(eng, prompts[0], args.new_tokens, args.steps_per_call)
                run()  # compiles
                r = best_run(run, args.repeats)
                r.pop("out")
            else:
                sched = Scheduler(eng, slots=n, max_queue=n, steps_per_call=args.steps_per_call)
                try:
                    sched.warmup()
                    run = bench_scheduler(sched, prompts[:n], args.new_tokens, args.steps_per_call)
                    run()
                    r = best_run(run, args.repeats)
                finally:
                    sched.close()
            emit({"part": "decode", "variant": name, **r})


if __name__ == "__main__":
    main()
