"""SFT batches (docs/numerics.md#sft-packing): conversations packed best-fit into rows, padded, never cropped.

Process r walks the conversation list at r, r+W, r+2W, ... (wrapping into the next epoch).
Each conversation is rendered once into (ids, mask) (truncated to a row) and buffered; a row
of T+1 tokens repeatedly takes the largest buffered conversation that fits entirely, and
when none fits the rest of the row is BOS padding. Targets are -1 wherever the mask is 0,
so only assistant tokens carry loss.

A checkpointable Grain IterDataset: the state is the cursor plus the buffered conversations,
so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any, Callable

import grain
import numpy as np

from nanochat_jax.data.packing import TOKEN_DTYPE, _from_blob, _to_blob

Render = Callable[[int], tuple[list[int], list[int]]]  # index → (ids, mask)


class SFTPackIterDataset(grain.IterDataset):
    """Yields {"inputs", "targets"} int32 (B, T) plus "consumed" and "epoch" after the batch.

    render(i) gives conversation i's (ids, mask), i in [0, num_conversations). `consumed`
    counts conversations packed by all processes (upstream's progress numerator): it starts at
    the process index and grows by the process count per conversation.
    """

    def __init__(self, render: Render, num_conversations: int, batch_size: int, seq_len: int, bos_id: int, *,
                 process_index: int = 0, process_count: int = 1, buffer_size: int = 100):
        super().__init__()
        if num_conversations < 1:
            raise ValueError("SFT needs at least one conversation")
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("buffer_size", buffer_size)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.render, self.n, self.batch_size, self.seq_len = render, num_conversations, batch_size, seq_len
        self.bos_id, self.buffer_size = int(bos_id), buffer_size
        self.process_index, self.process_count = process_index, process_count

    def __iter__(self) -> _SFTPackIterator:
        return _SFTPackIterator(self)


class _SFTPackIterator(grain.DatasetIterator):
    def __init__(self, cfg: SFTPackIterDataset):
        super().__init__()
        self._cfg = cfg
        self._cursor = cfg.process_index  # next position in the endless r, r+W, ... walk
        self._consumed = cfg.process_index
        self._buffer: list[tuple[np.ndarray, np.ndarray]] = []

    def _refill(self) -> None:
        cfg = self._cfg
        while len(self._buffer) < cfg.buffer_size:
            ids, mask = cfg.render(self._cursor % cfg.n)
            ids, mask = ids[:cfg.seq_len + 1], mask[:cfg.seq_len + 1]
            if not ids or ids[0] != cfg.bos_id or len(ids) != len(mask):
                raise ValueError(f"conversation {self._cursor % cfg.n}: render must give equal-length ids and "
                                 f"mask starting with BOS ({cfg.bos_id})")
            self._buffer.append((np.asarray(ids, TOKEN_DTYPE), np.asarray(mask, np.int8)))
            self._cursor += cfg.process_count

    def _fill_row(self, ids_t: np.ndarray, mask_t: np.ndarray) -> None:
        pos, cap = 0, len(ids_t)
        while True:
            self._refill()
            fits = [i for i, (ids, _) in enumerate(self._buffer) if len(ids) <= cap - pos]
            if not fits:
                break
            best = max(fits, key=lambda i: (len(self._buffer[i][0]), -i))  # largest, first on ties
            ids, mask = self._buffer.pop(best)
            ids_t[pos:pos + len(ids)], mask_t[pos:pos + len(ids)] = ids, mask
            pos += len(ids)
            self._consumed += self._cfg.process_count
        ids_t[pos:], mask_t[pos:] = self._cfg.bos_id, 0

    def __next__(self) -> dict[str, Any]:
        self._assert_not_closed()
        cfg = self._cfg
        ids_bt = np.empty((cfg.batch_size, cfg.seq_len + 1), np.int32)
        mask_bt = np.empty((cfg.batch_size, cfg.seq_len + 1), np.int8)
        for ids_t, mask_t in zip(ids_bt, mask_bt):
            self._fill_row(ids_t, mask_t)
        targets = np.where(mask_bt[:, 1:] == 1, ids_bt[:, 1:], -1).astype(np.int32)
        return {"inputs": ids_bt[:, :-1].copy(), "targets": targets, "consumed": self._consumed,
                "epoch": self._consumed // cfg.n}

    def get_state(self) -> dict[str, Any]:
        return {"cursor": self._cursor, "consumed": self._consumed,
                "buffer": [[_to_blob(ids), _to_blob(mask.astype(TOKEN_DTYPE))] for ids, mask in self._buffer]}

    def set_state(self, state: dict[str, Any]) -> None:
        self._cursor, self._consumed = int(state["cursor"]), int(state["consumed"])
        self._buffer = [(_from_blob(a), _from_blob(b).astype(np.int8)) for a, b in state["buffer"]]


def sft_lr_multiplier(progress: float, warmdown_ratio: float = 0.5, final_lr_frac: float = 0.0) -> float:
    """1 until progress 1 − warmdown_ratio, then linear to final_lr_frac at progress 1 (upstream's SFT)."""
    if progress <= 1 - warmdown_ratio:
        return 1.0
    frac = min(1.0, (progress - (1 - warmdown_ratio)) / warmdown_ratio)
    return (1 - frac) * 1.0 + frac * final_lr_frac
