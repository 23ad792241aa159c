"""CustomJSON: conversations from a local JSONL file (upstream's identity-chat format), for SFT mixtures.

Each non-blank line is one conversation, either
- a JSON array of messages (upstream's format, e.g. nanochat's identity_conversations.jsonl), or
- an object {"messages": [...]} (the format of our offline SFT set, written by
  `python -m nanochat_jax.data.corpus sft` from the chatterbot-corpus wheel).
Messages: at least 2, user and assistant alternating starting with user, string contents.
Bad lines raise ValueError naming the file and line. Not shuffled (as upstream).
"""

from __future__ import annotations

import os
from pathlib import Path

from nanochat_jax.tasks.common import Task
from nanochat_jax.tasks.hub import check_chat, parse_jsonl_file


def _messages(value) -> list:
    """One line: a JSON array of messages or an object with "messages", checked as a chat."""
    messages = value.get("messages") if isinstance(value, dict) else value
    if isinstance(value, dict) and "messages" not in value:
        raise ValueError("missing field 'messages'")
    if not isinstance(messages, list):
        raise ValueError(f"expected a JSON array of messages or an object with 'messages', "
                         f"got {type(messages).__name__}")
    check_chat(messages, allow_system=False)
    return messages


class CustomJSON(Task):
    """CustomJSON(path, start=0, stop=None, step=1). Example: {"messages": [...]}."""

    def __init__(self, path: str | os.PathLike, **slice_kw):
        super().__init__(**slice_kw)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no such file (nanochat's identity conversations: "
                "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl; "
                "an offline SFT set: python -m nanochat_jax.data.corpus sft)")
        self.conversations = parse_jsonl_file(self.path, _messages)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": self.conversations[index]}
