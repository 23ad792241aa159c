"""Continuous batching over the engine's jitted core: one host thread owns a DecodeState of S slots.

Requests wait in a bounded queue and are admitted into free slots between decode steps
(prefill once, insert into n slots), so a request never waits for another to finish. Each
step advances every running slot by one token (steps_per_call steps per device call); the
host turns tokens into text per request, with the calculator forcing Engine does, and
pushes events through a per-request callback.
The thread is the only one touching device state, so no locks guard it; the queue and
cancellation flags are the only shared data.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import engine as E


class QueueFull(Exception):
    """The wait queue is at its limit; the caller should retry later."""


class Event(NamedTuple):
    """A piece of choice `index`'s text, or (finish_reason set) its end."""

    index: int
    text: str
    finish_reason: str | None = None


@dataclass
class _Choice:
    tool: E._ToolRow = field(default_factory=E._ToolRow)
    tokens: list = field(default_factory=list)
    sent: int = 0  # characters of decoded text already emitted
    done: bool = False


@dataclass
class Request:
    """One chat completion: prompt ids, sampling settings, and where its events go.

    on_event is called from the scheduler thread with an Event, and with None once every
    choice has finished (or the scheduler failed: then `error` is set).
    """

    prompt: list
    on_event: Callable
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple = ()
    cancelled: bool = False
    error: str | None = None
    completion_tokens: int = 0

    def __post_init__(self):
        self.choices = [_Choice() for _ in range(self.n)]


class Scheduler:
    """Owns the decode loop thread; `submit` and `cancel` are safe from any thread."""

    def __init__(self, engine: E.Engine, slots: int = 8, max_queue: int = 32, max_len: int | None = None,
                 steps_per_call: int = 1):
        """steps_per_call > 1 decodes that many tokens per device call (E.generate_steps): less
        dispatch and host sync per token; a new request or a cancel waits for the call to end."""
        self.engine, self.slots, self.max_queue = engine, slots, max_queue
        self.steps_per_call = steps_per_call
        self.max_len = max_len or engine.config.sequence_len
        self.state = E.init_state(engine.config, slots, self.max_len, engine.stop_ids, engine.dtype)
        self._owner = [None] * slots  # (request, choice index) per busy slot
        self._finish = np.full(slots, E.FREE, np.int32)  # host copy of the device's finish codes
        self._waiting = collections.deque()
        self._tasks = collections.deque()  # (function, result box, done event) run on the scheduler thread
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    # ---- any thread -----------------------------------------------------------------

    def submit(self, req: Request) -> Request:
        if not 1 <= req.n <= self.slots:
            raise ValueError(f"n={req.n} must be between 1 and the {self.slots} slots")
        if not 0 < len(req.prompt) < self.max_len:
            raise ValueError(f"prompt of {len(req.prompt)} tokens leaves no room in the {self.max_len}-token context")
        with self._cv:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests already waiting")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (client gone): its slots are freed before the next step."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def busy_slots(self) -> int:
        return sum(o is not None for o in self._owner)

    def queued(self) -> int:
        return len(self._waiting)

    def warmup(self) -> float:
        """Compile everything a request can need (prefill and insert for every prompt bucket,
        the decode step, freeing a slot) on the scheduler thread; returns the seconds taken.
        Call it while idle, e.g. before serving: the first requests then do not stall."""
        box, done = {}, threading.Event()
        with self._cv:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            self._tasks.append((self._warmup, box, done))
            self._cv.notify()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    # ---- scheduler thread ---------------------------------------------------------------

    def _run(self):
        try:
            while True:
                with self._cv:
                    while not self._closed and not self._tasks and not self._waiting and self.busy_slots() == 0:
                        self._cv.wait()
                    if self._closed:
                        break
                    tasks, self._tasks = list(self._tasks), collections.deque()
                for fn, box, done in tasks:
                    try:
                        box["result"] = fn()
                    except Exception as e:  # reported to the caller, the loop goes on
                        box["error"] = e
                    done.set()
                self._drop_cancelled()
                self._admit()
                if (self._finish == E.RUNNING).any():
                    self._step()
        except Exception as e:  # fail every request instead of leaving clients hanging
            self._fail_all(f"{type(e).__name__}: {e}")
            raise
        finally:
            self._fail_all("scheduler closed")
            with self._cv:
                tasks, self._tasks = list(self._tasks), collections.deque()
            for _, box, done in tasks:
                box["error"] = RuntimeError("scheduler closed")
                done.set()

    def _fail_all(self, message: str):
        with self._cv:
            self._closed = True
            reqs = {id(o[0]): o[0] for o in self._owner if o} | {id(r): r for r in self._waiting}
            self._waiting.clear()
        for req in reqs.values():
            req.error = message
            _notify(req, None)

    def _drop_cancelled(self):
        with self._cv:
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        for s, o in enumerate(self._owner):
            if o and o[0].cancelled:
                self._free(s)

    def _admit(self):
        """FIFO: the head request waits until it has n free slots (no overtaking, no starvation)."""
        admitted = []
        while True:
            free = [s for s in range(self.slots) if self._owner[s] is None]
            with self._cv:
                if not self._waiting or len(free) < self._waiting[0].n:
                    break
                req = self._waiting.popleft()
            self._place(req, free[:req.n])
            admitted += free[:req.n]
        if admitted:
            tokens, finish = np.asarray(self.state.last_token_S), np.asarray(self.state.finish_S)
            for s in admitted:
                self._finish[s] = finish[s]
                self._take(s, int(tokens[s]), int(finish[s]))

    def _place(self, req: Request, slots: list):
        """Prefill once, insert into `slots`; as Engine, choice i samples with fold_in(seed, i)."""
        prefix = self.engine.prefill(req.prompt, self.max_len)
        base = jax.random.key(int(np.random.randint(2**31) if req.seed is None else req.seed))
        for i, s in enumerate(slots):
            key = jax.random.key_data(jax.random.fold_in(base, i))
            self.state = E.insert(self.state, prefix, int(s), key, float(req.temperature), int(req.top_k),
                                  float(req.top_p), int(req.max_tokens))
            self._owner[s] = (req, i)

    def _step(self):
        n = self.steps_per_call
        forced = np.full((n, self.slots), -1, np.int32)
        for s, o in enumerate(self._owner):
            queue = o[0].choices[o[1]].tool.forced if o and self._finish[s] == E.RUNNING else ()
            for j in range(min(n, len(queue))):
                forced[j, s] = queue.popleft()
        running = np.flatnonzero(self._finish == E.RUNNING)
        if n == 1:
            self.state, tokens, finish = E.generate_step(self.state, self.engine.params, jnp.asarray(forced[0]),
                                                         config=self.engine.config, dtype=self.engine.dtype)
            steps = [(np.asarray(tokens), np.asarray(finish), None)]
        else:
            self.state, tokens, finish, fresh = E.generate_steps(
                self.state, self.engine.params, jnp.asarray(forced), self.engine.special["<|python_end|>"],
                config=self.engine.config, dtype=self.engine.dtype)
            steps = list(zip(np.asarray(tokens), np.asarray(finish), np.asarray(fresh)))
        owners = {s: self._owner[s] for s in running}
        for tokens, finish, fresh in steps:
            for s in running:  # a slot the host ended mid-call (stop string) ignores its later tokens
                if (fresh is None or fresh[s]) and self._owner[s] is not None and self._owner[s] is owners[s]:
                    self._finish[s] = finish[s]
                    self._take(s, int(tokens[s]), int(finish[s]))

    def _warmup(self) -> float:
        if self.busy_slots() or self._waiting:
            raise RuntimeError("warmup needs an idle scheduler")
        t0 = time.perf_counter()
        bos = self.engine.special["<|bos|>"]
        try:
            for T in sorted({E.bucket_length(n, self.max_len) for n in range(1, self.max_len)}):
                req = Request([bos] * min(T, self.max_len - 1), lambda ev: None, max_tokens=self.max_len, seed=0)
                self._place(req, [0])
            self._finish[0] = E.RUNNING  # compiles _free's device update too
        finally:
            self._free(0)
        self._step()  # every slot free: a full decode call that changes nothing
        return time.perf_counter() - t0

    def _take(self, s: int, token: int, finish: int):
        """Account a slot's new token: calculator state, text, stop strings, finish."""
        req, i = self._owner[s]
        ch = req.choices[i]
        ch.tool.see(token, self.engine.special, self.engine.tokenizer)
        if finish != E.STOP:  # the stop token itself is not part of the reply
            ch.tokens.append(token)
            req.completion_tokens += 1
        text = self.engine.tokenizer.decode(ch.tokens)
        hit = min((j for j in (text.find(st) for st in req.stop) if j >= 0), default=-1)
        if hit >= 0:
            self._emit(req, i, text[:hit], "stop")
            self._free(s)
        elif finish in (E.STOP, E.LENGTH):
            self._emit(req, i, text, E.FINISH_REASONS[finish])
            self._free(s)
        elif not text.endswith("\ufffd"):  # hold back a half-decoded multi-byte character
            self._emit(req, i, text[:len(text) - _held(text, req.stop)], None)

    def _emit(self, req: Request, i: int, text: str, finish_reason: str | None):
        ch = req.choices[i]
        if len(text) > ch.sent:
            _notify(req, Event(i, text[ch.sent:]))
            ch.sent = len(text)
        if finish_reason:
            ch.done = True
            _notify(req, Event(i, "", finish_reason))
            if all(c.done for c in req.choices):
                _notify(req, None)

    def _free(self, s: int):
        s = int(s)  # a Python int, so the device update below compiles once (warmup)
        if self._finish[s] == E.RUNNING:  # the host ended it (stop string, cancel): stop the device too
            self.state = self.state._replace(finish_S=self.state.finish_S.at[s].set(E.FREE))
        self._finish[s] = E.FREE
        self._owner[s] = None


def _notify(req: Request, event):
    """A listener that fails (its event loop is gone) is a client that left: cancel, don't crash the loop."""
    try:
        req.on_event(event)
    except Exception:
        req.cancelled = True


def _held(text: str, stops) -> int:
    """Characters at the end of text that could start a stop string: not safe to stream yet."""
    return max((k for st in stops for k in range(min(len(st) - 1, len(text)), 0, -1) if text.endswith(st[:k])),
               default=0)
