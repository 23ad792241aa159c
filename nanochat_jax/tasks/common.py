"""Task abstractions (docs/numerics.md#tasks): a task is an indexable list of conversations, sliceable
without copying, mixable (shuffled, for SFT) and chainable (curricula).

A conversation is {"messages": [{"role", "content"}, ...], **extras}; tasks add the fields
their evaluator needs (letters, entry_point, ...).
"""

from __future__ import annotations

import math
import random

_SEED = 42  # TaskMixture's shuffle seed, as upstream


class Task:
    """A logical slice [start:stop:step] over `num_examples()` physical examples.

    Subclasses implement num_examples, get_example and, when they can be scored,
    evaluate(conversation, completion_text); eval_type is "generative" (sample with the engine)
    or "categorical" (argmax over the answer letters at the assistant start).
    """

    eval_type = "generative"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}: need 0 ≤ start ≤ stop, step ≥ 1")
        self.start, self._stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement num_examples()")

    def get_example(self, index: int) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement get_example()")

    def evaluate(self, conversation: dict, completion: str):
        raise TypeError(f"{type(self).__name__} has no evaluator (training-only task)")

    def reward(self, conversation: dict, completion: str) -> float:
        """RL reward; by default the evaluation outcome as a float."""
        return float(self.evaluate(conversation, completion))

    @property
    def stop(self) -> int:
        n = self.num_examples()
        return n if self._stop is None else min(self._stop, n)

    def __len__(self) -> int:
        return max(0, math.ceil((self.stop - self.start) / self.step))

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range (len {n})")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class TaskMixture(Task):
    """All examples of all tasks in one seeded shuffle; list a task twice to oversample it."""

    def __init__(self, tasks: list[Task], seed: int = _SEED, **slice_kw):
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)
        super().__init__(**slice_kw)

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> dict:
        t, i = self.index[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """Tasks one after another, in order (a curriculum)."""

    def __init__(self, tasks: list[Task], **slice_kw):
        if not tasks:
            raise ValueError("TaskSequence needs at least one task")
        self.tasks = list(tasks)
        self.offsets = [0]
        for task in self.tasks:
            self.offsets.append(self.offsets[-1] + len(task))
        super().__init__(**slice_kw)

    def num_examples(self) -> int:
        return self.offsets[-1]

    def get_example(self, index: int) -> dict:
        for t, task in enumerate(self.tasks):
            if index < self.offsets[t + 1]:
                return task[index - self.offsets[t]]
        raise IndexError(index)


def render_mc(question: str, letters, choices) -> str:
    """The multiple-choice user prompt; the letter sits right after '=' so that it tokenizes
    like the bare letter the assistant answers with."""
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."
