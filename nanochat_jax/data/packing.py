"""BOS-aligned best-fit crop packing (docs/numerics.md#packing) as a checkpointable Grain stage.

Every row holds T+1 tokens and starts with a document's BOS. A row is filled by
repeatedly taking, from a buffer of >= `buffer_size` tokenized documents, the largest
document that fits entirely (first one on ties); when none fits, the shortest document
is cropped to the space left and its tail is thrown away. No padding, no masking.

Unlike upstream, resume is exact: the iterator state holds the parent's state plus the
buffered documents, so a restored iterator yields the very batches an uninterrupted one
would have. (Grain's own experimental.BestFitPackIterDataset packs whole documents with
segment ids, which is a different thing.)
"""

from __future__ import annotations

import base64
from typing import Any, Sequence

import grain
import numpy as np

TOKEN_DTYPE = np.dtype("<i4")  # little-endian int32: the packer's tokens, outputs and state


def _to_blob(doc: np.ndarray) -> str:
    """A doc as JSON-safe text for the iterator state (base64 of its int32 bytes)."""
    return base64.b64encode(doc.tobytes()).decode("ascii")


def _from_blob(blob: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(blob), dtype=TOKEN_DTYPE)


class BestFitCropIterDataset(grain.IterDataset):
    """Packs a stream of BOS-prefixed token lists into {"inputs", "targets"} int32 (B, T) batches,
    where targets are inputs shifted left by one (each row is T+1 tokens).

    The buffer is topped up with `chunk_size` documents at a time whenever it holds fewer
    than `buffer_size` (upstream adds one tokenizer batch of 128). A finite parent ends the
    stream at the first batch that the remaining documents cannot fill; that batch is dropped.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int, seq_len: int, bos_id: int, *,
                 buffer_size: int = 1000, chunk_size: int = 128):
        super().__init__(parent)
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len),
                        ("buffer_size", buffer_size), ("chunk_size", chunk_size)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.batch_size, self.seq_len, self.bos_id = batch_size, seq_len, int(bos_id)
        self.buffer_size, self.chunk_size = buffer_size, chunk_size

    def __iter__(self) -> _BestFitCropIterator:
        return _BestFitCropIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return (f"BestFitCropIterDataset(batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"buffer_size={self.buffer_size})")


class _BestFitCropIterator(grain.DatasetIterator):
    """The buffer, in arrival order: each doc's true length, its first T+1 tokens, and their state blob.

    A doc longer than a row can only ever be cropped, so only its head is kept (bounding
    memory and state at 1000 x (T+1) tokens, though such docs pile up in the buffer), while
    its true length still decides the picks. Blobs are made once, when a doc arrives, so
    get_state stays cheap even when a prefetch thread calls it after every batch.
    """

    def __init__(self, parent: grain.DatasetIterator, cfg: BestFitCropIterDataset):
        super().__init__(parent)
        self._cfg = cfg
        self._lens_n = np.zeros(0, dtype=np.int64)
        self._heads: list[np.ndarray] = []
        self._blobs: list[str] = []
        self._parent_done = False

    def _append(self, lens: Sequence[int], heads: Sequence[np.ndarray], blobs: Sequence[str]) -> None:
        self._lens_n = np.concatenate([self._lens_n, np.asarray(lens, dtype=np.int64).reshape(-1)])
        self._heads.extend(heads)
        self._blobs.extend(blobs)

    def _refill(self) -> None:
        """Tops the buffer up by whole chunks while it is below buffer_size."""
        while len(self._heads) < self._cfg.buffer_size and not self._parent_done:
            lens, heads = [], []
            for _ in range(self._cfg.chunk_size):
                try:
                    doc = next(self._parent)
                except StopIteration:
                    self._parent_done = True
                    break
                lens.append(len(doc))
                heads.append(self._head(doc))
            self._append(lens, heads, [_to_blob(h) for h in heads])

    def _head(self, doc: Any) -> np.ndarray:
        """A doc's first T+1 tokens as int32 (only those are ever used); it must start with BOS."""
        head = np.array(doc[:self._cfg.seq_len + 1], dtype=TOKEN_DTYPE)
        if head.ndim != 1 or len(head) == 0 or head[0] != self._cfg.bos_id:
            raise ValueError(f"every document must be a 1-D token list starting with BOS "
                             f"({self._cfg.bos_id}); got one starting {head.ravel()[:8].tolist()}")
        return head

    def _pick(self, room: int) -> int:
        """Index of the largest doc that fits (first on ties), else of the shortest doc (first on ties)."""
        fitting_n = np.where(self._lens_n <= room, self._lens_n, 0)
        i = int(np.argmax(fitting_n))
        return i if fitting_n[i] > 0 else int(np.argmin(self._lens_n))

    def _pop(self, i: int) -> np.ndarray:
        self._lens_n = np.delete(self._lens_n, i)
        self._blobs.pop(i)
        return self._heads.pop(i)

    def _fill_row(self, row_t: np.ndarray) -> None:
        pos, cap = 0, len(row_t)
        while pos < cap:
            self._refill()
            if not self._heads:
                raise StopIteration
            head = self._pop(self._pick(cap - pos))
            n = min(len(head), cap - pos)  # fewer than the doc's tokens only when nothing fit: the crop
            row_t[pos:pos + n] = head[:n]
            pos += n

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        rows_bt = np.empty((self._cfg.batch_size, self._cfg.seq_len + 1), dtype=np.int32)
        for row_t in rows_bt:
            self._fill_row(row_t)
        return {"inputs": rows_bt[:, :-1].copy(), "targets": rows_bt[:, 1:].copy()}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "lens": self._lens_n.tolist(), "heads": list(self._blobs),
                "parent_done": self._parent_done}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._lens_n, self._heads, self._blobs = np.zeros(0, dtype=np.int64), [], []
        blobs = list(state["heads"])
        self._append(state["lens"], [_from_blob(b) for b in blobs], blobs)
        self._parent_done = bool(state["parent_done"])

    def __str__(self) -> str:
        return f"_BestFitCropIterator({self._cfg})"

