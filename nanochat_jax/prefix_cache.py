"""Prefix reuse across chat turns: a bounded, LRU-evicted store of prefilled prompts.

Each turn of a conversation is a prompt that starts with the whole previous prompt, so the
scheduler keeps every prompt it prefills (engine.Prefix: one-row k/v, length, the smear's
prev_C) and, for a new prompt, prefills only what follows the longest stored one
(engine.prefill_from). Entries are whole prompts, not blocks: the smear needs the
pre-smear embedding of the token before the cut, and a prefill yields it for its last
token only. A hit never covers the whole prompt: its last token is fed to get the logits.

Entries live on the device. The bound counts their bytes (k/v at bucket length); the least
recently used entries go first. A lock guards the table, though only the scheduler's
loop thread uses it today.
"""

from __future__ import annotations

import collections
import threading

import jax

from nanochat_jax.engine import MIN_BUCKET, Prefix


class PrefixCache:
    """Prompt token tuple -> engine.Prefix (its logits dropped), at most max_bytes in all."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = self.reused_tokens = 0
        self._entries: collections.OrderedDict[tuple, tuple[Prefix, int]] = collections.OrderedDict()  # oldest first
        self._lengths = collections.Counter()  # stored prompt lengths, longest tried first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt) -> tuple[int, Prefix | None]:
        """(length, prefill) of the longest stored prompt that is a prefix of `prompt` and
        shorter than it; (0, None) when there is none."""
        n = len(prompt)
        with self._lock:
            for length in sorted((m for m in self._lengths if m < n), reverse=True):
                key = tuple(prompt[:length])
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    self.reused_tokens += length
                    return length, self._entries[key][0]
            self.misses += 1
            return 0, None

    def store(self, prompt, prefix: Prefix) -> None:
        """Keep `prefix` (the prefill of exactly `prompt`), evicting the least recently used
        entries until the store fits. Prompts under MIN_BUCKET tokens (too short to be worth an
        entry) and entries larger than the whole bound are not kept."""
        if len(prompt) < MIN_BUCKET:
            return
        prefix = prefix._replace(logits_V=None)
        size = sum(a.nbytes for a in jax.tree.leaves(prefix))
        key = tuple(int(t) for t in prompt)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = (prefix, size)
            self._lengths[len(key)] += 1
            self.bytes += size
            while self.bytes > self.max_bytes:
                old, (_, old_size) = self._entries.popitem(last=False)
                self.bytes -= old_size
                self._lengths[len(old)] -= 1
                if not self._lengths[len(old)]:
                    del self._lengths[len(old)]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._lengths.clear()
            self.bytes = 0

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
                "reused_tokens": self.reused_tokens}
