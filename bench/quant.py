"""Weight-only int8 (serving's --quantize int8) against fp32: bytes, accuracy, decode speed.

    python -m bench.quant                       # CPU: d4 (n_embd 256), vocab 32768, fp32 compute
    python -m bench.quant --depth 20 --bf16     # a GPU (bf16 compute)
    python -m bench.quant --nanochat-src /path/to/nanochat   # adds upstream's Engine at batch 1

One JSON line per measurement, same weights for every variant (bench.decode's perturbed random
init; no trained checkpoint is needed, so bpb here is of random weights on random tokens and
only its fp32 → int8 delta means anything):

  size        param bytes per variant
  accuracy    logits' relative (Frobenius) error and top-1 agreement vs fp32, and val bpb via
              evals/bpb.py (its fused head reads the lm_head kernel directly, so the int8 head
              goes in dequantized: the same numbers quantize.dot computes)
  decode      tok/s: Engine batch 1 and Scheduler batch 8 (bench.decode's counting)

  upstream    with --nanochat-src: upstream's Engine batch 1 (its compute dtype, full-precision
              weights: it has no quantization) on the same weights and prompt, in a subprocess after
              ours (bench/upstream.py); the last line gives our fp32 and int8 batch-1 tok/s over it

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

from bench import upstream
from bench.decode import BenchTokenizer, bench_engine, bench_scheduler, best_run, make_params, row
from nanochat_jax import model
from nanochat_jax.config import config_for_depth
from nanochat_jax.evals.bpb import evaluate_bpb
from nanochat_jax.quantize import nbytes, quantize_params
from nanochat_jax.scheduler import Engine, Scheduler
from nanochat_jax.tokenizer import SPECIAL_TOKENS


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
    ap.add_argument("--nanochat-src", metavar="DIR", help="a checkout of upstream nanochat: adds its Engine's row")
    ap.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2], help="upstream's torch thread counts")
    args = ap.parse_args(argv)
    if args.nanochat_src:
        upstream.check_src(args.nanochat_src)  # fail before the long JAX part

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
    bpb_delta = {}
    for name, p in variants.items():
        emit({"part": "size", "variant": name, "param_bytes": nbytes(p), "vs_fp32": nbytes(p) / nbytes(params)})
        logits = model.forward(p, jnp.asarray(rows_BT[:, :-1]), config, dtype=dtype)
        bpb = evaluate_bpb(head_dequantized(p), batches, config, token_bytes, dtype=dtype)
        emit({"part": "accuracy", "variant": name, "weights": "random (no trained checkpoint)",
              "logits_rel_err": float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref)),
              "top1_agree": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
              "bpb": bpb, "bpb_delta": bpb - ref_bpb})
        bpb_delta[name] = bpb - ref_bpb
    batch1, fp32_out = {}, None
    for name, p in variants.items():
        eng = Engine(p, config, tok, dtype=dtype, steps_per_call=args.steps_per_call)
        for n in args.batches:
            if n == 1:
                run = bench_engine(eng, prompts[0], args.new_tokens, args.steps_per_call)
                run()  # compiles
                r = best_run(run, args.repeats)
                out = r.pop("out")
                fp32_out = out if name == "fp32" else fp32_out
                batch1[name] = r["tok_per_s"]
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
    if args.nanochat_src:
        upstream_row(args, params, config, tok, prompts[0], dtype, fp32_out, batch1, bpb_delta["int8"], emit)


def upstream_row(args, params, config, tok, prompt, dtype, fp32_out, batch1, int8_bpb_delta, emit):
    """upstream's Engine, batch 1, best over --torch-threads; our batch-1 variants over it."""
    job = dict(mode="decode", prompt=prompt, new_tokens=args.new_tokens, batches=[1], threads=args.torch_threads,
               repeats=args.repeats, vocab_size=config.vocab_size,
               specials={s: tok.encode_special(s) for s in SPECIAL_TOKENS})
    runs = [row("upstream-engine", 1, u["tokens"], u["wall"], [u["ttft"]], threads=u["threads"],
                compute_dtype=u["compute_dtype"], tokens_match=u["outs"][0] == fp32_out if fp32_out else None)
            for u in upstream.run(args.nanochat_src, params, config, job, jnp.dtype(dtype).name)]
    up = max(runs, key=lambda r: r["tok_per_s"])
    emit({"part": "decode", "variant": "upstream", **up})
    emit({"part": "vs_upstream", "batch": 1, "upstream_tok_per_s": up["tok_per_s"],
          **{f"{name}_over_upstream": v / up["tok_per_s"] for name, v in batch1.items()},
          "int8_bpb_delta": int8_bpb_delta})


if __name__ == "__main__":
    main()
