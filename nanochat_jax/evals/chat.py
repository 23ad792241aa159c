"""Chat-model evaluation (docs/numerics.md#chatcore): categorical tasks by logits over the answer letters,
generative tasks by sampling and checking, and the ChatCORE aggregate.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nanochat_jax import model
from nanochat_jax.common import resolve_dtype
from nanochat_jax.config import GPTConfig
from nanochat_jax.evals.core import seq_bucket
from nanochat_jax.scheduler import Request
from nanochat_jax.tasks.common import Task

# ChatCORE's chance levels: four-way multiple choice, and 0 for open answers.
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
CATEGORICAL = ("ARC-Easy", "ARC-Challenge", "MMLU")


@functools.lru_cache(maxsize=None)
def _last_logits_fn(config: GPTConfig, dtype):
    @jax.jit
    def fn(params, tokens_BT, last_B):
        logits_BTV = model.forward(params, tokens_BT, config, dtype=dtype)
        return jnp.take_along_axis(logits_BTV, last_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return fn


def letter_ids(tokenizer, letters: Sequence[str]) -> list[int]:
    """Each answer letter as its single token id (the prompt's `=A` is built so that holds)."""
    ids = []
    for letter in letters:
        enc = tokenizer.encode(letter)
        if len(enc) != 1:
            raise ValueError(f"answer letter {letter!r} encodes to {len(enc)} tokens; categorical eval needs one")
        ids.append(enc[0])
    return ids


def categorical_accuracy(params, config: GPTConfig, tokenizer, task: Task, *, batch_size: int = 8,
                         max_problems: int | None = None, dtype=None, desc: str = "") -> tuple[int, int]:
    """(correct, total): argmax over the allowed letters of the logits at <|assistant_start|>."""
    fn = _last_logits_fn(config, resolve_dtype(dtype))
    n = len(task) if max_problems is None or max_problems < 0 else min(max_problems, len(task))
    correct = 0
    for lo in tqdm(range(0, n, batch_size), desc=desc or "categorical", leave=False, disable=n <= batch_size):
        convs = [task[i] for i in range(lo, min(lo + batch_size, n))]
        # a prompt longer than the context keeps its end (the question's tail and the answer slot)
        prompts = [tokenizer.render_for_completion(c)[-config.sequence_len:] for c in convs]
        T = min(seq_bucket(max(map(len, prompts))), config.sequence_len)  # CORE's few shapes
        rows = np.full((batch_size, T), tokenizer.bos_token_id, np.int32)  # a fixed batch size: one compile
        for r, p in enumerate(prompts):
            rows[r, :len(p)] = p
        last = np.zeros(batch_size, np.int32)
        last[:len(prompts)] = [len(p) - 1 for p in prompts]
        logits = np.asarray(fn(params, rows, last))
        for r, conv in enumerate(convs):
            ids = letter_ids(tokenizer, conv["letters"])
            choice = conv["letters"][int(np.argmax(logits[r, ids]))]
            correct += bool(task.evaluate(conv, choice))
    return correct, n


def generative_accuracy(complete: Callable[[list[list[int]]], list[list[str]]], tokenizer, task: Task, *,
                        max_problems: int | None = None, chunk: int = 64, desc: str = "") -> tuple[int, int]:
    """(passed, total): a problem passes if any of its samples is correct (pass@k).

    complete(prompts) returns, per prompt, the decoded text of each sample; it is called on
    chunks of problems so a batched sampler can keep its slots full.
    """
    n = len(task) if max_problems is None or max_problems < 0 else min(max_problems, len(task))
    passed = 0
    bar = tqdm(total=n, desc=desc or "generative", leave=False, disable=n <= 1)
    for lo in range(0, n, chunk):
        convs = [task[i] for i in range(lo, min(lo + chunk, n))]
        outs = complete([tokenizer.render_for_completion(c) for c in convs])
        passed += sum(any(task.evaluate(c, text) for text in texts) for c, texts in zip(convs, outs))
        bar.update(len(convs))
    bar.close()
    return passed, n


def scheduler_sampler(sched, *, num_samples: int = 1, max_tokens: int = 512, temperature: float = 0.0,
                      top_k: int = 50, seed: int = 42):
    """complete(prompts) → per prompt, its samples' texts; every prompt is in flight at once, so the
    scheduler keeps all its slots busy (continuous batching)."""
    def complete(prompts):
        texts = [[""] * num_samples for _ in prompts]
        left, done = [len(prompts)], threading.Event()
        lock = threading.Lock()

        def on_event(i):
            def cb(ev):
                with lock:
                    if ev is None:
                        left[0] -= 1
                        if not left[0]:
                            done.set()
                    else:
                        texts[i][ev.index] += ev.text
            return cb

        reqs = []
        for i, p in enumerate(prompts):
            # too long for the context: keep the prompt's end and a quarter of the context to answer in
            p = p[-(sched.max_len - min(max_tokens, sched.max_len // 4)):]
            room = sched.max_len - len(p)
            reqs.append(sched.submit(Request(p, on_event(i), max_tokens=min(max_tokens, room), n=num_samples,
                                             temperature=temperature, top_k=top_k, seed=seed + i)))
        done.wait()
        errors = [r.error for r in reqs if r.error]
        if errors:
            raise RuntimeError(f"sampling failed: {errors[0]}")
        return texts
    return complete


def chatcore(accuracies: dict[str, float]) -> dict[str, float]:
    """ChatCORE (mean centered accuracy over the tasks present) and its categorical part."""
    centered = {k: (acc - BASELINES[k]) / (1 - BASELINES[k]) for k, acc in accuracies.items() if k in BASELINES}
    out = {}
    if centered:
        out["chatcore"] = float(np.mean(list(centered.values())))
    cat = [v for k, v in centered.items() if k in CATEGORICAL]
    if cat:
        out["chatcore_cat"] = float(np.mean(cat))
    return out
