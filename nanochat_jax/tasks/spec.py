"""Task mixtures from command-line strings, so every script names data the same way.

    ENTRY   := NAME ['@' SPLIT] ['[' [START] ':' [STOP] ']'] ['*' REPEAT]
    MIXTURE := ENTRY (',' ENTRY)*

NAME is smoltalk, mmlu, gsm8k, arc-easy, arc-challenge, humaneval, chatterbot (the offline
chatterbot-corpus set, built on first use) or jsonl=PATH (a CustomJSON file). With a data
dir (the scripts' --task-data-dir), DIR/<NAME>/ overrides a task's default source. START/STOP
slice the (shuffled) task and may be negative; REPEAT lists the task that many times in the
mixture (oversampling). Examples:

    smoltalk@train,mmlu@auxiliary_train*3,gsm8k@train*4        # upstream's SFT mixture
    smoltalk@test,mmlu@test[:5200],gsm8k@test[:420]             # and its validation mixture
    chatterbot[:-100]                                           # the CPU demo's
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from nanochat_jax.tasks.common import Task, TaskMixture

_ENTRY = re.compile(r"^(?P<name>jsonl=[^@\[*]+|[a-z0-9_-]+)(?:@(?P<split>[a-z_]+))?"
                    r"(?:\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?(?:\*(?P<repeat>\d+))?$")


def _factories(data_dir=None) -> dict[str, Callable[..., Task]]:
    """name → factory(split); with data_dir, a task whose DIR/<name>/ exists reads it instead of
    its default source."""
    from nanochat_jax.tasks.arc import ARC
    from nanochat_jax.tasks.gsm8k import GSM8K
    from nanochat_jax.tasks.humaneval import HumanEval
    from nanochat_jax.tasks.mmlu import MMLU
    from nanochat_jax.tasks.smoltalk import SmolTalk

    def src(name):
        local = Path(data_dir) / name if data_dir else None
        return {"data_dir": local} if local is not None and local.exists() else {}

    return {
        "smoltalk": lambda split: SmolTalk(split=split or "train", **src("smoltalk")),
        "mmlu": lambda split: MMLU(subset="all", split=split or "test", **src("mmlu")),
        "gsm8k": lambda split: GSM8K(subset="main", split=split or "test", **src("gsm8k")),
        "arc-easy": lambda split: ARC(subset="ARC-Easy", split=split or "test", **src("arc-easy")),
        "arc-challenge": lambda split: ARC(subset="ARC-Challenge", split=split or "test", **src("arc-challenge")),
        "humaneval": lambda split: HumanEval(**src("humaneval")),
        "chatterbot": lambda split: _chatterbot(),
    }


def _chatterbot() -> Task:
    from nanochat_jax.data.corpus import offline_sft_file
    from nanochat_jax.tasks.customjson import CustomJSON

    return TaskMixture([CustomJSON(offline_sft_file())])  # the file is grouped by topic: shuffle before any slicing


def _slice(task: Task, start: str | None, stop: str | None) -> Task:
    n = len(task)
    lo = int(start) if start else 0
    hi = int(stop) if stop else n
    lo, hi = (lo + n if lo < 0 else lo), (hi + n if hi < 0 else hi)
    lo, hi = max(0, min(lo, n)), max(0, min(hi, n))
    if hi <= lo:
        raise ValueError(f"slice [{start or ''}:{stop or ''}] of a task of {n} examples is empty")
    task.start, task._stop = task.start + lo * task.step, task.start + hi * task.step
    return task


def _parse(entry: str, make: Callable[[str, str | None, str], Task], what: str, example: str) -> tuple[Task, int]:
    """(task, repeat) for one ENTRY; make(name, split, entry) builds the task, then it is sliced."""
    m = _ENTRY.match(entry.strip())
    if not m:
        raise ValueError(f"bad {what} entry {entry!r}: expected NAME[@SPLIT][[START:STOP]][*REPEAT], e.g. {example}")
    task = make(m["name"], m["split"], entry)
    if m["start"] or m["stop"]:
        task = _slice(task, m["start"], m["stop"])
    return task, int(m["repeat"] or 1)


def _mixture(spec: str, parse: Callable[[str], tuple[Task, int]], what: str) -> TaskMixture:
    """A TaskMixture (upstream's seeded shuffle) of the comma-separated entries."""
    tasks = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        task, repeat = parse(entry)
        tasks += [task] * repeat
    if not tasks:
        raise ValueError(f"empty {what} mixture {spec!r}")
    return TaskMixture(tasks)


def _named_task(name: str, split: str | None, entry: str, data_dir) -> Task:
    if name.startswith("jsonl="):
        from nanochat_jax.tasks.customjson import CustomJSON
        return CustomJSON(name[len("jsonl="):])
    factories = _factories(data_dir)
    if name not in factories:
        raise ValueError(f"unknown task {name!r} in {entry!r}; known: {', '.join(factories)}, jsonl=PATH")
    return factories[name](split)


def parse_entry(entry: str, data_dir=None) -> tuple[Task, int]:
    """(task, repeat) for one ENTRY; errors say what was expected. data_dir: DIR/<name>/ holds
    local data for named tasks (e.g. DIR/gsm8k/test.jsonl)."""
    return _parse(entry, lambda name, split, e: _named_task(name, split, e, data_dir), "task",
                  "gsm8k@train[:1000]*2 or jsonl=/path/convs.jsonl")


def parse_mixture(spec: str, data_dir=None) -> TaskMixture:
    """A TaskMixture (upstream's seeded shuffle) of the comma-separated entries."""
    return _mixture(spec, lambda entry: parse_entry(entry, data_dir), "task")
