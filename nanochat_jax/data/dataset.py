"""Pretraining shards (docs/numerics.md#shards): download, train/val split, row-group iteration.

Shards are parquet files `shard_{index:05d}.parquet` with one utf-8 `text` column.
A download always includes the dataset's last shard, because the last file in
sorted order is the validation split. Every file comes through nanochat_jax.download
(temp name, parquet footer check, atomic rename), so a `*.parquet` in the data dir
is always a complete shard, even after a crash or a concurrent run.

    python -m nanochat_jax.data.dataset -n 8 -w 4 [--data-dir D] [--dataset climbmix|fineweb-edu] [--base-url URL]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat_jax.download import DownloadError, download
from nanochat_jax.paths import home_dir


@dataclass(frozen=True)
class DatasetInfo:
    """Where a shard collection lives on HuggingFace and locally."""

    repo: str
    max_shard: int  # the last index, which is also the val shard
    dirname: str  # sub-directory of NANOCHAT_JAX_HOME

    @property
    def base_url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo}/resolve/main"


DATASETS = {
    "climbmix": DatasetInfo("karpathy/climbmix-400b-shuffle", 6542, "base_data_climbmix"),
    # Legacy (used upstream until 2026-03-04); upstream's directory name was plain base_data.
    "fineweb-edu": DatasetInfo("karpathy/fineweb-edu-100b-shuffle", 1822, "base_data"),
}


def default_data_dir(dataset: str = "climbmix") -> Path:
    """The local shard directory of a dataset."""
    return home_dir() / _info(dataset).dirname


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_url(index: int, dataset: str = "climbmix", base_url: str | None = None) -> str:
    """`base_url` (the --base-url flag) replaces host and prefix; the file name pattern stays."""
    base = base_url if base_url is not None else _info(dataset).base_url
    return f"{base.rstrip('/')}/{shard_name(index)}"


def _info(dataset: str) -> DatasetInfo:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[dataset]


def shard_indices(num_shards: int, dataset: str = "climbmix") -> list[int]:
    """Shards 0..num_shards-1 (-1: all) plus, always, the val shard."""
    info = _info(dataset)
    if num_shards < -1:
        raise ValueError(f"num_shards must be >= -1 (-1 means all), got {num_shards}")
    n = info.max_shard + 1 if num_shards == -1 else min(num_shards, info.max_shard + 1)
    return sorted(set(range(n)) | {info.max_shard})


# ----------------------------------------------------------------------------- validation


def check_parquet(path: Path) -> None:
    """Raise unless `path` has a readable parquet footer and a string `text` column.

    Only the footer is read, so this is cheap even for ~100 MB shards; a truncated
    download has no footer and fails here.
    """
    schema = pq.ParquetFile(path).schema_arrow
    idx = schema.get_field_index("text")
    if idx < 0:
        raise ValueError(f"{path.name}: no 'text' column (columns: {schema.names})")
    kind = schema.field(idx).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path.name}: 'text' column is {kind}, not string")


def _is_valid(path: Path) -> bool:
    try:
        check_parquet(path)
    except (OSError, ValueError, pa.ArrowException):
        return False
    return True


def _prepare(path: Path) -> bool:
    """Drop stale temp files and a corrupt final file; True if a valid shard is already there."""
    for stale in path.parent.glob(f"{path.name}*.tmp"):
        stale.unlink(missing_ok=True)
    if path.exists():
        if _is_valid(path):
            return True
        path.unlink()
    return False


# ----------------------------------------------------------------------------- download


def download_shards(
    num_shards: int,
    data_dir: str | os.PathLike | None = None,
    *,
    dataset: str = "climbmix",
    base_url: str | None = None,
    workers: int = 4,
    retries: int = 5,
    backoff: float = 2.0,
    progress: bool = True,
    timeout: float = 60,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Path]:
    """Fetch shards 0..num_shards-1 (-1: all) and the val shard into `data_dir`, in parallel.

    Valid shards already present are skipped, so a re-run resumes. Returns the paths
    of all requested shards in index order. If some shards fail, the others are kept
    and one DownloadError names every failed shard with its last cause.
    `sleep` is injectable so tests do not wait out the backoff.
    """
    if workers < 1 or retries < 1:
        raise ValueError(f"workers and retries must be >= 1, got {workers} and {retries}")
    root = Path(data_dir) if data_dir is not None else default_data_dir(dataset)
    root.mkdir(parents=True, exist_ok=True)
    paths = {i: root / shard_name(i) for i in shard_indices(num_shards, dataset)}
    todo = [i for i, p in paths.items() if not _prepare(p)]
    failures: list[DownloadError] = []
    with (
        tqdm(total=len(paths), initial=len(paths) - len(todo), unit="shard", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        kw = {"check": check_parquet, "retries": retries, "backoff": backoff, "timeout": timeout,
              "progress": False, "sleep": sleep}
        futures = [pool.submit(download, shard_url(i, dataset, base_url), paths[i], **kw) for i in todo]
        for fut in as_completed(futures):
            try:
                fut.result()
            except DownloadError as exc:
                failures.append(exc)
            bar.update(1)
    if failures:
        lines = "\n  ".join(sorted(str(e) for e in failures))
        raise DownloadError(
            f"{len(failures)} of {len(paths)} shards failed (the others are in {root}):\n  {lines}"
        ) from failures[0]
    return list(paths.values())


# ----------------------------------------------------------------------------- reading


def list_shards(data_dir: str | os.PathLike | None = None) -> tuple[list[Path], Path]:
    """(train files, val file): the sorted `*.parquet` files, the last one being val, as upstream."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    files = sorted(p for p in root.glob("*.parquet") if p.is_file())
    if len(files) < 2:
        raise FileNotFoundError(
            f"need at least 2 parquet shards in {root} (train + val), found {len(files)}; "
            "download some with: python -m nanochat_jax.data.dataset -n 8"
        )
    return files[:-1], files[-1]


def iter_texts(files: Iterable[str | os.PathLike], start: int = 0, step: int = 1) -> Iterator[list[str]]:
    """Yield the `text` list of row groups start, start+step, ... of each file, in file order.

    The start/step striding lets each data-parallel rank read a disjoint slice
    (upstream's parquets_iter_batched).
    """
    if start < 0 or step < 1:
        raise ValueError(f"need start >= 0 and step >= 1, got start={start}, step={step}")
    for path in files:
        pf = pq.ParquetFile(path)
        for rg in range(start, pf.num_row_groups, step):
            yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download pretraining shards (plus the val shard).")
    parser.add_argument("-n", "--num-files", type=int, default=-1, help="train shards to fetch (-1: all)")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--data-dir", default=None, help="default: $NANOCHAT_JAX_HOME/<dataset dir>")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="climbmix")
    parser.add_argument("--base-url", default=None, help="replaces the HuggingFace host and prefix")
    args = parser.parse_args(argv)
    try:
        paths = download_shards(
            args.num_files,
            args.data_dir,
            dataset=args.dataset,
            base_url=args.base_url,
            workers=args.num_workers,
        )
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(paths)} shards ready in {paths[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
