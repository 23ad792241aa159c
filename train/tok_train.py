"""Train the BPE tokenizer on the pretraining shards and save it where the
rest of the pipeline (and upstream nanochat) can load it.

    python -m train.tok_train [--data-dir DATA] [--out-dir OUT] [--vocab-size 32768] [--max-chars 2e9] [--doc-cap 10000]

The train split is every *.parquet in DATA in sorted order except the last, which is
val, as in nanochat. Documents are cut to --doc-cap characters, and reading stops after
the document that takes the total past --max-chars.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator

from nanochat_jax.common import run_cli
from nanochat_jax.data.dataset import default_data_dir, iter_texts, list_shards
from nanochat_jax.paths import tokenizer_dir
from nanochat_jax.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer

ROUND_TRIP_TEXT = ("Hello world! The year 2024 had 366 days; café, naïve, Größe. "
                   "안녕하세요 世界 🙂\n\tdef f(x):\n\t\treturn x ** 2  # <|bos|> stays text\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="parquet shards with a `text` column (default: climbmix dir)")
    ap.add_argument("--out-dir", default=None, help="where tokenizer.pkl and token_bytes.{npy,pt} go "
                                                    f"(default: {tokenizer_dir()})")
    ap.add_argument("--vocab-size", type=int, default=32768, help="including 256 bytes and 9 specials")
    ap.add_argument("--max-chars", type=float, default=2e9, help="characters to train on (after doc-cap)")
    ap.add_argument("--doc-cap", type=int, default=10000, help="characters kept per document")
    ap.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    args = ap.parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        raise SystemExit(f"tok_train: --vocab-size must be >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                         f"specials + a merge), got {args.vocab_size}")
    if args.max_chars <= 0 or args.doc_cap < 1:
        raise SystemExit(f"tok_train: --max-chars must be > 0 and --doc-cap >= 1, got {args.max_chars:g} and "
                         f"{args.doc_cap}")

    data_dir = args.data_dir or default_data_dir()
    try:
        train_files, val_file = list_shards(data_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"tok_train: {e}") from None
    out_dir = args.out_dir or tokenizer_dir()
    try:  # the tokenizer is saved after minutes of training: an unwritable place fails now
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise SystemExit(f"tok_train: cannot write --out-dir {out_dir}: {e.strerror or e}") from None
    print(f"training on {len(train_files)} shard(s) in {data_dir} (val shard {val_file.name} left out)")

    seen = {"docs": 0, "chars": 0}

    def docs() -> Iterator[str]:
        for batch in iter_texts(train_files):
            for text in batch:
                seen["docs"] += 1
                seen["chars"] += min(len(text), args.doc_cap)
                yield text

    t0 = time.perf_counter()
    tok = Tokenizer.train(docs(), args.vocab_size, doc_cap=args.doc_cap, max_chars=int(args.max_chars))
    train_s = time.perf_counter() - t0
    out = tok.save(out_dir)

    ids = tok.encode(ROUND_TRIP_TEXT)
    if tok.decode(ids) != ROUND_TRIP_TEXT or Tokenizer.load(out).encode(ROUND_TRIP_TEXT) != ids:
        raise SystemExit("tok_train: round trip through the saved tokenizer failed")

    tb = tok.token_bytes[: tok.vocab_size - len(SPECIAL_TOKENS)]
    print(f"trained in {train_s:.1f}s on {seen['docs']:,} docs, {seen['chars']:,} chars")
    print(f"vocab {tok.vocab_size:,} = 256 bytes + {tok.vocab_size - 256 - len(SPECIAL_TOKENS):,} merges + "
          f"{len(SPECIAL_TOKENS)} specials (bos = {tok.bos_token_id})")
    print(f"token bytes: mean {tb.mean():.2f}, max {tb.max()}; sample text: {len(ROUND_TRIP_TEXT.encode())} bytes "
          f"-> {len(ids)} tokens, round trip ok")
    print(f"saved to {out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
