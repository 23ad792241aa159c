"""nanochat's tokenizer (docs/numerics.md#tokenizer): a GPT-4-style byte-level BPE trained with rustbpe
and run with tiktoken, plus the chat template that turns conversations into ids and
loss masks.

The persisted form is upstream's: `tokenizer.pkl` is a pickled `tiktoken.Encoding` named
"rustbpe", so a directory written here loads in nanochat and vice versa. Beside it,
`token_bytes.npy` (and `token_bytes.pt` when torch is installed, upstream's copy) holds
each token's raw byte length, 0 for specials; bits-per-byte evaluation needs it.

This module deliberately does not import JAX: tokenizing is host-side work.
"""

from __future__ import annotations

import copy
import importlib.util
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import rustbpe
import tiktoken

from nanochat_jax.fileio import atomic_write

# GPT-4's cl100k split, except numbers group 1-2 digits (upstream's best val bpb at d12).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)

ENCODING_NAME = "rustbpe"
PICKLE_NAME = "tokenizer.pkl"
TOKEN_BYTES_NAME = "token_bytes.npy"
TOKEN_BYTES_TORCH_NAME = "token_bytes.pt"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # bytes + specials + at least one merge


def cap_documents(texts: Iterable[str], doc_cap: int, max_chars: int | None) -> Iterator[str]:
    """Yield each text cut to doc_cap chars; stop after the one that takes the total past max_chars.

    Capping keeps a few giant documents from dominating the pair counts.
    """
    if doc_cap < 1:
        raise ValueError(f"doc_cap must be >= 1, got {doc_cap}")
    total = 0
    for text in texts:
        text = text[:doc_cap]
        total += len(text)
        yield text
        if max_chars is not None and total > max_chars:
            return


def compute_token_bytes(encoding: tiktoken.Encoding) -> np.ndarray:
    """int32 (V,): byte length of each token's raw bytes, 0 for specials (bpb needs raw bytes, not a str round trip)."""
    specials = {encoding.encode_single_token(s) for s in encoding.special_tokens_set}
    out = np.zeros(encoding.n_vocab, dtype=np.int32)
    for i in range(encoding.n_vocab):
        if i not in specials:
            out[i] = len(encoding.decode_single_token_bytes(i))
    return out


class _EncodingUnpickler(pickle.Unpickler):
    """Unpickles a tiktoken.Encoding and nothing else, so a stray pickle can't run code."""

    ALLOWED = {("tiktoken.core", "Encoding"), ("copyreg", "_reconstructor"), ("builtins", "object")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_encoding(path: Path) -> tiktoken.Encoding:
    try:
        with open(path, "rb") as f:
            enc = _EncodingUnpickler(f).load()
    except Exception as e:  # a corrupt pickle can fail in many ways; all mean "not our file"
        raise ValueError(f"could not unpickle a tiktoken.Encoding from {path}: {type(e).__name__}: {e}") from e
    if not isinstance(enc, tiktoken.Encoding):
        raise ValueError(f"{path} holds a {type(enc).__name__}, not a tiktoken.Encoding")
    return enc


def _torch_save(token_bytes: np.ndarray):
    """A writer for upstream's token_bytes.pt, or None when torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return lambda f: torch.save(torch.from_numpy(token_bytes.copy()), f)


class Tokenizer:
    """A tiktoken Encoding that carries nanochat's 9 special tokens."""

    def __init__(self, encoding: tiktoken.Encoding):
        missing = [s for s in SPECIAL_TOKENS if s not in encoding.special_tokens_set]
        if missing:
            raise ValueError(f"encoding {encoding.name!r} lacks nanochat special tokens {missing}")
        self._enc = encoding
        self._token_bytes = compute_token_bytes(encoding)
        self._token_bytes.flags.writeable = False  # shared with callers; bpb would silently go wrong
        self._special_ids = {s: encoding.encode_single_token(s) for s in SPECIAL_TOKENS}

    # ---- training and persistence -------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, doc_cap: int = 10000,
              max_chars: int | None = None) -> Tokenizer:
        """Learn vocab_size - 256 - 9 merges; the specials take the last 9 ids in SPECIAL_TOKENS order."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size {vocab_size} < {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                             "specials + at least one merge)")
        n_ranks = vocab_size - len(SPECIAL_TOKENS)
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(cap_documents(texts, doc_cap, max_chars), vocab_size=n_ranks,
                                pattern=SPLIT_PATTERN)
        ranks = {bytes(b): r for b, r in bpe.get_mergeable_ranks()}
        if sorted(ranks.values()) != list(range(n_ranks)):
            raise ValueError(f"training found {len(ranks) - 256} merges but vocab_size {vocab_size} needs "
                             f"{n_ranks - 256}: give it more (or more varied) text or ask for a smaller vocab")
        specials = {s: n_ranks + i for i, s in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name=ENCODING_NAME, pat_str=bpe.get_pattern(), mergeable_ranks=ranks,
                                special_tokens=specials)
        return cls(enc)

    def save(self, directory) -> Path:
        """Write tokenizer.pkl, token_bytes.npy (and token_bytes.pt with torch); returns the directory.

        The pickle goes last, and load() checks token_bytes against it, so a save
        interrupted half way is caught rather than read as a consistent pair.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / TOKEN_BYTES_NAME, lambda f: np.save(f, self._token_bytes, allow_pickle=False))
        torch_writer = _torch_save(self._token_bytes)
        if torch_writer is not None:
            atomic_write(d / TOKEN_BYTES_TORCH_NAME, torch_writer)
        atomic_write(d / PICKLE_NAME, lambda f: pickle.dump(self._enc, f))
        return d

    @classmethod
    def load(cls, path) -> Tokenizer:
        """Load our directory, an upstream nanochat tokenizer directory, or a bare tokenizer.pkl."""
        path = Path(path)
        pkl = path / PICKLE_NAME if path.is_dir() else path
        if not pkl.is_file():
            raise FileNotFoundError(f"no tokenizer at {pkl} (expected a directory holding {PICKLE_NAME}, "
                                    "or the .pkl itself)")
        tok = cls(_read_encoding(pkl))
        tok._check_saved_token_bytes(pkl.parent / TOKEN_BYTES_NAME)
        return tok

    def _check_saved_token_bytes(self, path: Path) -> None:
        """A token_bytes.npy that disagrees with the encoding means a mixed-up or half-written directory."""
        if not path.exists():
            return
        try:
            saved = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is unreadable ({e}); re-save the tokenizer") from e
        if not np.array_equal(saved, self._token_bytes):
            raise ValueError(f"{path} does not match {PICKLE_NAME} beside it (stale or half-written save); "
                             "re-save the tokenizer")

    # ---- basic API ----------------------------------------------------------------

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._enc

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def bos_token_id(self) -> int:
        return self._special_ids["<|bos|>"]

    @property
    def token_bytes(self) -> np.ndarray:
        return self._token_bytes

    def encode_special(self, token: str) -> int:
        """The id of one of the 9 special tokens (anything else is an error, not a lookup)."""
        try:
            return self._special_ids[token]
        except KeyError:
            raise ValueError(f"{token!r} is not a special token; specials are {list(SPECIAL_TOKENS)}") from None

    def _as_id(self, token: int | str) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocab [0, {self.vocab_size})")
        return int(token)

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ids of text (or of each text in a list). Special-token strings in text stay plain text."""
        head = [] if prepend is None else [self._as_id(prepend)]
        tail = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return head + self._enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            rows = self._enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [head + row + tail for row in rows]
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; specials render as their strings, invalid UTF-8 as U+FFFD."""
        return self._enc.decode([int(i) for i in ids])

    # ---- chat template (docs/numerics.md#chat-template)--------------------------------------

    def render_conversation(self, conversation: dict, max_tokens: int | None = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask): mask 1 marks what the model is trained to produce (assistant text, its
        tool calls and <|assistant_end|>); prompts, tool output and framing are 0."""
        ids, mask = [self.bos_token_id], [0]

        def add(tokens: list[int], supervised: int) -> None:
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        sp = self._special_ids
        for role, content in _turns(conversation):
            if role == "user":
                add([sp["<|user_start|>"], *self.encode(content), sp["<|user_end|>"]], 0)
                continue
            add([sp["<|assistant_start|>"]], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                kind, body = part["type"], self.encode(part["text"])
                if kind == "text":
                    add(body, 1)
                elif kind == "python":
                    add([sp["<|python_start|>"], *body, sp["<|python_end|>"]], 1)
                else:  # python_output: produced by the tool, not the model
                    add([sp["<|output_start|>"], *body, sp["<|output_end|>"]], 0)
            add([sp["<|assistant_end|>"]], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Prompt ids ending in <|assistant_start|>, for sampling the next assistant reply.

        A trailing assistant message (e.g. the reference answer of an eval task) is dropped;
        the prompt is not truncated.
        """
        conversation = copy.copy(conversation)
        messages = _messages(conversation)
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            conversation["messages"] = messages[:-1]
        ids, _ = self.render_conversation(conversation, max_tokens=None)
        return ids + [self._special_ids["<|assistant_start|>"]]


# ---- conversation validation -----------------------------------------------------------

PART_TYPES = ("text", "python", "python_output")


def _messages(conversation) -> list:
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError("conversation must be a dict with a 'messages' list")
    return conversation["messages"]


def _turns(conversation) -> list[tuple[str, str | list]]:
    """Validated (role, content) pairs: the system message merged into the first user turn,
    then strictly user, assistant, user, ... Errors name the offending message index."""
    messages = _messages(conversation)
    if not messages:
        raise ValueError("conversation has no messages")
    for i, m in enumerate(messages):
        _check_message(i, m)
    system = None
    start = 0
    if messages[0]["role"] == "system":
        system, start = messages[0]["content"], 1
        if len(messages) < 2:
            raise ValueError("message 0: a system message must be followed by a user message")
    turns = []
    for i in range(start, len(messages)):
        role, content = messages[i]["role"], messages[i]["content"]
        expected = ("user", "assistant")[(i - start) % 2]
        if role != expected:
            raise ValueError(f"message {i}: expected role {expected!r}, got {role!r} (roles must alternate "
                             "user, assistant, ... after an optional leading system message)")
        if i == start and system is not None:
            content = system + "\n\n" + content
        turns.append((role, content))
    return turns


def _check_message(i: int, m) -> None:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise ValueError(f"message {i}: must be a dict with 'role' and 'content'")
    role, content = m["role"], m["content"]
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"message {i}: unknown role {role!r}")
    if role == "system" and i != 0:
        raise ValueError(f"message {i}: a system message is only allowed first")
    if role in ("system", "user") and not isinstance(content, str):
        raise ValueError(f"message {i}: {role} content must be a string, got {type(content).__name__}")
    if not isinstance(content, (str, list)):
        raise ValueError(f"message {i}: assistant content must be a string or a list of parts, "
                         f"got {type(content).__name__}")
    if not content:
        raise ValueError(f"message {i}: empty {role} content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            _check_part(i, j, part)


def _check_part(i: int, j: int, part) -> None:
    if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
        got = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise ValueError(f"message {i}, part {j}: unknown part type {got!r} (expected one of {PART_TYPES})")
    if not isinstance(part.get("text"), str):
        raise ValueError(f"message {i}, part {j}: 'text' must be a string")
