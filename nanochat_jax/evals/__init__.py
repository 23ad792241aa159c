"""Evaluation: bits per byte on held-out data (spec §7)."""
