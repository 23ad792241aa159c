"""Evaluation: bits per byte on held-out data, CORE, ChatCORE (docs/numerics.md#evaluation)."""
