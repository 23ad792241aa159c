"""Where nanochat-jax keeps its files: one home directory, $NANOCHAT_JAX_HOME or ~/.cache/nanochat-jax.

Every default location is a function (read at call time, so tests can redirect the home with
monkeypatch.setenv) and lives here, so no module imports another just to find a folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    """$NANOCHAT_JAX_HOME, else ~/.cache/nanochat-jax."""
    return Path(os.environ.get("NANOCHAT_JAX_HOME") or Path.home() / ".cache" / "nanochat-jax")


def tokenizer_dir() -> Path:
    return home_dir() / "tokenizer"


def pretrain_data_dir() -> Path:
    """The ClimbMix shards once two (train + val) are there, else the offline corpus."""
    climbmix = home_dir() / "base_data_climbmix"
    return climbmix if len(list(climbmix.glob("*.parquet"))) >= 2 else offline_corpus_dir()


def offline_corpus_dir() -> Path:
    return home_dir() / "base_data_offline"


def offline_sources_dir() -> Path:
    return home_dir() / "offline_sources"


def offline_sft_path() -> Path:
    return home_dir() / "sft_data_offline" / "chatterbot_english.jsonl"


def offline_pref_path() -> Path:
    return home_dir() / "pref_data_offline" / "chatterbot_pairs.jsonl"


def task_data_dir() -> Path:
    return home_dir() / "task_data"


def package_dir() -> Path:
    return task_data_dir() / "packages"


def bundle_dir() -> Path:
    return home_dir() / "eval_bundle"
