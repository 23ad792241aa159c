"""Preference pairs for DPO: formats, tasks, rendering with the chat template, cropping, batching.

A pair, once read, is always {"messages": [prompt turns, ending with the user], "chosen": str,
"rejected": str}: one prompt and two candidate assistant replies, the first preferred. Files may
use any of the layouts people publish pairs in (normalize_pair):

    {"messages": [...prompt...], "chosen": "...", "rejected": "..."}          # ours
    {"prompt": "..." or [...messages...], "chosen": "...", "rejected": "..."}  # the common flat one
    {"chosen": [...conversation...], "rejected": [...conversation...]}        # full conversations that
        differ only in the last assistant turn (UltraFeedback binarized adds a "prompt" string)
    {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": "..."}      # Anthropic HH-RLHF text

Tasks (mixture strings like SFT's, parse_preference_mixture):
- `jsonl=PATH`: PreferenceJSONL, strict: a bad line is an error naming the file and line;
- `hh-rlhf[@train|@test]`: Anthropic/hh-rlhf through the HF parquet downloader (tasks/hub.py); rows
  whose transcripts do not parse into one shared prompt and two non-empty replies are skipped and
  counted (real data has a few hundred of them), never an error;
- `chatterbot-pairs`: the offline set (data/corpus.py build_offline_pairs), written on first use.

Rendering: render_conversation of prompt + reply gives the ids and the chat template's loss
mask; only the final reply (its text and <|assistant_end|>) is supervised, earlier assistant
turns of a multi-turn prompt are context.

Length rule (fit_pair): sequences are never packed (a neighbour in the row would change a
reply's log-prob, the quantity DPO compares with the reference's) and replies are never cut
(a cut reply is a different reply). If prompt + the longer reply exceeds the row, the prompt
loses tokens from its start, BOS kept, down to at least MIN_PROMPT_TOKENS; if even that does
not fit, the pair is skipped. Both outcomes are counted and logged.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import grain
import numpy as np

from nanochat_jax.data.corpus import PAIRS_SEED, build_offline_pair_file
from nanochat_jax.tasks.common import Task, TaskMixture
from nanochat_jax.tasks.hub import HubTask, check_chat, field, parse_jsonl_file

MIN_PROMPT_TOKENS = 8  # a cropped prompt keeps at least this many tokens after BOS


# ----------------------------------------------------------------------------- formats


def _reply(value, what: str) -> str:
    """A reply given as a string, one assistant message, or a one-message list."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            raise ValueError(f"{what}: a message reply must have role 'assistant', got {value.get('role')!r}")
        value = value.get("content")
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string (or one assistant message), got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def _prompt(messages, what: str = "prompt") -> list[dict]:
    """Prompt turns: optional system, then user/assistant alternating, ending with a user turn."""
    try:
        check_chat(messages, allow_system=True, min_turns=1)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if messages[-1]["role"] != "user":
        raise ValueError(f"{what} must end with a user turn, got {messages[-1]['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' → [{"role": "user", ...}, {"role": "assistant", ...}, ...]."""
    if not isinstance(text, str):
        raise ValueError(f"transcript must be a string, got {type(text).__name__}")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("transcript does not start with '\\n\\nHuman:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _split_conversations(chosen: list, rejected: list) -> tuple[list[dict], str, str]:
    """Two conversations that share every turn but the last, an assistant reply each."""
    for conv, name in ((chosen, "chosen"), (rejected, "rejected")):
        if not conv or not isinstance(conv[-1], dict) or conv[-1].get("role") != "assistant":
            raise ValueError(f"{name} conversation must end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected conversations must share every turn before the final reply")
    return _prompt(chosen[:-1]), _reply(chosen[-1], "chosen reply"), _reply(rejected[-1], "rejected reply")


def normalize_pair(row) -> dict:
    """Any supported layout (see the module doc) → {"messages", "chosen", "rejected"}; ValueError otherwise."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"missing field {key!r}")
    chosen, rejected = row["chosen"], row["rejected"]
    if "messages" in row:
        prompt, c, r = _prompt(row["messages"], "messages"), _reply(chosen, "chosen"), _reply(rejected, "rejected")
    elif isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1:
        prompt, c, r = _split_conversations(chosen, rejected)
        if isinstance(row.get("prompt"), str) and prompt[-1]["content"].strip() != row["prompt"].strip():
            raise ValueError("field 'prompt' differs from the conversations' last user turn")
    elif "prompt" in row:
        p = row["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise ValueError("prompt is empty")
            p = [{"role": "user", "content": p}]
        prompt, c, r = _prompt(p), _reply(chosen, "chosen"), _reply(rejected, "rejected")
    elif isinstance(chosen, str) and isinstance(rejected, str) and chosen.lstrip(" ").startswith("\n\nHuman:"):
        prompt, c, r = _split_conversations(parse_hh_transcript(chosen), parse_hh_transcript(rejected))
    else:
        raise ValueError("unknown pair layout: expected 'messages' or 'prompt' with chosen/rejected replies, "
                         "chosen/rejected conversations, or HH-RLHF transcripts")
    if c == r:
        raise ValueError("chosen and rejected replies are identical")
    return {"messages": prompt, "chosen": c, "rejected": r}


# ----------------------------------------------------------------------------- tasks


class PreferenceJSONL(Task):
    """Pairs from a local JSONL file, in file order; a bad line is a ValueError naming file and line."""

    def __init__(self, path: str | os.PathLike, **slice_kw):
        super().__init__(**slice_kw)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such preference file (one JSON pair per line; "
                                    "an offline set: python -m nanochat_jax.data.preference offline)")
        self.pairs = parse_jsonl_file(self.path, normalize_pair)
        if not self.pairs:
            raise ValueError(f"{self.path}: no pairs")

    def num_examples(self) -> int:
        return len(self.pairs)

    def get_example(self, index: int) -> dict:
        return self.pairs[index]


class HHRLHF(HubTask):
    """Anthropic HH-RLHF (helpful + harmless, ~161K train / 8.5K test pairs) in its published layout:
    columns chosen / rejected, each a full '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript.

    Rows that do not split into a shared prompt and two different non-empty replies are left out;
    `skipped` counts them by reason."""

    repo_id = "Anthropic/hh-rlhf"
    subsets = ("default",)
    splits = ("train", "test")
    columns = ("chosen", "rejected")
    required = ("chosen", "rejected")

    def __init__(self, split: str = "train", subset: str = "default", **kw):
        super().__init__(subset, split, **kw)
        table, perm = self.ds.table, self.ds.perm
        chosen, rejected = table.column("chosen").to_pylist(), table.column("rejected").to_pylist()
        self.valid, self.skipped = [], {}
        for i in range(len(self.ds)):
            j = int(perm[i]) if perm is not None else i
            try:
                normalize_pair({"chosen": chosen[j], "rejected": rejected[j]})
            except ValueError as exc:
                reason = re.sub(r"'[^']*'", "'…'", str(exc))
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
                continue
            self.valid.append(i)

    def validate_row(self, row: dict) -> None:
        field(row, "chosen", str)
        field(row, "rejected", str)

    def conversation(self, row: dict) -> dict:
        return normalize_pair({"chosen": row["chosen"], "rejected": row["rejected"]})

    def num_examples(self) -> int:
        return len(self.valid)

    def get_example(self, index: int) -> dict:
        return HubTask.get_example(self, self.valid[index])


# ----------------------------------------------------------------------------- the offline set


def _offline_task() -> Task:
    from nanochat_jax.data.corpus import offline_pair_file

    return TaskMixture([PreferenceJSONL(offline_pair_file())])  # the same shuffle as the `chatterbot` SFT task


def _preference_task(name: str, split: str | None, entry: str, data_dir) -> Task:
    if name.startswith("jsonl="):
        return PreferenceJSONL(name[len("jsonl="):])
    if name == "chatterbot-pairs":
        return _offline_task()
    if name == "hh-rlhf":
        local = Path(data_dir) / name if data_dir else None
        return HHRLHF(split or "train", **({"data_dir": local} if local is not None and local.exists() else {}))
    raise ValueError(f"unknown preference task {name!r} in {entry!r}; known: chatterbot-pairs, hh-rlhf, jsonl=PATH")


def parse_preference_mixture(spec: str, data_dir=None) -> TaskMixture:
    """Comma-separated entries NAME[@SPLIT][[START:STOP]][*REPEAT] (the SFT mixture syntax) with
    NAME one of chatterbot-pairs, hh-rlhf, jsonl=PATH; with data_dir, DIR/hh-rlhf/ holds local files."""
    from nanochat_jax.tasks.spec import _mixture, _parse

    def make(name, split, entry):
        return _preference_task(name, split, entry, data_dir)

    return _mixture(spec, lambda entry: _parse(entry, make, "preference",
                                               "hh-rlhf@train[:1000] or jsonl=/path/pairs.jsonl"), "preference")


# ----------------------------------------------------------------------------- rendering and the length rule


def render_pair(tok, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids ending in <|assistant_start|>, chosen reply ids, rejected reply ids), from the chat
    template: the reply ids are exactly the tokens render_conversation masks 1 after the prompt."""
    prompt = tok.render_for_completion({"messages": pair["messages"]})
    replies = []
    for key in ("chosen", "rejected"):
        conv = {"messages": [*pair["messages"], {"role": "assistant", "content": pair[key]}]}
        ids, mask = tok.render_conversation(conv, max_tokens=None)
        if ids[:len(prompt)] != prompt or not all(mask[len(prompt):]):
            raise ValueError(f"{key}: the chat template did not render the reply after the prompt")  # pragma: no cover
        replies.append(ids[len(prompt):])
    return prompt, replies[0], replies[1]


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_len: int,
             min_prompt: int = MIN_PROMPT_TOKENS) -> tuple[list[int] | None, str]:
    """(prompt to use, "ok" | "cropped") or (None, "skipped"): see the module doc's length rule."""
    room = max_len - max(len(chosen), len(rejected))
    if len(prompt) <= room:
        return prompt, "ok"
    keep = room - 1  # after BOS
    if keep < min(min_prompt, len(prompt) - 1):
        return None, "skipped"
    return [prompt[0], *prompt[len(prompt) - keep:]], "cropped"


def pair_rows(prompt: list[int], chosen: list[int], rejected: list[int], row_len: int, pad_id: int):
    """Two rows of row_len = T+1 tokens (chosen, rejected) and their masks (1 on the reply only)."""
    ids = np.full((2, row_len), pad_id, np.int32)
    mask = np.zeros((2, row_len), np.int8)
    for k, reply in enumerate((chosen, rejected)):
        seq = prompt + reply
        ids[k, :len(seq)] = seq
        mask[k, len(prompt):len(seq)] = 1
    return ids, mask


# ----------------------------------------------------------------------------- batches


RenderPair = Callable[[int], tuple[list[int], list[int], list[int]]]  # index → (prompt, chosen, rejected)


class PreferencePairIterDataset(grain.IterDataset):
    """Yields batches of `pairs` pairs as 2·pairs rows, chosen and rejected interleaved (row 2k is pair
    k's chosen, 2k+1 its rejected), each padded to T+1 tokens: {"inputs", "targets"} int32 (2P, T),
    "pair_ids" (P,), "ref_logps" (2P,) float32 (the reference's log-prob of each row) when every pair of
    the batch is in the reference cache (else None), and "consumed", "epoch", "cropped", "skipped" after the batch.

    Process r walks pairs r, r+W, ... (wrapping into later epochs), like the SFT loader. The
    reference cache (remember()) is part of the iterator state, so a resumed run sees the same
    reference numbers as one that never stopped.
    """

    def __init__(self, render: RenderPair, num_pairs: int, pairs: int, seq_len: int, pad_id: int, *,
                 process_index: int = 0, process_count: int = 1, min_prompt: int = MIN_PROMPT_TOKENS):
        super().__init__()
        if num_pairs < 1:
            raise ValueError("DPO needs at least one preference pair")
        for name, v in (("pairs", pairs), ("seq_len", seq_len)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.render, self.n, self.pairs, self.seq_len, self.pad_id = render, num_pairs, pairs, seq_len, int(pad_id)
        self.process_index, self.process_count, self.min_prompt = process_index, process_count, min_prompt

    def __iter__(self) -> _PairIterator:
        return _PairIterator(self)


class _PairIterator(grain.DatasetIterator):
    def __init__(self, cfg: PreferencePairIterDataset):
        super().__init__()
        self._cfg = cfg
        self._cursor = cfg.process_index
        self._consumed = cfg.process_index
        self._cropped = self._skipped = 0
        self.cache: dict[int, tuple[float, float]] = {}

    def _next_pair(self):
        cfg = self._cfg
        for _ in range(cfg.n + 1):
            idx = self._cursor % cfg.n
            self._cursor += cfg.process_count
            self._consumed += cfg.process_count
            prompt, chosen, rejected = cfg.render(idx)
            fitted, status = fit_pair(prompt, chosen, rejected, cfg.seq_len + 1, cfg.min_prompt)
            if status == "skipped":
                self._skipped += 1
                continue
            self._cropped += status == "cropped"
            return idx, pair_rows(fitted, chosen, rejected, cfg.seq_len + 1, cfg.pad_id)
        raise ValueError(f"no preference pair fits a {cfg.seq_len + 1}-token row (every reply is too long); "
                         "raise --max-seq-len")

    def __next__(self) -> dict[str, Any]:
        self._assert_not_closed()
        cfg = self._cfg
        ids = np.empty((2 * cfg.pairs, cfg.seq_len + 1), np.int32)
        mask = np.empty((2 * cfg.pairs, cfg.seq_len + 1), np.int8)
        pair_ids = np.empty(cfg.pairs, np.int64)
        for k in range(cfg.pairs):
            pair_ids[k], (ids[2 * k:2 * k + 2], mask[2 * k:2 * k + 2]) = self._next_pair()
        targets = np.where(mask[:, 1:] == 1, ids[:, 1:], -1).astype(np.int32)
        cached = [self.cache.get(int(i)) for i in pair_ids]
        ref = None if any(c is None for c in cached) else np.asarray(cached, np.float32).reshape(-1)
        return {"inputs": ids[:, :-1].copy(), "targets": targets, "pair_ids": pair_ids, "ref_logps": ref,
                "consumed": self._consumed, "epoch": self._consumed // cfg.n, "cropped": self._cropped,
                "skipped": self._skipped}

    def remember(self, pair_ids, ref_logps_2P) -> None:
        """Cache the reference log-probs of these pairs' rows (chosen, rejected interleaved) for later epochs."""
        rows = np.asarray(ref_logps_2P, np.float32).reshape(-1, 2).tolist()
        for i, (c, r) in zip(np.asarray(pair_ids).tolist(), rows):
            self.cache.setdefault(int(i), (c, r))

    def get_state(self) -> dict[str, Any]:
        keys = np.asarray(sorted(self.cache), np.int64)
        vals = np.asarray([self.cache[int(k)] for k in keys], np.float32).reshape(-1, 2)
        return {"cursor": self._cursor, "consumed": self._consumed, "cropped": self._cropped,
                "skipped": self._skipped, "cache_ids": base64.b64encode(keys.astype("<i8").tobytes()).decode(),
                "cache_logps": base64.b64encode(vals.astype("<f4").tobytes()).decode()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._cursor, self._consumed = int(state["cursor"]), int(state["consumed"])
        self._cropped, self._skipped = int(state["cropped"]), int(state["skipped"])
        keys = np.frombuffer(base64.b64decode(state["cache_ids"]), "<i8")
        vals = np.frombuffer(base64.b64decode(state["cache_logps"]), "<f4").reshape(-1, 2)
        self.cache = {int(k): (float(c), float(r)) for k, (c, r) in zip(keys, vals)}


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanochat_jax.data.preference",
                                 description="Write the offline preference pairs (chatterbot-corpus) as JSONL.")
    ap.add_argument("command", choices=["offline"])
    ap.add_argument("--out", default=None, help="default: $NANOCHAT_JAX_HOME/pref_data_offline/chatterbot_pairs.jsonl")
    ap.add_argument("--sft-file", default=None, help="the offline SFT JSONL (default: built if missing)")
    ap.add_argument("--seed", type=int, default=PAIRS_SEED)
    args = ap.parse_args(argv)
    stats = build_offline_pair_file(args.out, args.sft_file, args.seed)
    print(f"wrote {stats['pairs']:,} pairs to {stats['path']} (from {stats['source']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
