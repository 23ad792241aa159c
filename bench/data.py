"""Input pipeline throughput: the best-fit packer, tokenization, and the whole parquet → batch path.

    python -m bench.data                          # byte-level encoder, synthetic docs
    python -m bench.data --tokenizer-dir DIR      # nanochat_jax.tokenizer.Tokenizer.load(DIR) instead
    python -m bench.data --data-dir DIR           # texts from the first train shard in DIR

One JSON line per stage. Synthetic doc lengths are log-normal (median --median-doc tokens,
sigma 1, mean 1.65x the median), a stand-in for web text. The packer's crop fraction
depends on that choice and keeps rising for a while as long docs pile up in the buffer
(upstream measured 34.6 % on ClimbMix at T=2048).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_jax.data.packing import BestFitCropIterDataset
from nanochat_jax.data.pipeline import list_shards, pretrain_loader, read_shard_texts, split_shards

# Any plain-text file to slice synthetic documents from (NANOCHAT_BENCH_TEXT); random letters without one.
TEXT = Path(os.environ.get("NANOCHAT_BENCH_TEXT", "/nonexistent"))
BYTE_BOS = 256


def byte_encoder():
    """(encode_batch, bos_id) for raw utf-8 bytes: the cheapest possible tokenizer."""
    return (lambda texts: [[BYTE_BOS, *t.encode()] for t in texts]), BYTE_BOS


def tokenizer_encoder(tokenizer_dir: str):
    from nanochat_jax.tokenizer import Tokenizer  # lazy: only when a trained tokenizer is asked for

    tok = Tokenizer.load(tokenizer_dir)
    bos = tok.bos_token_id
    return (lambda texts: tok.encode(texts, prepend=bos)), bos


def doc_lengths(n: int, median: int, rng) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(median), 1.0, size=n), 2, 32768).astype(np.int64)


def synthetic_texts(n: int, median_chars: int, rng) -> list[str]:
    """Slices of the NANOCHAT_BENCH_TEXT file (or random letters without one) with log-normal lengths."""
    corpus = TEXT.read_text() if TEXT.exists() else "".join(rng.choice(list("abcde fghij "), 1 << 20))
    out = []
    for n_chars in doc_lengths(n, median_chars, rng):
        n_chars = min(int(n_chars), len(corpus))
        start = int(rng.integers(0, len(corpus) - n_chars + 1))
        out.append(corpus[start:start + n_chars])
    return out


def bench_packer(B: int, T: int, n_warmup: int, n_batches: int, median_doc: int, rng) -> dict:
    """Timed after n_warmup batches: long docs pile up in the buffer for a while before it settles."""
    lens = doc_lengths(20_000, median_doc, rng)
    docs = [np.concatenate([[BYTE_BOS], rng.integers(0, 256, n - 1)]).astype(np.int32) for n in lens]
    pulled = [0]

    def count(doc):
        pulled[0] += len(doc)
        return doc

    src = grain.MapDataset.source(docs).repeat().map(count).to_iter_dataset(grain.ReadOptions(num_threads=0))
    it = iter(BestFitCropIterDataset(src, B, T, BYTE_BOS))
    for _ in range(n_warmup + 1):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = it.get_state()
    state_s = time.perf_counter() - t0
    emitted = (n_warmup + 1 + n_batches) * B * (T + 1)
    return dict(stage="packer", B=B, T=T, batches=n_batches, tok_per_s=n_batches * B * T / dt,
                batch_ms=1e3 * dt / n_batches, crop_fraction=1 - emitted / (pulled[0] - sum(state["lens"])),
                mean_doc_tokens=float(lens.mean()), get_state_ms=1e3 * state_s,
                state_json_mb=len(json.dumps(state, indent=4)) / 1e6)


def bench_tokenizer(encode_batch, texts: list[str], name: str, chunk: int = 128) -> dict:
    t0 = time.perf_counter()
    n_tok = sum(len(d) for i in range(0, len(texts), chunk) for d in encode_batch(texts[i:i + chunk]))
    dt = time.perf_counter() - t0
    n_bytes = sum(len(t.encode()) for t in texts)
    return dict(stage="tokenize", encoder=name, docs=len(texts), tok_per_s=n_tok / dt, mb_per_s=n_bytes / dt / 1e6,
                bytes_per_token=n_bytes / n_tok)


def bench_pipeline(data_dir, encode_batch, bos, name: str, B: int, T: int, n_batches: int) -> dict:
    ds = pretrain_loader(data_dir, encode_batch, bos, B, T, process_index=0, process_count=1)
    it = iter(ds)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    dt = time.perf_counter() - t0
    it.close()
    return dict(stage="pipeline", encoder=name, B=B, T=T, batches=n_batches, tok_per_s=n_batches * B * T / dt,
                batch_ms=1e3 * dt / n_batches)


def write_synthetic_shards(d: Path, texts: list[str], n_files: int = 3, row_group: int = 1024) -> Path:
    for f, part in enumerate(np.array_split(np.array(texts, dtype=object), n_files)):
        pq.write_table(pa.table({"text": list(part)}), d / f"shard_{f:05d}.parquet", row_group_size=row_group)
    return d


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=300, help="packer batches before timing")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--median-doc", type=int, default=1000, help="median synthetic doc length in tokens")
    ap.add_argument("--tokenizer-dir", help="benchmark nanochat_jax.tokenizer.Tokenizer.load(DIR) too")
    ap.add_argument("--data-dir", help="real shards: tokenize texts of the first train shard, run the pipeline on DIR")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    B, T = args.batch_size, args.seq_len

    print(json.dumps(bench_packer(B, T, args.warmup, args.batches, args.median_doc, rng)), flush=True)

    encoders = {"bytes": byte_encoder()}
    if args.tokenizer_dir:
        encoders["tokenizer"] = tokenizer_encoder(args.tokenizer_dir)
    if args.data_dir:
        first = split_shards(list_shards(args.data_dir), "train")[0]
        texts = [t for t, _ in zip(read_shard_texts(first), range(8192))]
    else:
        texts = synthetic_texts(8192, 4 * args.median_doc, rng)
    for name, (encode_batch, _) in encoders.items():
        print(json.dumps(bench_tokenizer(encode_batch, texts, name)), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or write_synthetic_shards(Path(tmp), synthetic_texts(12_000, 4 * args.median_doc, rng))
        for name, (encode_batch, bos) in encoders.items():
            print(json.dumps(bench_pipeline(data_dir, encode_batch, bos, name, B, T, args.batches)), flush=True)


if __name__ == "__main__":
    main()
