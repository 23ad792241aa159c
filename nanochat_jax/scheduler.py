"""The one generation host loop (docs/serving.md): continuous batching over engine.py's jitted core.

A Scheduler owns a DecodeState of S slots. Requests wait in a bounded queue and are admitted
into free slots between decode steps (prefill once, insert into n slots), so a request never
waits for another to finish. Each step advances every running slot by one token
(steps_per_call steps per device call); the host runs the calculator tool (an expression
between <|python_start|> and <|python_end|>, as upstream) and forces
`<|output_start|> result <|output_end|>` into the row, turns tokens into text per request and
pushes events through a per-request callback (or, for Engine, hands over the raw tokens).

The server runs the loop on its own thread (the only one touching device state, so no locks
guard it; the queue and cancellation flags are the only shared data). Engine, upstream's
generate / complete API, drives a private Scheduler on the caller's thread (thread=False),
so every generation in the project goes through the same admission, forcing and seeds.

Robustness: `submit` checks every field's range, and anything that goes wrong while one
request is admitted or its tokens are turned into text fails that request alone. Only a
failure of the shared device step ends the loop; then every request is failed, `alive`
turns False and the `on_death` callbacks run (the server exits so a supervisor restarts it).
"""

from __future__ import annotations

import ast
import collections
import itertools
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import engine as E, serving_mesh
from nanochat_jax.common import resolve_dtype
from nanochat_jax.config import GPTConfig
from nanochat_jax.prefix_cache import PrefixCache

log = logging.getLogger("nanochat.serve")


# ---- calculator tool ------------------------------------------------------------------------

_ARITH_CHARS = set("0123456789*+-/.() ")
_COUNT_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_BIN_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
            ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b}
_MAX_DIGITS = 1000  # bounds the work a chain of multiplications can ask for


def _eval_node(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        x = _eval_node(node.operand)
        return x if isinstance(node.op, ast.UAdd) else -x
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        out = _BIN_OPS[type(node.op)](_eval_node(node.left), _eval_node(node.right))
        if isinstance(out, int) and abs(out).bit_length() > 3.33 * _MAX_DIGITS:
            raise ValueError("result too large")
        return out
    raise ValueError(f"disallowed syntax {type(node).__name__}")


def use_calculator(expr: str):
    """Upstream's calculator without eval: arithmetic (+ - * / // and parentheses, no **) or
    the string form '<str>.count(<str>)'. Anything else, or any error, gives None."""
    expr = expr.replace(",", "")
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
        if set(expr) <= _ARITH_CHARS:
            return None if "**" in expr else _eval_node(tree)
        if set(expr) <= _COUNT_CHARS and ".count(" in expr:
            if (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Attribute) and tree.func.attr == "count"
                    and isinstance(tree.func.value, ast.Constant) and isinstance(tree.func.value.value, str)
                    and len(tree.args) == 1 and not tree.keywords
                    and isinstance(tree.args[0], ast.Constant) and isinstance(tree.args[0].value, str)):
                return tree.func.value.value.count(tree.args[0].value)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, MemoryError, TypeError):
        return None
    return None


def tool_output(expr_ids: list, sp: dict, tokenizer) -> list:
    """The tokens forced after a calculator call: none when it gives no result or when anything
    in the tool path raises, since this runs on the scheduler thread and must never end it."""
    try:
        result = use_calculator(tokenizer.decode(expr_ids))
        if result is None:
            return []
        return [sp["<|output_start|>"], *tokenizer.encode(str(result)), sp["<|output_end|>"]]
    except Exception:  # noqa: BLE001 - a tool error is "no result", never a dead server
        return []


class _ToolRow:
    """One row's calculator state machine and its queue of forced tokens."""

    def __init__(self):
        self.in_python, self.expr, self.forced = False, [], collections.deque()

    def see(self, token: int, sp: dict, tokenizer) -> None:
        if token == sp["<|python_start|>"]:
            self.in_python, self.expr = True, []
        elif token == sp["<|python_end|>"] and self.in_python:
            self.in_python = False
            self.forced.extend(tool_output(self.expr, sp, tokenizer))
        elif self.in_python:
            self.expr.append(token)

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # any signed or unsigned 64-bit seed; all 64 bits are used
MAX_TEMPERATURE = 100.0
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0


class QueueFull(Exception):
    """The wait queue is at its limit; the caller should retry later."""


class SchedulerDead(RuntimeError):
    """The decode loop has stopped (failed or closed): no request can be served."""


class Event(NamedTuple):
    """A piece of choice `index`'s text, or (finish_reason set) its end.

    logprobs: for requests that asked, one entry per token whose text is in `text`:
    (token id, logprob, [(id, logprob), ...] top alternatives).
    """

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: list | None = None


@dataclass
class _Choice:
    tool: _ToolRow = field(default_factory=_ToolRow)
    tokens: list = field(default_factory=list)
    ends: list = field(default_factory=list)  # decoded text length after each token (for logprobs)
    pending: list = field(default_factory=list)  # logprob entries not yet sent
    sent: int = 0  # characters of decoded text already emitted
    done: bool = False
    guard: object = None  # output filter: .feed(text, final) -> (chars safe to send, category or None)


@dataclass
class Request:
    """One chat completion: prompt ids, sampling settings, and where its events go.

    on_event is called from the scheduler thread with an Event, and with None once every
    choice has finished (or the request failed: then `error` is set).
    output_guard, when set, makes one filter per choice (see nanochat_jax.safety.OutputGuard).
    on_token, when set, takes each token instead of its text (Engine's columns):
    on_token(tick, choice, token, finish code, forced); tokens of one device step share a tick.
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
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict | None = None  # token id -> bias added to its logit
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    output_guard: Callable | None = None
    on_token: Callable | None = None
    cancelled: bool = False
    error: str | None = None
    completion_tokens: int = 0

    def __post_init__(self):
        self.choices = [_Choice() for _ in range(self.n)]


def check_request(req: Request, slots: int, max_len: int, vocab_size: int) -> None:
    """Every field's range, so nothing a request carries can fail inside the loop (ValueError)."""
    def num(name, lo, hi, integer=False):
        v = getattr(req, name)
        ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool) if integer else \
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or not lo <= v <= hi:
            raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} in [{lo}, {hi}], got {v!r}")

    num("n", 1, slots, integer=True)
    if not 0 < len(req.prompt) < max_len:
        raise ValueError(f"prompt of {len(req.prompt)} tokens leaves no room in the {max_len}-token context")
    if not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab_size for t in req.prompt):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
    num("max_tokens", 1, max_len, integer=True)
    num("temperature", 0.0, MAX_TEMPERATURE)
    num("top_k", 0, vocab_size, integer=True)
    if not (isinstance(req.top_p, (int, float)) and 0 < req.top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {req.top_p!r}")
    if req.seed is not None:
        num("seed", SEED_MIN, SEED_MAX, integer=True)
    if not all(isinstance(s, str) and s for s in req.stop):
        raise ValueError("stop strings must be non-empty strings")
    num("top_logprobs", 0, E.TOP_LOGPROBS, integer=True)
    num("presence_penalty", -MAX_PENALTY, MAX_PENALTY)
    num("frequency_penalty", -MAX_PENALTY, MAX_PENALTY)
    for tok, bias in (req.logit_bias or {}).items():
        if not (isinstance(tok, (int, np.integer)) and 0 <= tok < vocab_size):
            raise ValueError(f"logit_bias: token id {tok!r} is not in [0, {vocab_size})")
        if not (isinstance(bias, (int, float)) and math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS):
            raise ValueError(f"logit_bias: bias for token {tok} must be in [-100, 100], got {bias!r}")


def seed_key_data(seed: int | None) -> np.ndarray:
    """A threefry key from all 64 bits of the seed (negative seeds wrap, as two's complement);
    equal to jax.random.key(seed) for 0 <= seed < 2**31. None draws a fresh random seed."""
    seed = secrets.randbits(64) if seed is None else int(seed) % 2**64
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


class Scheduler:
    """Owns the decode loop thread; `submit` and `cancel` are safe from any thread."""

    def __init__(self, engine: Engine, slots: int = 8, max_queue: int = 32, max_len: int | None = None,
                 steps_per_call: int = 1, thread: bool = True, prefix_cache_bytes: int = 0):
        """steps_per_call > 1 decodes that many tokens per device call (E.generate_steps): less
        dispatch and host sync per token; a new request or a cancel waits for the call to end.
        thread=False starts no thread: the caller turns the loop with run_once().
        prefix_cache_bytes > 0 keeps prefilled prompts up to that many bytes (prefix_cache.py):
        a prompt that extends one of them (the next chat turn) prefills only the rest."""
        self.engine, self.slots, self.max_queue = engine, slots, max_queue
        self.steps_per_call = steps_per_call
        self.max_len = max_len or engine.config.sequence_len
        self.vocab_size = engine.config.vocab_size
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.state = (E.init_state(engine.config, slots, self.max_len, engine.stop_ids, engine.dtype)
                      if engine.mesh is None else
                      serving_mesh.init_state(engine.mesh, engine.config, slots, self.max_len, engine.stop_ids,
                                              engine.dtype))
        if jax.random.key_data(jax.random.key(0)).shape != (2,):
            raise ValueError("the scheduler's 64-bit seeds need the default threefry PRNG")
        self._owner = [None] * slots  # (request, choice index) per busy slot
        self._finish = np.full(slots, E.FREE, np.int32)  # host copy of the device's finish codes
        self._waiting = collections.deque()
        self._tasks = collections.deque()  # (function, result box, done event) run on the scheduler thread
        self._cv = threading.Condition()
        self._closed = False
        self.failure: str | None = None  # why the loop died, if it did
        self._death_callbacks: list = []
        self._ticks = 0  # device calls that produced tokens (admissions and decode steps)
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True) if thread else None
        if thread:
            self._thread.start()

    # ---- any thread -----------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the loop has died or been closed: serve 503 and restart."""
        return self.failure is None and not self._closed and (self._thread is None or self._thread.is_alive())

    def on_death(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` (from the scheduler thread) if the loop dies of an error."""
        self._death_callbacks.append(callback)
        if self.failure is not None:
            callback(self.failure)

    def submit(self, req: Request) -> Request:
        check_request(req, self.slots, self.max_len, self.vocab_size)
        with self._cv:
            if not self.alive:
                raise SchedulerDead(self.failure or "scheduler is closed")
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
        the decode step, freeing a slot), then serve two small requests end to end (sampled
        with every option, and greedy) so the host paths run once too; returns the seconds.
        Call it while idle, e.g. before serving: the first requests then do not stall."""
        t0 = time.perf_counter()
        self._run_task(self._warmup)
        bos = self.engine.special["<|bos|>"]
        for kw in (dict(n=min(2, self.slots), temperature=1.0, top_k=5, top_p=0.9, seed=1, stop=("\n\n",),
                        logprobs=True, top_logprobs=2, logit_bias={bos: -1.0}, presence_penalty=0.5,
                        frequency_penalty=0.5),
                   dict(temperature=0.0)):
            done = threading.Event()
            req = Request([bos], lambda ev, d=done: ev is None and d.set(), max_tokens=2 * self.steps_per_call + 1,
                          **kw)
            self.submit(req)
            done.wait()
            if req.error:
                raise RuntimeError(f"warm-up request failed: {req.error}")
        return time.perf_counter() - t0

    def _run_task(self, fn):
        box, done = {}, threading.Event()
        with self._cv:
            if not self.alive:
                raise SchedulerDead(self.failure or "scheduler is closed")
            self._tasks.append((fn, box, done))
            self._cv.notify()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop: requests still running or waiting end with an error."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- scheduler thread ---------------------------------------------------------------

    def _run(self):
        reason = "server shutting down"
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
                self.run_once()
        except BaseException as e:  # noqa: BLE001  (even SystemExit: fail every request, never hang them)
            reason = f"decode loop died: {type(e).__name__}: {e}"
            self.failure = reason
            log.error(reason)
        finally:
            self._fail_all(reason)
            with self._cv:
                tasks, self._tasks = list(self._tasks), collections.deque()
            for _, box, done in tasks:
                box["error"] = SchedulerDead(reason)
                done.set()
            if self.failure is not None:
                for cb in self._death_callbacks:
                    try:
                        cb(self.failure)
                    except Exception:  # noqa: BLE001
                        log.exception("on_death callback failed")

    def run_once(self):
        """One turn of the loop: drop cancelled requests, admit waiting ones, one decode call."""
        self._drop_cancelled()
        self._admit()
        if (self._finish == E.RUNNING).any():
            self._step()

    def _fail_all(self, message: str):
        with self._cv:
            self._closed = True
            reqs = {id(o[0]): o[0] for o in self._owner if o} | {id(r): r for r in self._waiting}
            self._waiting.clear()
        for req in reqs.values():
            req.error = message
            _notify(req, None)

    def _fail(self, req: Request, message: str):
        """End one request with an error (its own bad input or host-side failure); the loop goes on."""
        log.warning("request failed: %s", message)
        for s, o in enumerate(self._owner):
            if o and o[0] is req:
                self._free(s)
        if req.error is None:
            req.error = message
            for ch in req.choices:
                ch.done = True
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
            try:
                self._place(req, free[:req.n])
            except Exception as e:  # noqa: BLE001  (this request's problem, not the loop's)
                self._fail(req, f"could not start: {type(e).__name__}: {e}")
                continue
            admitted += free[:req.n]
        if admitted:
            self._ticks += 1
            tokens, finish = np.asarray(self.state.last_token_S), np.asarray(self.state.finish_S)
            lps = self._logprob_arrays(admitted)
            for s in admitted:
                if self._owner[s] is None:  # its request already failed on an earlier slot
                    continue
                self._finish[s] = finish[s]
                self._take_safely(s, int(tokens[s]), int(finish[s]), lps and tuple(a[s] for a in lps), False)

    def _place(self, req: Request, slots: list):
        """Prefill once, insert into `slots`; choice i samples with fold_in(seed, i)."""
        n = len(req.prompt)
        start, cached = self.prefix_cache.lookup(req.prompt) if self.prefix_cache is not None else (0, None)
        padded = np.zeros((1, E.bucket_length(n - start, self.max_len)), np.int32)
        padded[0, :n - start] = req.prompt[start:]
        if cached is None:
            prefix = E.prefill(self.engine.params, jnp.asarray(padded), n, config=self.engine.config,
                               dtype=self.engine.dtype)
        else:
            log.debug("prefix cache: %d of %d prompt tokens reused", start, n)
            prefix = E.prefill_from(self.engine.params, cached, jnp.asarray(padded), n - start,
                                    total=E.bucket_length(n, self.max_len), config=self.engine.config,
                                    dtype=self.engine.dtype)
        if self.prefix_cache is not None:
            self.prefix_cache.store(req.prompt, prefix)
        base = jax.random.wrap_key_data(jnp.asarray(seed_key_data(req.seed)))
        bias_V = np.zeros(self.vocab_size, np.float32)
        for tok, b in (req.logit_bias or {}).items():
            bias_V[int(tok)] = float(b)
        for i, s in enumerate(slots):
            key = jax.random.key_data(jax.random.fold_in(base, i))
            self.state = E.insert(self.state, prefix, int(s), key, float(req.temperature), int(req.top_k),
                                  float(req.top_p), int(req.max_tokens), bias_V, float(req.presence_penalty),
                                  float(req.frequency_penalty), bool(req.logprobs))
            self._owner[s] = (req, i)
            if req.output_guard is not None:
                req.choices[i].guard = req.output_guard()

    def _logprob_arrays(self, slots):
        """Host copies of the newest tokens' logprobs, only when some request in `slots` wants them."""
        if not any(self._owner[s] and self._owner[s][0].logprobs for s in slots):
            return None
        return tuple(np.asarray(a) for a in (self.state.logprob_S, self.state.top_ids_SL, self.state.top_lp_SL))

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
            lps = self._logprob_arrays(running)
            steps = [(np.asarray(tokens), np.asarray(finish), None, lps, forced[0])]
        else:
            self.state, tokens, finish, fresh, lps = E.generate_steps(
                self.state, self.engine.params, jnp.asarray(forced), self.engine.special["<|python_end|>"],
                config=self.engine.config, dtype=self.engine.dtype)
            wants = any(self._owner[s] and self._owner[s][0].logprobs for s in running)
            lps = list(zip(*(np.asarray(a) for a in lps))) if wants else [None] * n
            steps = list(zip(np.asarray(tokens), np.asarray(finish), np.asarray(fresh), lps, forced))
        owners = {s: self._owner[s] for s in running}
        for tokens, finish, fresh, lp, forced_S in steps:
            self._ticks += 1
            for s in running:  # a slot the host ended mid-call (stop string) ignores its later tokens
                if (fresh is None or fresh[s]) and self._owner[s] is not None and self._owner[s] is owners[s]:
                    self._finish[s] = finish[s]
                    self._take_safely(s, int(tokens[s]), int(finish[s]), lp and tuple(a[s] for a in lp),
                                      bool(forced_S[s] >= 0))

    def _warmup(self) -> float:
        if self.busy_slots() or self._waiting:
            raise RuntimeError("warmup needs an idle scheduler")
        t0 = time.perf_counter()
        bos = self.engine.special["<|bos|>"]
        # Without the store: each bucket's cold prefill compiles, and no one's conversation is kept.
        store, self.prefix_cache = self.prefix_cache, None
        try:
            for T in sorted({E.bucket_length(n, self.max_len) for n in range(1, self.max_len)}):
                req = Request([bos] * min(T, self.max_len - 1), lambda ev: None, max_tokens=self.max_len, seed=0)
                self._place(req, [0])
            self._finish[0] = E.RUNNING  # compiles _free's device update too
        finally:
            self._free(0)
            self.prefix_cache = store
        self._step()  # every slot free: a full decode call that changes nothing
        return time.perf_counter() - t0

    def _take_safely(self, s: int, token: int, finish: int, lp, forced: bool):
        req = self._owner[s][0]
        try:
            self._take(s, token, finish, lp, forced)
        except Exception as e:  # noqa: BLE001  (e.g. a listener or filter bug: fail this request only)
            self._fail(req, f"{type(e).__name__}: {e}")

    def _take(self, s: int, token: int, finish: int, lp, forced: bool):
        """Account a slot's new token: calculator state, text, stop strings, output filter, finish."""
        req, i = self._owner[s]
        ch = req.choices[i]
        ch.tool.see(token, self.engine.special, self.engine.tokenizer)
        if finish != E.STOP:  # the stop token itself is not part of the reply
            ch.tokens.append(token)
            req.completion_tokens += 1
        if req.on_token is not None:  # the caller wants tokens, not text
            req.on_token(self._ticks, i, token, finish, forced)
            if finish != E.RUNNING:
                self._emit(req, i, "", E.FINISH_REASONS[finish])
                self._free(s)
            return
        text = self.engine.tokenizer.decode(ch.tokens)
        if finish != E.STOP and req.logprobs and lp is not None:
            ch.ends.append(len(text))
            top = [(int(t), float(v)) for t, v in zip(lp[1][:req.top_logprobs], lp[2][:req.top_logprobs])]
            ch.pending.append((token, float(lp[0]), top))
        hit = min((j for j in (text.find(st) for st in req.stop) if j >= 0), default=-1)
        if hit >= 0:
            text, reason = text[:hit], "stop"
        elif finish in (E.STOP, E.LENGTH):
            reason = E.FINISH_REASONS[finish]
        elif text.endswith("\ufffd"):  # hold back a half-decoded multi-byte character
            return
        else:
            text, reason = text[:len(text) - _held(text, req.stop)], None
        whole = reason in ("stop", "length") and hit < 0  # the reply ended by itself: every token counts
        if ch.guard is not None:
            safe, category = ch.guard.feed(text, reason is not None)
            text = text[:safe]
            if category is not None:
                reason, whole = "content_filter", False
        self._emit(req, i, text, reason, whole)
        if reason:
            self._free(s)

    def _emit(self, req: Request, i: int, text: str, finish_reason: str | None, whole: bool = False):
        """Send the new part of `text`; logprob entries go with it once their token's text is
        fully sent (all of them when `whole`; never those of text cut by a stop string or filter)."""
        ch = req.choices[i]
        lps = None
        if req.logprobs and (len(text) > ch.sent or finish_reason):
            k = len(ch.pending) if whole else sum(1 for e in ch.ends if e <= len(text))
            lps, ch.pending, ch.ends = ch.pending[:k], ch.pending[k:], ch.ends[k:]
        if len(text) > ch.sent:
            _notify(req, Event(i, text[ch.sent:], None, lps))
            ch.sent, lps = len(text), None
        if finish_reason:
            ch.done = True
            _notify(req, Event(i, "", finish_reason, lps))
            if all(c.done for c in req.choices):
                _notify(req, None)

    def _free(self, s: int):
        s = int(s)  # a Python int, so the device update below compiles once (warmup)
        if self._finish[s] == E.RUNNING:  # the host ended it (stop string, cancel): stop the device too
            self.state = self.state._replace(finish_S=self.state.finish_S.at[s].set(E.FREE))
        self._finish[s] = E.FREE
        self._owner[s] = None


# ---- Engine: upstream's API over the same loop -----------------------------------------------------

class Completion(NamedTuple):
    tokens: list  # generated ids, without the stop token
    masks: list  # 1 sampled, 0 forced
    finish_reason: str  # "stop" or "length"


class Engine:
    """Streaming generation over the jitted core (upstream's Engine API, plus top_p). Each call
    turns a private Scheduler on this thread: one prefill, num_samples slots, no queue wait."""

    def __init__(self, params, config: GPTConfig, tokenizer, dtype=None, steps_per_call: int = 1, mesh=None):
        """steps_per_call > 1 decodes that many tokens per device call (generate_steps):
        fewer dispatches and host syncs, at the cost of up to that many wasted steps at the end.
        mesh (serving_mesh.serving_mesh) splits the weights and every Scheduler's decode state."""
        # host (numpy) params go to the device once here, not on every jitted call
        params = (jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jnp.asarray(a), params)
                  if mesh is None else serving_mesh.place_params(params, config, mesh))
        self.mesh = mesh
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.dtype = resolve_dtype(dtype)
        self.steps_per_call = steps_per_call
        names = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
                 "<|assistant_end|>", "<|bos|>")
        self.special = {s: tokenizer.encode_special(s) for s in names}
        self.stop_ids = (self.special["<|assistant_end|>"], self.special["<|bos|>"])

    def _stream(self, tokens, num_samples, max_tokens, temperature, top_k, top_p, seed):
        """Yields (token column, masks, fresh, finish codes) per step that produced a token;
        fresh marks the rows that did."""
        if not tokens:
            raise ValueError("generate needs at least one prompt token")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        n = len(tokens)
        cap = self.config.sequence_len if max_tokens is None else n + max_tokens
        if n >= cap:
            raise ValueError(f"prompt of {n} tokens leaves no room under the {cap}-token limit")
        max_len = -(-cap // 128) * 128  # round up so nearby requests share one compile
        replicas = 1 if self.mesh is None else self.mesh.shape["data"]
        sched = Scheduler(self, slots=-(-num_samples // replicas) * replicas, max_len=max_len,
                          steps_per_call=self.steps_per_call, thread=False)
        got = []
        req = sched.submit(Request(list(tokens), lambda ev: None, max_tokens=cap - n, n=num_samples,
                                   temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
                                   seed=seed, on_token=lambda *a: got.append(a)))
        column, finish = [0] * num_samples, [E.RUNNING] * num_samples
        while not all(ch.done for ch in req.choices):
            sched.run_once()
            if req.error:
                raise RuntimeError(req.error)
            for _, step in itertools.groupby(got, key=lambda a: a[0]):
                masks, fresh = [0] * num_samples, [False] * num_samples
                for _, r, token, code, forced in step:
                    column[r], finish[r], fresh[r], masks[r] = token, code, True, int(not forced)
                yield list(column), masks, fresh, list(finish)
            got.clear()

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Yields (token_column, token_masks) per step; mask 0 = forced (or an already finished row)."""
        for column, masks, _, _ in self._stream(tokens, num_samples, max_tokens, temperature, top_k, top_p, seed):
            yield column, masks

    def complete(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None,
                 seed=42) -> list[Completion]:
        """Run to the end: each row's generated tokens (stop token excluded) and finish reason."""
        out = [([], []) for _ in range(num_samples)]
        finish = [E.RUNNING] * num_samples
        stop = set(self.stop_ids)
        for column, masks, fresh, finish in self._stream(tokens, num_samples, max_tokens, temperature, top_k, top_p,
                                                         seed):
            for r in range(num_samples):
                if fresh[r] and column[r] not in stop:
                    out[r][0].append(column[r])
                    out[r][1].append(masks[r])
        return [Completion(t, m, E.FINISH_REASONS.get(f, "length")) for (t, m), f in zip(out, finish)]

    def generate_batch(self, tokens, num_samples=1, **kw):
        """Upstream's (results, masks): prompt + generated ids per row, masks 0 on prompt and forced tokens."""
        done = self.complete(tokens, num_samples, **kw)
        return [list(tokens) + c.tokens for c in done], [[0] * len(tokens) + c.masks for c in done]


def _notify(req: Request, event):
    """A listener that fails (its event loop is gone) is a client that left: cancel, don't crash the loop."""
    try:
        req.on_event(event)
    except Exception:  # noqa: BLE001
        req.cancelled = True


def _held(text: str, stops) -> int:
    """Characters at the end of text that could start a stop string: not safe to stream yet."""
    return max((k for st in stops for k in range(min(len(st) - 1, len(text)), 0, -1) if text.endswith(st[:k])),
               default=0)
