"""Compression (bytes per token, higher is better) of our tokenizer vs GPT-2 and
cl100k_base on a few kinds of text.

    python -m train.tok_eval [--tokenizer-dir OUT] [--data-dir DATA]

tiktoken downloads the GPT-2 and cl100k files on first use (cached under
TIKTOKEN_CACHE_DIR); offline, those columns are reported as skipped.
"""

from __future__ import annotations

import argparse
import sys
import threading

import tiktoken

from nanochat_jax.common import run_cli
from nanochat_jax.data.dataset import iter_texts, list_shards
from nanochat_jax.paths import tokenizer_dir
from nanochat_jax.tokenizer import Tokenizer

BASELINES = ("gpt2", "cl100k_base")

SAMPLES = {
    "news": (
        "City officials said on Tuesday that the new bridge across the river would open to traffic in "
        "the spring, two years later than planned. The project, first proposed in 2009, ran $48.5 million "
        "over its budget after engineers found unstable soil beneath the eastern pier. \"We would rather "
        "be late than be wrong,\" the mayor told reporters at a press conference downtown."
    ),
    "korean": (
        "서울의 봄은 짧지만 아름답다. 사람들은 주말마다 한강 공원에 모여 자전거를 타거나 돗자리를 펴고 "
        "도시락을 먹는다. 올해는 벚꽃이 예년보다 일주일 일찍 피었고, 많은 시민들이 꽃구경을 위해 "
        "여의도로 몰려들었다."
    ),
    "code": (
        "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
        "    \"\"\"Merge two sorted lists in O(len(a) + len(b)).\"\"\"\n"
        "    out, i, j = [], 0, 0\n"
        "    while i < len(a) and j < len(b):\n"
        "        if a[i] <= b[j]:\n"
        "            out.append(a[i]); i += 1\n"
        "        else:\n"
        "            out.append(b[j]); j += 1\n"
        "    return out + a[i:] + b[j:]\n"
    ),
    "math": (
        "\\begin{theorem}\nFor every $n \\geq 1$, $\\sum_{k=1}^{n} k^2 = \\frac{n(n+1)(2n+1)}{6}$.\n"
        "\\end{theorem}\n\\begin{proof}\nBy induction on $n$. The case $n=1$ gives $1 = \\frac{1 \\cdot 2 "
        "\\cdot 3}{6}$. Assuming it for $n$, adding $(n+1)^2$ yields $\\frac{(n+1)(n+2)(2n+3)}{6}$.\n"
        "\\end{proof}\n"
    ),
    "science": (
        "Photosynthesis converts light energy into chemical energy stored in glucose. In the light-dependent "
        "reactions, chlorophyll absorbs photons at wavelengths near 430 nm and 662 nm, splitting water and "
        "releasing O2. The Calvin cycle then fixes CO2 using ATP and NADPH, with the enzyme RuBisCO "
        "catalysing roughly 3 reactions per second."
    ),
}


def load_baseline(name: str, timeout_s: float) -> tuple[tiktoken.Encoding | None, str]:
    """(encoding, "") or (None, why it was skipped). A thread bounds the wait, since
    tiktoken's download has no timeout of its own and a blackholed network would hang."""
    result = {}

    def fetch():
        try:
            result["enc"] = tiktoken.get_encoding(name)
        except Exception as e:  # any failure to fetch means: not available here
            result["err"] = f"{type(e).__name__}"

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if "enc" in result:
        return result["enc"], ""
    return None, f"skipped (not available offline: {result.get('err', f'no answer in {timeout_s:.0f}s')})"


def data_samples(data_dir) -> dict[str, str]:
    """The first row group of the first train shard and of the val shard, as one text each."""
    train_files, val_file = list_shards(data_dir)
    return {"train-rg0": "\n".join(next(iter_texts(train_files[:1]))),
            "val-rg0": "\n".join(next(iter_texts([val_file])))}


def report(texts: dict[str, str], encoders: dict) -> list[str]:
    """One line per text: bytes, then tokens and bytes/token for each encoder."""
    names = list(encoders)
    lines = [f"{'text':<10} {'bytes':>9} " + " ".join(f"{n + ' tok':>16} {'B/tok':>6}" for n in names)]
    for label, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        cells = []
        for enc in encoders.values():
            n_tok = len(enc.encode_ordinary(text))
            cells.append(f"{n_tok:>16,} {n_bytes / max(n_tok, 1):>6.2f}")
        lines.append(f"{label:<10} {n_bytes:>9,} " + " ".join(cells))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer-dir", default=None, help="directory (or tokenizer.pkl) written by tok_train "
                                                          f"(default: {tokenizer_dir()})")
    ap.add_argument("--data-dir", default=None, help="parquet shards: adds the first train and val row groups")
    ap.add_argument("--download-timeout", type=float, default=30.0, help="seconds to wait for each baseline")
    ap.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    args = ap.parse_args(argv)
    if args.download_timeout < 0:
        raise SystemExit(f"tok_eval: --download-timeout must be >= 0, got {args.download_timeout}")
    try:
        ours = Tokenizer.load(args.tokenizer_dir or tokenizer_dir())
        if args.data_dir:
            list_shards(args.data_dir)  # before the baseline downloads
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"tok_eval: {e}") from None
    encoders = {}
    for name in BASELINES:
        enc, why = load_baseline(name, args.download_timeout)
        if enc is None:
            print(f"{name}: {why}")
        else:
            encoders[name] = enc
    encoders["ours"] = ours.encoding

    texts = dict(SAMPLES)
    if args.data_dir:
        texts.update(data_samples(args.data_dir))
    print(f"compression in bytes per token (ours: vocab {ours.vocab_size:,})")
    print("\n".join(report(texts, encoders)))


if __name__ == "__main__":
    sys.exit(run_cli(main))
