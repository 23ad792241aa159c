"""The pretraining input pipeline (docs/numerics.md#data) on Grain: shards → texts → tokens → packed batches.

Two readers feed the same tokenize-and-pack tail:

- `pretrain_loader`: streams local parquet shards directly. Host p of n reads row groups
  p, p+n, p+2n, ... of each train file in turn, like upstream's rank striding, forever
  (the epoch is counted in the state). The val split is a single pass.
- `tfds_loader`: a TensorFlow-free TFDS builder turns the shards into array_record once;
  Grain then reads it by index, host p taking documents p, p+n, ... If TFDS cannot be
  imported, it falls back to `pretrain_loader` and warns.

Every stage's get_state/set_state is exact, so a training run resumes on the very next batch.
Shards sort by name and the last one is the val split, as upstream. Batches are made in a
prefetch thread: close() the iterator when done, or Grain's finalizers complain at exit.
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import numpy as np
import pyarrow.parquet as pq

from nanochat_jax.data.packing import BestFitCropIterDataset

EncodeBatch = Callable[[list[str]], list[list[int]]]  # texts → token lists, each already starting with BOS
SPLITS = ("train", "val")
TOKENIZER_BATCH_SIZE = 128  # docs per encode_batch call, and per packer refill (upstream's chunk)
TFDS_NAME = "nanochat_text"

# ---------------------------------------------------------------------------
# Shards and splits


def list_shards(data_dir: str | os.PathLike, exts: Sequence[str] = (".parquet",)) -> list[Path]:
    """Shard files in data_dir, sorted by name (no temp or hidden files)."""
    return sorted(p for p in Path(data_dir).iterdir()
                  if p.suffix in exts and p.is_file() and not p.name.startswith("."))


def split_shards(shards: Sequence[Path], split: str) -> list[Path]:
    """The last shard is val, all others train."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if len(shards) < 2:
        raise ValueError(f"need at least 2 shards (train + the last one as val), found {len(shards)}")
    return list(shards[:-1]) if split == "train" else [shards[-1]]


def read_shard_texts(path: Path) -> Iterator[str]:
    """Documents of one shard: a parquet `text` column, or one per non-empty line of a .txt."""
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
        return
    pf = pq.ParquetFile(path)
    for rg in range(pf.num_row_groups):
        yield from pf.read_row_group(rg, columns=["text"]).column(0).to_pylist()


def host_index(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(p, n), defaulting to this JAX process."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if not 0 <= p < n:
        raise ValueError(f"need 0 <= process_index < process_count, got {p} of {n}")
    return p, n

# ---------------------------------------------------------------------------
# Parquet reader: row-group striding per host


class ParquetTextIterDataset(grain.IterDataset):
    """Texts of the given parquet files; host p of n reads row groups p, p+n, ... of each file in order.

    With repeat=True it starts over at the first file after the last one, epoch + 1.
    """

    def __init__(self, files: Sequence[str | os.PathLike], process_index: int, process_count: int, *,
                 repeat: bool):
        super().__init__()
        self.files = [Path(f) for f in files]
        self.process_index, self.process_count, self.repeat = process_index, process_count, repeat
        if repeat and not any(pq.ParquetFile(f).num_row_groups > process_index for f in self.files):
            # An endless stream with nothing in it would spin forever.
            raise ValueError(f"host {process_index} of {process_count} gets no row groups from "
                             f"{len(self.files)} files: too few row groups for this many hosts")

    def __iter__(self) -> _ParquetTextIterator:
        return _ParquetTextIterator(self)

    def __str__(self) -> str:
        return (f"ParquetTextIterDataset({len(self.files)} files, host {self.process_index} "
                f"of {self.process_count}, repeat={self.repeat})")


class _ParquetTextIterator(grain.DatasetIterator):
    """Position = (epoch, file, row_group, pos); only the current row group is in memory."""

    def __init__(self, cfg: ParquetTextIterDataset):
        super().__init__()
        self._cfg = cfg
        self._epoch, self._file, self._rg, self._pos = 0, 0, cfg.process_index, 0
        self._texts: list[str] | None = None
        self._pf: tuple[int, pq.ParquetFile] | None = None

    def _parquet_file(self) -> pq.ParquetFile:
        if self._pf is None or self._pf[0] != self._file:
            self._pf = (self._file, pq.ParquetFile(self._cfg.files[self._file]))
        return self._pf[1]

    def __next__(self) -> str:
        self._assert_not_closed()
        while self._texts is None:
            if self._file == len(self._cfg.files):
                if not self._cfg.repeat:
                    raise StopIteration
                self._epoch, self._file = self._epoch + 1, 0
            elif self._rg >= self._parquet_file().num_row_groups:
                self._file, self._rg, self._pos = self._file + 1, self._cfg.process_index, 0
            else:
                table = self._parquet_file().read_row_group(self._rg, columns=["text"])
                self._texts = table.column(0).to_pylist()
                if self._pos >= len(self._texts):
                    self._texts, self._rg, self._pos = None, self._rg + self._cfg.process_count, 0
        text = self._texts[self._pos]
        self._pos += 1
        if self._pos == len(self._texts):
            self._texts, self._rg, self._pos = None, self._rg + self._cfg.process_count, 0
        return text

    def get_state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "file": self._file, "row_group": self._rg, "pos": self._pos}

    def set_state(self, state: dict[str, int]) -> None:
        self._epoch, self._file = int(state["epoch"]), int(state["file"])
        self._rg, self._pos = int(state["row_group"]), int(state["pos"])
        self._texts = None

    def __str__(self) -> str:
        return f"_ParquetTextIterator({self._cfg})"

# ---------------------------------------------------------------------------
# Tokenization in chunks


class EncodeIterDataset(grain.IterDataset):
    """Texts → token lists, `chunk_size` texts per encode_batch call (batched BPE is much faster)."""

    def __init__(self, parent: grain.IterDataset, encode_batch: EncodeBatch, chunk_size: int = TOKENIZER_BATCH_SIZE):
        super().__init__(parent)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.encode_batch, self.chunk_size = encode_batch, chunk_size

    def __iter__(self) -> _EncodeIterator:
        return _EncodeIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"EncodeIterDataset(chunk_size={self.chunk_size})"


class _EncodeIterator(grain.DatasetIterator):
    """State = the parent's state before the current chunk + how many of its docs were handed out.

    Restoring re-reads and re-encodes that chunk (encoding is deterministic). When the chunk
    is used up, as it is whenever the packer pulls whole chunks, the state is just the parent's.
    """

    def __init__(self, parent: grain.DatasetIterator, cfg: EncodeIterDataset):
        super().__init__(parent)
        self._cfg = cfg
        self._chunk_state: Any = None
        self._docs: list[list[int]] = []
        self._next = 0
        self._skip = 0  # docs of the next chunk already handed out before a restore

    def _encode_next_chunk(self) -> None:
        self._chunk_state = self._parent.get_state()
        texts = list(itertools.islice(self._parent, self._cfg.chunk_size))
        if not texts:
            raise StopIteration
        docs = self._cfg.encode_batch(texts)
        if len(docs) != len(texts):
            raise ValueError(f"encode_batch returned {len(docs)} docs for {len(texts)} texts")
        self._docs, self._next, self._skip = docs, self._skip, 0

    def __next__(self) -> list[int]:
        self._assert_not_closed()
        while self._next >= len(self._docs):
            self._encode_next_chunk()
        doc = self._docs[self._next]
        self._next += 1
        return doc

    def get_state(self) -> dict[str, Any]:
        if self._next < len(self._docs):
            return {"parent": self._chunk_state, "skip": self._next}
        return {"parent": self._parent.get_state(), "skip": self._skip}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._docs, self._next, self._skip = [], 0, int(state["skip"])

    def __str__(self) -> str:
        return f"_EncodeIterator({self._cfg})"


def tokenize_and_pack(texts: grain.IterDataset, encode_batch: EncodeBatch, bos_id: int, batch_size: int,
                      seq_len: int, *, buffer_size: int = 1000, prefetch: int = 2) -> grain.IterDataset:
    """The shared tail: chunked encoding, best-fit packing, and a prefetch thread so the host works
    on the next batches while the device trains (prefetch=0 turns it off)."""
    docs = EncodeIterDataset(texts, encode_batch)
    batches = BestFitCropIterDataset(docs, batch_size, seq_len, bos_id, buffer_size=buffer_size,
                                     chunk_size=TOKENIZER_BATCH_SIZE)
    if not prefetch:
        return batches
    return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)


def pretrain_loader(data_dir: str | os.PathLike, encode_batch: EncodeBatch, bos_id: int, batch_size: int,
                    seq_len: int, *, split: str = "train", process_index: int | None = None,
                    process_count: int | None = None, buffer_size: int = 1000,
                    prefetch: int = 2) -> grain.IterDataset:
    """{"inputs", "targets"} int32 (batch_size, seq_len) batches from the parquet shards in data_dir.

    Train is endless; val is one pass (its last, partial batch is dropped).
    """
    p, n = host_index(process_index, process_count)
    files = split_shards(list_shards(data_dir), split)
    texts = ParquetTextIterDataset(files, p, n, repeat=split == "train")
    return tokenize_and_pack(texts, encode_batch, bos_id, batch_size, seq_len,
                             buffer_size=buffer_size, prefetch=prefetch)


def val_batches(data_dir: str | os.PathLike, encode_batch: EncodeBatch, bos_id: int, batch_size: int,
                seq_len: int, num_batches: int | None = None, *, process_index: int | None = None,
                process_count: int | None = None, buffer_size: int = 1000) -> list[dict[str, np.ndarray]]:
    """The first num_batches batches (None: all) of the val split, held in memory so that every
    evaluation scores the same tokens."""
    ds = pretrain_loader(data_dir, encode_batch, bos_id, batch_size, seq_len, split="val",
                         process_index=process_index, process_count=process_count,
                         buffer_size=buffer_size, prefetch=0)
    batches = list(itertools.islice(iter(ds), num_batches))
    if num_batches is not None and len(batches) < num_batches:
        raise ValueError(f"the val split gives only {len(batches)} batches of {batch_size}x{seq_len} "
                         f"on this host, {num_batches} were asked for")
    return batches

# ---------------------------------------------------------------------------
# TFDS (no TensorFlow): array_record once, then Grain random access


@functools.cache
def tfds_builder_class() -> type:
    """The builder class, defined on first use so that importing this module never needs TFDS."""
    import tensorflow_datasets as tfds

    class NanochatText(tfds.core.GeneratorBasedBuilder):
        """Local text shards as array_record, in shard order; the last shard (by name) is val."""

        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the shards in manual_dir: *.parquet with a `text` column "
                                        "and/or *.txt with one document per line.")

        def _info(self):
            # disable_shuffling keeps document order; DatasetInfo(builder=self) needs no metadata files.
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            shards = list_shards(os.fspath(dl_manager.manual_dir), (".parquet", ".txt"))
            return {s: self._generate_examples(split_shards(shards, s)) for s in SPLITS}

        def _generate_examples(self, paths):
            texts = itertools.chain.from_iterable(read_shard_texts(p) for p in paths)
            for i, text in enumerate(texts):
                yield i, {"text": text}

    return NanochatText


def prepare_tfds(shard_dir: str | os.PathLike, tfds_dir: str | os.PathLike):
    """Builds the array_record dataset under tfds_dir from the shards in shard_dir (a no-op once built)."""
    import tensorflow_datasets as tfds

    builder = tfds_builder_class()(data_dir=os.fspath(tfds_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(shard_dir)))
    return builder


def _example_text(example: dict[str, Any]) -> str:
    return example["text"].decode("utf-8")


def tfds_loader(tfds_dir: str | os.PathLike, encode_batch: EncodeBatch, bos_id: int, batch_size: int,
                seq_len: int, *, shard_dir: str | os.PathLike | None = None, split: str = "train",
                process_index: int | None = None, process_count: int | None = None,
                buffer_size: int = 1000, prefetch: int = 2) -> grain.IterDataset:
    """Like pretrain_loader, but reads the TFDS array_record build (made first from shard_dir if given).

    Host p of n takes documents p, p+n, ... of the split. If TFDS cannot be imported, this
    falls back to pretrain_loader over shard_dir (parquet only, row-group striding) with a warning.
    The build is not safe to run from several hosts at once on a shared tfds_dir: build first
    (prepare_tfds), then pass shard_dir=None everywhere.
    """
    p, n = host_index(process_index, process_count)
    try:
        import tensorflow_datasets as tfds

        tfds_builder_class()
    except Exception as e:  # noqa: BLE001 — any TFDS breakage means: use the plain parquet reader
        if shard_dir is None:
            raise
        warnings.warn(f"TFDS is unavailable ({e!r}); FALLING BACK to the parquet reader over {shard_dir}",
                      RuntimeWarning, stacklevel=2)
        return pretrain_loader(shard_dir, encode_batch, bos_id, batch_size, seq_len, split=split,
                               process_index=p, process_count=n, buffer_size=buffer_size, prefetch=prefetch)
    if shard_dir is not None:
        prepare_tfds(shard_dir, tfds_dir)
    source = tfds.data_source(TFDS_NAME, split=split, data_dir=os.fspath(tfds_dir), download=False)
    docs = grain.MapDataset.source(source)[p::n]
    if split == "train":
        docs = docs.repeat()
    texts = docs.map(_example_text).to_iter_dataset()
    return tokenize_and_pack(texts, encode_batch, bos_id, batch_size, seq_len,
                             buffer_size=buffer_size, prefetch=prefetch)
