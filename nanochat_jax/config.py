"""GPTConfig and the depth dial (docs/numerics.md#depth-dial): every derived model number lives here.

nanochat turns one integer, --depth, into a whole model. `Dial` is that dial (it keeps
its inputs; `config_for_depth` when only the model is wanted); `GPTConfig` holds nanochat's own fields (the same names its checkpoints store in
`meta_*.json["model_config"]`) and derives everything else (head_dim, padded vocab,
value-embedding layers, sliding windows) so no other module re-derives them.
"""

from __future__ import annotations

import dataclasses
import math

VOCAB_PAD = 64  # vocab padded to a multiple of 64 so ZeRO/FSDP splits of dim 0 divide
SMEAR_CHANNELS = 24  # smear gate reads the first 24 channels of the normalized embedding
VE_GATE_CHANNELS = 12  # value-embedding gate reads the first 12 channels of the block input


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """nanochat's GPTConfig (same fields, same defaults). Validated on construction."""

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"invalid GPTConfig: {msg} (got {self})")

        for name in ("sequence_len", "vocab_size", "n_head", "n_kv_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(f"{name} must be a positive int")
        if not isinstance(self.n_layer, int) or self.n_layer < 1:
            bad("n_layer (depth) must be >= 1")
        if self.n_embd % self.n_head:
            bad(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: head_dim must divide the width")
        if self.n_head % self.n_kv_head:
            bad(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head} (GQA groups must be equal)")
        if self.head_dim % 2:
            bad(f"head_dim={self.head_dim} must be even for the half-split rotary embedding")
        if self.n_embd < SMEAR_CHANNELS:
            bad(f"n_embd must be >= {SMEAR_CHANNELS}: the smear gate reads the first {SMEAR_CHANNELS} channels")
        if not isinstance(self.window_pattern, str) or not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            bad(f"window_pattern={self.window_pattern!r} must be a non-empty string of 'S' (short) and 'L' (long)")

    # ---- derived numbers -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD) * VOCAB_PAD

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def backout_layer(self) -> int:
        """The residual after this block is subtracted (×λ) before the final norm."""
        return self.n_layer // 2

    def has_ve(self, layer: int) -> bool:
        """Value embeddings on alternating layers, the last layer always included."""
        return layer % 2 == (self.n_layer - 1) % 2

    @property
    def ve_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layer) if self.has_ve(i))

    @property
    def short_window(self) -> int:
        """Quarter context rounded up to a multiple of 128 (512 at T=2048)."""
        return math.ceil(math.ceil(self.sequence_len / 4) / 128) * 128

    @property
    def window_sizes(self) -> tuple[int, ...]:
        """Per-layer left window: query i attends keys j with i - left <= j <= i.

        The pattern is tiled over layers and the last layer is always long. Long means
        left = sequence_len (not unbounded), as upstream.
        """
        long, short = self.sequence_len, self.short_window
        sizes = [long if self.window_pattern[i % len(self.window_pattern)] == "L" else short for i in range(self.n_layer)]
        sizes[-1] = long
        return tuple(sizes)

    # ---- (de)serialization in nanochat's meta.json layout -------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Build from nanochat's `model_config`; old checkpoints without window_pattern get "L"."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown model_config keys {sorted(unknown)}; expected a subset of {sorted(fields)}")
        d = dict(d)
        d.setdefault("window_pattern", "L")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Dial:
    """The depth dial's inputs: `config` is the model; scaling derives the d12 reference from the same ones."""

    depth: int
    aspect_ratio: int = 64
    head_dim: int = 128
    max_seq_len: int = 2048
    window_pattern: str = "SSSL"
    vocab_size: int = 32768
    n_kv_head: int | None = None

    def __post_init__(self):
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {self.depth!r}")
        if self.aspect_ratio < 1 or self.head_dim < 1:
            raise ValueError(f"aspect_ratio and head_dim must be >= 1, got {self.aspect_ratio}, {self.head_dim}")

    @property
    def config(self) -> GPTConfig:
        """width = depth·aspect_ratio rounded up to a multiple of head_dim."""
        n_embd = math.ceil(self.depth * self.aspect_ratio / self.head_dim) * self.head_dim
        n_head = n_embd // self.head_dim
        return GPTConfig(sequence_len=self.max_seq_len, vocab_size=self.vocab_size, n_layer=self.depth, n_head=n_head,
                         n_kv_head=n_head if self.n_kv_head is None else self.n_kv_head, n_embd=n_embd,
                         window_pattern=self.window_pattern)


def config_for_depth(depth: int, **dial) -> GPTConfig:
    """The model alone, for callers that need nothing else the dial derives: Dial(depth, ...).config."""
    return Dial(depth, **dial).config
