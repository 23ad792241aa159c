"""SmolTalk (smol-smoltalk), general chat for SFT: ~460K train and ~24K test rows.

Data, in this order of preference:
1. `data_dir=`: a local .jsonl / .json / .parquet file, or a folder holding the split, rows
   `{"messages": [{"role", "content"}, ...]}` (optional leading system message, then user and
   assistant alternating, string contents);
2. `source="hub"` (the default): the HF parquet conversion of `HuggingFaceTB/smol-smoltalk`,
   downloaded once to `$NANOCHAT_JAX_HOME/task_data/HuggingFaceTB--smol-smoltalk/default/{split}/`.
No package ships it.

Shuffled with seed 42 after loading, as upstream. Training only: there is no evaluate.
"""

from __future__ import annotations

from nanochat_jax.tasks.hub import HubTask, check_chat, field


class SmolTalk(HubTask):
    """SmolTalk(split "train"|"test", *, data_dir=None, source="auto"|"hub", cache_dir=None,
    base_url=None, start=0, stop=None, step=1). Example: {"messages": row["messages"]}."""

    repo_id = "HuggingFaceTB/smol-smoltalk"
    subsets = ("default",)
    splits = ("train", "test")
    columns = ("messages",)
    required = ("messages",)

    def __init__(self, split: str, subset: str = "default", **kw):
        super().__init__(subset, split, **kw)

    def validate_row(self, row: dict) -> None:
        check_chat(field(row, "messages", list), allow_system=True)

    def conversation(self, row: dict) -> dict:
        return {"messages": row["messages"]}
