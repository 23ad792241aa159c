"""CORE (docs/numerics.md#core): DCLM's 22 in-context-learning tasks, scored by likelihood, centered and averaged.

Per task: load the jsonl, shuffle with random.Random(1337), keep the first max_per_task,
render each example's prompts (K few-shot examples drawn with random.Random(1234 + idx)
from the truncated list, each followed by a blank line), tokenize with BOS, and score:

- multiple_choice: one prompt per choice; the answer span starts at the longest common
  token prefix; the choice with the lowest mean cross-entropy over its span wins;
- schema: one prompt per context option; the span is the common token suffix; lowest mean CE;
- language_modeling: the prompt with the continuation; the span is what the continuation
  adds to the prompt without it; correct only if the argmax matches at every span position.

centered = (acc - 0.01·baseline%) / (1 - 0.01·baseline%); CORE = the mean of the centered values.

On JAX, prompts of many examples are packed into right-padded (BOS) batches whose lengths
are rounded to a few bucket sizes (multiples of 128), so one jitted function (per-position
CE and argmax-correctness) compiles only a handful of shapes. Processes stride over the
examples of a task and their per-example results are summed across processes.

The task table, the eval bundle and its download live in evals/core_tasks.py.
"""

from __future__ import annotations

import collections.abc
import functools
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from nanochat_jax.evals.core_tasks import (DATA_DIRNAME, LM, MC, SCHEMA, Bundle, CoreDataError, TaskSpec,
                                           load_task_file)
from nanochat_jax.sharding import BATCH

SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234
SEQ_MULTIPLE = 128  # bucket lengths are multiples of this (splash attention needs 128)
CHUNK_EXAMPLES = 256  # examples tokenized and scored together (bounds host memory on big tasks)


def shuffle_and_truncate(items: list, max_per_task: int = -1, *others: list) -> list | tuple[list, ...]:
    """random.Random(1337).shuffle, then the first max_per_task (all if <= 0).

    Lists in `others` (same length as items) get the same permutation.
    """
    order = list(range(len(items)))
    random.Random(SHUFFLE_SEED).shuffle(order)  # shuffle depends only on the length: same permutation
    if max_per_task > 0:
        order = order[:max_per_task]
    out = [[lst[i] for i in order] for lst in (items, *others)]
    return out[0] if not others else tuple(out)


class _AllBut(collections.abc.Sequence):
    """range(n) without idx, without building the list (random.sample only needs len and indexing)."""

    def __init__(self, n: int, idx: int):
        self.n, self.idx = n, idx

    def __len__(self):
        return self.n - 1

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        if j < 0:
            j += len(self)
        if not 0 <= j < len(self):
            raise IndexError(j)
        return j if j < self.idx else j + 1


def fewshot_indices(n: int, idx: int, k: int) -> list[int]:
    """random.Random(1234 + idx).sample(k of the n indices other than idx) — the same draws as on the list."""
    if k <= 0:
        return []
    if k > n - 1:
        raise CoreDataError(f"{k}-shot needs at least {k + 1} examples, the task has {n} "
                            "(after max_per_task truncation)")
    return random.Random(FEWSHOT_SEED + idx).sample(_AllBut(n, idx), k)


# ---- prompts (plain string building equal to nanochat's Jinja templates) -------------------------

def render_prompts_mc(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One prompt per choice: few-shot `query + delim + gold choice` + blank line each, then the item."""
    head = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{head}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One prompt per context option: few-shot `gold option + delim + continuation`, then each option."""
    head = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{head}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """[without, with] the continuation; contexts are trimmed and the whole `without` prompt is stripped."""
    head = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{head}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


RENDER = {MC: render_prompts_mc, SCHEMA: render_prompts_schema, LM: render_prompts_lm}


# ---- answer spans ---------------------------------------------------------------------------------

def find_common_length(seqs: Sequence[Sequence[int]], direction: str = "left") -> int:
    """Length of the common token prefix ('left') or suffix ('right') of all sequences."""
    min_len = min(len(s) for s in seqs)
    for i in range(min_len):
        pos = i if direction == "left" else -1 - i
        tok = seqs[0][pos]
        if any(s[pos] != tok for s in seqs):
            return i
    return min_len


def answer_spans(task_type: str, tokens: list[list[int]], where: str = "example"):
    """(rows to score, span starts, span ends) for one example's tokenized prompts."""
    if task_type == MC:
        start = find_common_length(tokens, "left")
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task_type == SCHEMA:
        suffix = find_common_length(tokens, "right")
        ends = [len(t) for t in tokens]
        return tokens, [e - suffix for e in ends], ends
    if task_type == LM:
        without, with_ = tokens
        start, end = len(without), len(with_)
        if not (start < end and with_[:start] == without):
            raise CoreDataError(
                f"{where}: the prompt without the continuation ({start} tokens) is not a strict token prefix of "
                f"the prompt with it ({end} tokens), so the continuation's span is undefined")
        return [with_], [start], [end]
    raise CoreDataError(f"unknown task type {task_type!r}")


def example_prompts(data: Sequence[dict], idx: int, spec: TaskSpec) -> list[str]:
    """The rendered prompts of data[idx] with its seeded few-shot examples from `data`."""
    shots = [data[i] for i in fewshot_indices(len(data), idx, spec.num_fewshot)]
    return RENDER[spec.task_type](data[idx], spec.continuation_delimiter, shots)


# ---- scoring on JAX ---------------------------------------------------------------------------------

def ce_and_correct(logits_BTV, tokens_BT):
    """Per position t: CE(logits[t], tokens[t+1]) in fp32 and argmax(logits[t]) == tokens[t+1].

    The last position has no next token; it gets token 0 as a dummy target (never in a span).
    """
    targets = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros_like(tokens_BT[:, :1])], axis=1)
    logits = logits_BTV.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - picked, jnp.argmax(logits, axis=-1) == targets


class Scorer:
    """tokens (B, T) int32 → (ce (B, T) float32, correct (B, T) bool) as numpy, plus batching hints.

    row_multiple: B must be a multiple of it (data-parallel devices); seq_multiple: T buckets.
    """

    def __init__(self, fn: Callable, *, row_multiple: int = 1, seq_multiple: int = SEQ_MULTIPLE,
                 put: Callable | None = None, mesh: Mesh | None = None):
        self.fn, self.row_multiple, self.seq_multiple = fn, row_multiple, seq_multiple
        self.put = put or jnp.asarray
        self.mesh = mesh

    def __call__(self, tokens_BT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                ce, ok = self.fn(self.put(tokens_BT))
        else:
            ce, ok = self.fn(self.put(tokens_BT))
        return np.asarray(jax.device_get(ce), np.float32), np.asarray(jax.device_get(ok), bool)


def logits_scorer(logits_fn: Callable, **kw) -> Scorer:
    """A Scorer from any jittable tokens_BT → logits_BTV function (tests use hand-made logits)."""
    return Scorer(jax.jit(lambda tokens: ce_and_correct(logits_fn(tokens), tokens)), **kw)


@functools.cache
def _model_fn(config, dtype, backend):
    from nanochat_jax import model

    def fn(params, tokens_BT):
        return ce_and_correct(model.forward(params, tokens_BT, config, dtype=dtype, backend=backend), tokens_BT)

    return jax.jit(fn)


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH if a in mesh.axis_names)


def model_scorer(params, config, *, dtype=None, backend=None, mesh: Mesh | None = None) -> Scorer:
    """A Scorer running nanochat's GPT (model.forward) under one cached jit per (config, dtype, backend).

    mesh: split each batch's rows over its data/fsdp axes (params keep their shardings).
    With several processes and params sharded across them, every process gathers the full
    params and replicates them over its own devices, so each process scores its examples
    independently (costs one full copy of the params per device while CORE runs).
    """
    from nanochat_jax.attention import resolve_backend
    from nanochat_jax.common import resolve_dtype

    dtype = resolve_dtype(dtype)
    backend = resolve_backend(backend, dtype)
    fn = _model_fn(config, dtype, backend)
    leaves = jax.tree.leaves(params)
    if jax.process_count() > 1 and not all(getattr(x, "is_fully_addressable", True) for x in leaves):
        from jax.experimental import multihost_utils

        from nanochat_jax.sharding import make_mesh

        host = multihost_utils.process_allgather(params, tiled=True)
        mesh = make_mesh("data=-1", devices=jax.local_devices())
        params = jax.device_put(host, NamedSharding(mesh, P()))
    if mesh is None:
        return Scorer(lambda tokens: fn(params, tokens))
    axes = _batch_axes(mesh)
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    sh = NamedSharding(mesh, P(axes or None, None))
    return Scorer(lambda tokens: fn(params, tokens), row_multiple=n, mesh=mesh,
                  put=lambda x: jax.device_put(x, sh))


def seq_bucket(n: int, multiple: int = SEQ_MULTIPLE) -> int:
    """n rounded up to multiple·{1, 2, 3, 4, 6, 8, 12, 16, ...}: few shapes, at most 50% padding."""
    k = max(1, -(-n // multiple))
    if k <= 2:
        return k * multiple
    p = 1 << (k.bit_length() - 1)  # largest power of two <= k
    for c in (p, p + p // 2, 2 * p):
        if c >= k:
            return c * multiple
    raise AssertionError("unreachable")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def rows_per_batch(T: int, batch_tokens: int, row_multiple: int = 1) -> int:
    """A power of two rows with B·T <= batch_tokens (at least 1), rounded up to row_multiple."""
    b = max(1, batch_tokens // T)
    return _round_up(1 << (b.bit_length() - 1), row_multiple)


def plan_batches(lengths: Sequence[int], batch_tokens: int, row_multiple: int = 1,
                 seq_multiple: int = SEQ_MULTIPLE) -> list[tuple[int, int, list[int]]]:
    """Group rows by length bucket into (B, T, row indices) batches.

    Full batches have rows_per_batch(T) rows; a bucket's last batch shrinks to the next
    power of two (not below an eighth of the full size), so few shapes ever compile.
    """
    buckets: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        buckets.setdefault(seq_bucket(lengths[i], seq_multiple), []).append(i)
    plan = []
    for T, rows in sorted(buckets.items()):
        full = rows_per_batch(T, batch_tokens, row_multiple)
        for s in range(0, len(rows), full):
            chunk = rows[s:s + full]
            B = full
            if len(chunk) < full:
                B = max(1 << (len(chunk) - 1).bit_length(), full // 8, 1)
                B = min(_round_up(B, row_multiple), full)
            plan.append((B, T, chunk))
    return plan


@dataclass
class TaskResult:
    accuracy: float
    correct: np.ndarray  # (N,) 1.0 / 0.0 per example, summed over processes
    mean_losses: dict = field(default_factory=dict)  # idx -> per-option mean CE (MC / schema, this process)


def _sum_across_processes(x: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


def evaluate_task(scorer: Scorer, tokenizer, data: Sequence[dict], spec: TaskSpec, *, batch_tokens: int = 16384,
                  process_index: int | None = None, process_count: int | None = None, progress: bool = True,
                  where: Sequence[str] | None = None) -> TaskResult:
    """Accuracy of one task over `data` (already shuffled and truncated).

    This process scores examples process_index, process_index + process_count, ...; the
    per-example results are summed across JAX processes. `where` names each example in
    errors (e.g. "file.jsonl, line 12").
    """
    p = jax.process_index() if process_index is None else process_index
    n_proc = jax.process_count() if process_count is None else process_count
    bos = tokenizer.bos_token_id
    N = len(data)
    if spec.num_fewshot > N - 1 and spec.num_fewshot > 0:
        raise CoreDataError(f"task {spec.label}: {spec.num_fewshot}-shot needs at least {spec.num_fewshot + 1} "
                            f"examples, there are {N} (raise max_per_task)")
    correct = np.zeros(N, np.float32)
    mean_losses = {}
    mine = list(range(p, N, n_proc))
    bar = tqdm(total=len(mine), desc=f"CORE {spec.label}", unit="ex", disable=not progress, leave=False,
               file=sys.stderr)
    for c in range(0, len(mine), CHUNK_EXAMPLES):
        idxs = mine[c:c + CHUNK_EXAMPLES]
        prompts = [example_prompts(data, idx, spec) for idx in idxs]
        flat = tokenizer.encode([s for ps in prompts for s in ps], prepend=bos)
        rows, owner, starts, ends = [], [], [], []
        pos = 0
        for j, (idx, ps) in enumerate(zip(idxs, prompts)):
            toks = flat[pos:pos + len(ps)]
            pos += len(ps)
            label = where[idx] if where is not None else f"example {idx}"
            r, s, e = answer_spans(spec.task_type, toks, f"task {spec.label}: {label}")
            rows += r
            owner += [j] * len(r)
            starts += s
            ends += e
        ce_rows: list = [None] * len(rows)
        ok_rows: list = [None] * len(rows)
        for B, T, chunk in plan_batches([len(r) for r in rows], batch_tokens, scorer.row_multiple,
                                        scorer.seq_multiple):
            batch = np.full((B, T), bos, np.int32)
            for b, i in enumerate(chunk):
                batch[b, :len(rows[i])] = rows[i]
            ce, ok = scorer(batch)
            for b, i in enumerate(chunk):
                s, e = max(starts[i], 1), ends[i]  # span [s, e) is predicted at positions [s-1, e-1)
                ce_rows[i] = ce[b, s - 1:e - 1]
                ok_rows[i] = ok[b, s - 1:e - 1]
        per_example: dict[int, list[int]] = {}
        for i, j in enumerate(owner):
            per_example.setdefault(j, []).append(i)
        for j, idx in enumerate(idxs):
            ri = per_example[j]
            if spec.task_type == LM:
                correct[idx] = float(bool(ok_rows[ri[0]].all()))
            else:
                # empty span (a choice equal to the common prefix) → NaN, as torch's mean of nothing
                losses = [float(ce_rows[i].mean()) if ce_rows[i].size else math.nan for i in ri]
                mean_losses[idx] = losses
                correct[idx] = float(losses.index(min(losses)) == data[idx]["gold"])
        bar.update(len(idxs))
    bar.close()
    if n_proc > 1:
        correct = _sum_across_processes(correct)
    return TaskResult(float(correct.mean()), correct, mean_losses)


def evaluate_core(scorer: Scorer, tokenizer, bundle: Bundle, *, max_per_task: int = -1, batch_tokens: int = 16384,
                  process_index: int | None = None, process_count: int | None = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """Every present task of the bundle → {"results", "centered_results", "core_metric", "num_tasks",
    "total_tasks", "skipped"}; the CORE metric is the mean over the tasks evaluated."""
    if not bundle.tasks:
        raise FileNotFoundError(f"the eval bundle at {bundle.directory} has none of its {bundle.total} task files "
                                f"under {bundle.directory / DATA_DIRNAME}")
    if bundle.missing:
        log(f"CORE: {len(bundle.missing)} of {bundle.total} tasks have no data file and are skipped: "
            + ", ".join(f"{t.label} ({t.dataset_uri})" for t in bundle.missing))
    results, centered = {}, {}
    for spec in bundle.tasks:
        t0 = time.time()
        path = bundle.data_path(spec)
        items, lines = load_task_file(path, spec.task_type)
        data, lines = shuffle_and_truncate(items, max_per_task, lines)
        where = [f"{path}, line {n}" for n in lines]
        res = evaluate_task(scorer, tokenizer, data, spec, batch_tokens=batch_tokens, process_index=process_index,
                            process_count=process_count, progress=progress, where=where)
        results[spec.label] = res.accuracy
        centered[spec.label] = spec.centered(res.accuracy)
        log(f"Evaluating: {spec.label} ({spec.num_fewshot}-shot, type: {spec.task_type})... accuracy: "
            f"{res.accuracy:.4f} | centered: {centered[spec.label]:.4f} | time: {time.time() - t0:.2f}s")
    core = sum(centered.values()) / len(centered)
    log(f"CORE over {len(centered)}/{bundle.total} tasks: {core:.4f}")
    return {"results": results, "centered_results": centered, "core_metric": core, "num_tasks": len(centered),
            "total_tasks": bundle.total, "skipped": [t.label for t in bundle.missing]}


def write_results_csv(path, out: dict) -> Path:
    """nanochat's base_eval CSV: padded `Task, Accuracy, Centered` rows and a final CORE row."""
    from nanochat_jax.fileio import atomic_write

    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for label, acc in out["results"].items():
        lines.append(f"{label:<35}, {acc:<10.6f}, {out['centered_results'][label]:<10.6f}")
    lines.append(f"{'CORE':<35}, {'':<10}, {out['core_metric']:<10.6f}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode("utf-8")))
    return path
