"""Safety filter for chat serving: a policy of categories, each a list of regular expressions
over normalised text and the refusal to answer with.

Normalisation defeats the cheap disguises: Unicode compatibility forms (NFKC/NFKD: fullwidth
and mathematical letters), case (case-folding), accents and combining marks, zero-width and
other invisible characters, common Cyrillic/Greek look-alikes of Latin letters, and runs of
whitespace. The same normalisation applies to the user's input (`Policy.check`) and to the
model's streamed output (`OutputGuard`), which holds back the last `hold_chars` characters so
a match that spans tokens or chunks is caught before any of it is sent.

A classifier (any callable text -> category name or None, e.g. a moderation model) can be
added on top of the patterns; it sees the input and, for output, each finished sentence
before it is released.

The policy file is JSON:
    {"hold_chars": 48, "default_refusal": "...",
     "categories": [{"name": "violence", "refusal": "...", "patterns": ["\\\\bkill (him|her)\\\\b", ...]}]}
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("nanochat.safety")

DEFAULT_POLICY = Path(__file__).with_name("safety_policy.json")

# Invisible characters people insert to split words: zero-width space/joiners, marks, word
# joiner, invisible operators, BOM, soft hyphen, Mongolian vowel separator, grapheme joiner.
_INVISIBLE = {0x200B, 0x200C, 0x200D, 0x200E, 0x200F, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0xFEFF, 0x00AD,
              0x180E, 0x034F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069}
# Look-alikes NFKC leaves alone: Cyrillic and Greek letters drawn like Latin ones, and two symbols.
_LOOKALIKES = {
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d",
    "һ": "h", "ӏ": "l", "ԛ": "q", "ԝ": "w", "к": "k", "м": "m", "н": "h", "т": "t", "ь": "b", "ѵ": "v", "ı": "i",
    "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x",
    "γ": "y", "ω": "w", "@": "a", "$": "s",
}


class PolicyError(ValueError):
    """A policy file that cannot be used (one line: which file, what is wrong)."""


def normalize_char(c: str) -> str:
    """One raw character as it is matched: '' for invisible characters and combining marks."""
    if ord(c) in _INVISIBLE:
        return ""
    out = []
    for d in unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", c).casefold()):
        if unicodedata.category(d) in ("Mn", "Me", "Cf"):  # accents, enclosing marks, other format chars
            continue
        d = _LOOKALIKES.get(d, d)
        out.append(" " if d.isspace() else d)
    return "".join(out)


def normalize(text: str) -> str:
    """The text the patterns see (runs of whitespace become one space)."""
    return _Normalizer().extend(text).norm


class _Normalizer:
    """Incremental normalisation with, for each normalised character, the raw index it came from."""

    def __init__(self):
        self.norm, self.raw_of, self.raw_len = "", [], 0

    def extend(self, raw: str, start: int = 0) -> _Normalizer:
        pieces = []
        prev_space = self.norm.endswith(" ")
        for j, c in enumerate(raw[start:], start):
            for d in normalize_char(c):
                if d == " " and prev_space:
                    continue
                prev_space = d == " "
                pieces.append(d)
                self.raw_of.append(j)
        self.norm += "".join(pieces)
        self.raw_len = len(raw)
        return self


@dataclass(frozen=True)
class Category:
    name: str
    refusal: str
    patterns: tuple  # compiled regexes


@dataclass(frozen=True)
class Match:
    category: str
    refusal: str
    start: int  # span in the normalised text
    end: int


class Policy:
    """Categories of patterns over normalised text, plus an optional classifier."""

    def __init__(self, categories: list[Category], hold_chars: int = 48, default_refusal: str = "",
                 classifier: Callable[[str], str | None] | None = None, source: str = "<policy>"):
        self.categories, self.hold_chars, self.classifier, self.source = categories, hold_chars, classifier, source
        self.default_refusal = default_refusal or "I can't help with that."

    @classmethod
    def load(cls, path=None, classifier: Callable | None = None) -> Policy:
        """Read a policy file (the packaged default when path is None); PolicyError on any problem."""
        path = Path(path) if path is not None else DEFAULT_POLICY
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PolicyError(f"safety policy {path}: {e}") from None
        return cls.from_dict(raw, classifier=classifier, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, classifier: Callable | None = None, source: str = "<policy>") -> Policy:
        def bad(msg):
            return PolicyError(f"safety policy {source}: {msg}")

        if not isinstance(raw, dict) or not isinstance(raw.get("categories"), list) or not raw["categories"]:
            raise bad('needs a non-empty "categories" list')
        hold = raw.get("hold_chars", 48)
        if not isinstance(hold, int) or isinstance(hold, bool) or not 1 <= hold <= 4096:
            raise bad('"hold_chars" must be an integer in [1, 4096]')
        cats, names = [], set()
        for i, c in enumerate(raw["categories"]):
            if not isinstance(c, dict):
                raise bad(f"categories[{i}] must be an object")
            name, refusal, patterns = c.get("name"), c.get("refusal"), c.get("patterns")
            if not isinstance(name, str) or not name or name in names:
                raise bad(f"categories[{i}] needs a unique non-empty \"name\"")
            if not isinstance(refusal, str) or not refusal.strip():
                raise bad(f"category {name!r} needs a non-empty \"refusal\"")
            if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
                raise bad(f"category {name!r} needs a non-empty list of \"patterns\" (strings)")
            compiled = []
            for p in patterns:
                try:
                    compiled.append(re.compile(p))
                except re.error as e:
                    raise bad(f"category {name!r}: bad pattern {p!r}: {e}") from None
            names.add(name)
            cats.append(Category(name, refusal.strip(), tuple(compiled)))
        default = raw.get("default_refusal", "")
        if not isinstance(default, str):
            raise bad('"default_refusal" must be a string')
        return cls(cats, hold, default, classifier, source)

    def refusal(self, category: str) -> str:
        return next((c.refusal for c in self.categories if c.name == category), self.default_refusal)

    def match_normalized(self, norm: str, start: int = 0) -> Match | None:
        """The earliest pattern match in norm[start:], any category."""
        best = None
        for c in self.categories:
            for p in c.patterns:
                m = p.search(norm, start)
                if m and (best is None or m.start() < best.start):
                    best = Match(c.name, c.refusal, m.start(), m.end())
        return best

    def categories_in(self, text: str) -> set[str]:
        """Every category whose patterns (or the classifier) flag `text` (for /v1/moderations)."""
        norm = normalize(text)
        found = {c.name for c in self.categories if any(p.search(norm) for p in c.patterns)}
        if self.classifier is not None:
            extra = self.classifier(text)
            if extra:
                found.add(str(extra))
        return found

    def check(self, text: str) -> Match | None:
        """The first match in `text` (patterns first, then the classifier), or None."""
        m = self.match_normalized(normalize(text))
        if m is None and self.classifier is not None:
            cat = self.classifier(text)
            if cat:
                m = Match(str(cat), self.refusal(str(cat)), 0, 0)
        return m

    def output_guard(self) -> OutputGuard:
        return OutputGuard(self)


_SENTENCE_END = re.compile(r"[.!?\n]")


class OutputGuard:
    """Filters one streamed reply: feed it the whole text so far, it says how much is safe to send.

    The last `hold_chars` normalised characters are held back (a pattern match may still
    be growing there), so matches across token or chunk boundaries are caught before any of
    their text is released. With a classifier, text is released a sentence at a time, after
    the classifier has seen it.
    """

    def __init__(self, policy: Policy):
        self.policy, self.norm = policy, _Normalizer()
        self.searched = 0  # normalised characters already searched up to
        self.released = 0  # raw characters declared safe so far (never decreases)
        self.classified = 0  # raw characters the classifier has passed
        self.match: Match | None = None
        self.on_match: Callable[[str], None] | None = None  # e.g. log the decision (category only)

    def feed(self, text: str, final: bool = False) -> tuple[int, str | None]:
        """(raw characters of `text` that may be sent, category when the reply must end)."""
        if self.match is not None:
            return self.released, self.match.category
        if len(text) < self.norm.raw_len:  # never expected (the text only grows); restart cleanly
            self.norm, self.searched = _Normalizer(), 0
        self.norm.extend(text, self.norm.raw_len)
        norm, hold = self.norm.norm, self.policy.hold_chars
        m = self.policy.match_normalized(norm, max(0, self.searched - hold))
        self.searched = len(norm)
        if m is not None:
            self.released = max(self.released, min(self.norm.raw_of[m.start], len(text)))
            return self._flag(m)
        if final:
            safe = len(text)
        elif len(norm) > hold:
            safe = self.norm.raw_of[len(norm) - hold]
        else:
            safe = 0
        if self.policy.classifier is not None and safe > self.classified:
            if not final:  # release whole sentences only
                ends = [k.end() for k in _SENTENCE_END.finditer(text, self.classified, safe)]
                safe = ends[-1] if ends else self.classified
            if safe > self.classified:
                cat = self.policy.classifier(text[:safe])
                if cat:
                    return self._flag(Match(str(cat), self.policy.refusal(str(cat)), 0, 0))
                self.classified = safe
            safe = self.classified
        self.released = max(self.released, safe)
        return self.released, None

    def _flag(self, m: Match) -> tuple[int, str]:
        self.match = m
        if self.on_match is not None:
            self.on_match(m.category)
        return self.released, m.category


def load_classifier(spec: str) -> Callable[[str], str | None]:
    """'module:function' -> the callable (text -> category name or None); one-line error otherwise."""
    mod, _, name = spec.partition(":")
    if not mod or not name:
        raise PolicyError(f"safety classifier {spec!r}: expected module:function")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise PolicyError(f"safety classifier {spec!r}: {e}") from None
    if not callable(fn):
        raise PolicyError(f"safety classifier {spec!r} is not callable")
    return fn


def load_policy(setting: str, classifier: str | None = None) -> Policy | None:
    """The server's --safety option: 'off' (None), 'default' (the packaged policy) or a file path."""
    clf = load_classifier(classifier) if classifier else None
    if setting == "off":
        if clf is not None:
            raise PolicyError("--safety-classifier needs the safety filter on (--safety default or a policy file)")
        return None
    return Policy.load(None if setting == "default" else setting, classifier=clf)
