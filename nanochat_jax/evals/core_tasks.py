"""CORE's data (docs/numerics.md#core): the task table, the eval bundle on disk, its task files, its download.

The eval bundle (eval_bundle.zip) holds core.yaml, eval_meta_data.csv and eval_data/*.jsonl.
A directory with only eval_data/ also works: the built-in table of the 22 tasks (settings and
random baselines) stands in for core.yaml and the csv. Tasks whose file is missing are skipped
and CORE is the mean over the tasks present (the count is stated). Host-side only: no JAX here;
evals/core.py renders, scores and averages.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nanochat_jax.download import DownloadError, download
from nanochat_jax.paths import bundle_dir

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
CONFIG_NAME = "core.yaml"
META_NAME = "eval_meta_data.csv"
DATA_DIRNAME = "eval_data"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

FIELDS = {
    "multiple_choice": {"query": str, "choices": list, "gold": int},
    "schema": {"context_options": list, "continuation": str, "gold": int},
    "language_modeling": {"context": str, "continuation": str},
}


class CoreDataError(ValueError):
    """A task file, core.yaml or eval_meta_data.csv is malformed, or an example cannot be scored."""


# ---- tasks ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    """One CORE task: its settings (core.yaml) and random baseline in percent (eval_meta_data.csv)."""

    label: str
    task_type: str
    dataset_uri: str  # relative to eval_data/
    num_fewshot: int
    continuation_delimiter: str = " "
    random_baseline: float = 0.0

    def __post_init__(self):
        if self.task_type not in TASK_TYPES:
            raise CoreDataError(f"task {self.label!r}: icl_task_type {self.task_type!r} is not one of {TASK_TYPES}")
        if isinstance(self.num_fewshot, bool) or not isinstance(self.num_fewshot, int) or self.num_fewshot < 0:
            raise CoreDataError(f"task {self.label!r}: num_fewshot must be an int >= 0, got {self.num_fewshot!r}")
        if not isinstance(self.continuation_delimiter, str):
            raise CoreDataError(f"task {self.label!r}: continuation_delimiter must be a string, "
                                f"got {self.continuation_delimiter!r}")
        if not 0 <= self.random_baseline < 100:
            raise CoreDataError(f"task {self.label!r}: random baseline {self.random_baseline} is not a percentage "
                                "in [0, 100)")

    def centered(self, accuracy: float) -> float:
        b = 0.01 * self.random_baseline
        return (accuracy - b) / (1.0 - b)


MC, SCHEMA, LM = TASK_TYPES
ANSWER = "\nAnswer: "
# nanochat's core.yaml (DCLM heavy.yaml) and DCLM eval_meta_data.csv; used when the bundle
# directory lacks core.yaml / the csv (a bundle is core.yaml + eval_meta_data.csv + eval_data/).
# Columns: label, type, file under eval_data/, few-shot K, delimiter (_ is " "), random baseline %.
_TABLE = """
hellaswag_zeroshot                mc  language_understanding/hellaswag.jsonl                   0  _       25
jeopardy                          lm  world_knowledge/jeopardy_all.jsonl                      10  Answer   0
bigbench_qa_wikidata              lm  world_knowledge/bigbench_qa_wikidata.jsonl              10  _        0
arc_easy                          mc  world_knowledge/arc_easy.jsonl                          10  Answer  25
arc_challenge                     mc  world_knowledge/arc_challenge.jsonl                     10  Answer  25
copa                              mc  commonsense_reasoning/copa.jsonl                         0  _       50
commonsense_qa                    mc  commonsense_reasoning/commonsense_qa.jsonl              10  _       20
piqa                              mc  commonsense_reasoning/piqa.jsonl                        10  Answer  50
openbook_qa                       mc  commonsense_reasoning/openbook_qa.jsonl                  0  _       25
lambada_openai                    lm  language_understanding/lambada_openai.jsonl              0  _        0
hellaswag                         mc  language_understanding/hellaswag.jsonl                  10  _       25
winograd                          schema  language_understanding/winograd_wsc.jsonl            0  _       50
winogrande                        schema  language_understanding/winogrande.jsonl              0  _       50
bigbench_dyck_languages           lm  symbolic_problem_solving/bigbench_dyck_languages.jsonl  10  _        0
agi_eval_lsat_ar                  mc  symbolic_problem_solving/agi_eval_lsat_ar.jsonl          3  _       20
bigbench_cs_algorithms            lm  symbolic_problem_solving/bigbench_cs_algorithms.jsonl   10  _        0
bigbench_operators                lm  symbolic_problem_solving/bigbench_operators.jsonl       10  _        0
bigbench_repeat_copy_logic        lm  symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl 10 _       0
squad                             lm  reading_comprehension/squad.jsonl                       10  _        0
coqa                              lm  reading_comprehension/coqa.jsonl                         0  _        0
boolq                             mc  reading_comprehension/boolq.jsonl                       10  Answer  62
bigbench_language_identification  mc  language_understanding/bigbench_language_identification.jsonl 10 _  9.1
"""
_KINDS, _DELIMS = {"mc": MC, "schema": SCHEMA, "lm": LM}, {"_": " ", "Answer": ANSWER}
BUILTIN_TASKS = tuple(TaskSpec(label, _KINDS[kind], uri, int(k), _DELIMS[delim], float(base))
                      for label, kind, uri, k, delim, base in map(str.split, _TABLE.strip().split("\n")))
BUILTIN_BASELINES = {t.label: t.random_baseline for t in BUILTIN_TASKS}


# ---- task data ----------------------------------------------------------------------------------

def _check_item(item, task_type: str, where: str) -> None:
    if not isinstance(item, dict):
        raise CoreDataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    for name, kind in FIELDS[task_type].items():
        if name not in item:
            raise CoreDataError(f"{where}: missing field {name!r} (a {task_type} example needs "
                                f"{sorted(FIELDS[task_type])})")
        value = item[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CoreDataError(f"{where}: field {name!r} must be a {kind.__name__}, got {type(value).__name__} "
                                f"{value!r:.80}")
    options = item.get("choices" if task_type == MC else "context_options")
    if options is not None:
        name = "choices" if task_type == MC else "context_options"
        if not options:
            raise CoreDataError(f"{where}: {name!r} is empty")
        bad = [i for i, o in enumerate(options) if not isinstance(o, str)]
        if bad:
            raise CoreDataError(f"{where}: {name!r}[{bad[0]}] must be a string, got {type(options[bad[0]]).__name__}")
        if not 0 <= item["gold"] < len(options):
            raise CoreDataError(f"{where}: gold {item['gold']} is out of range for {len(options)} {name}")


def load_task_file(path, task_type: str) -> tuple[list[dict], list[int]]:
    """(examples, their 1-based line numbers) of a jsonl task file, each example checked for its type.

    Blank lines are skipped; any other line that is not a valid example is an error naming
    the file and the line.
    """
    path = Path(path)
    if task_type not in TASK_TYPES:
        raise CoreDataError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")
    items, lines = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise CoreDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            _check_item(item, task_type, where)
            items.append(item)
            lines.append(lineno)
    if not items:
        raise CoreDataError(f"{path}: no examples")
    return items, lines


# ---- the bundle -------------------------------------------------------------------------------------

@dataclass
class Bundle:
    directory: Path
    tasks: list[TaskSpec]  # with a data file present, in core.yaml order
    missing: list[TaskSpec]  # without one
    source: str  # where the task settings came from

    @property
    def total(self) -> int:
        return len(self.tasks) + len(self.missing)

    def data_path(self, spec: TaskSpec) -> Path:
        return self.directory / DATA_DIRNAME / spec.dataset_uri

    def select(self, labels: Sequence[str]) -> Bundle:
        """The same bundle restricted to `labels` (present ones; unknown labels are an error)."""
        known = {t.label for t in self.tasks + self.missing}
        unknown = sorted(set(labels) - known)
        if unknown:
            raise CoreDataError(f"unknown task(s) {unknown}; the bundle has {sorted(known)}")
        keep = set(labels)
        return Bundle(self.directory, [t for t in self.tasks if t.label in keep],
                      [t for t in self.missing if t.label in keep], self.source)


def _read_baselines(path: Path) -> dict[str, float]:
    out = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for col in ("Eval Task", "Random baseline"):
            if col not in cols:
                raise CoreDataError(f"{path}: no {col!r} column (columns: {cols})")
        for lineno, row in enumerate(reader, 2):
            try:
                out[row["Eval Task"].strip()] = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise CoreDataError(f"{path}, line {lineno}: random baseline {row['Random baseline']!r} "
                                    "is not a number") from None
    return out


def _read_core_yaml(path: Path, baselines: dict[str, float]) -> list[TaskSpec]:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CoreDataError(f"{path}: invalid YAML ({e})") from None
    tasks = cfg.get("icl_tasks") if isinstance(cfg, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise CoreDataError(f"{path}: expected a non-empty 'icl_tasks' list")
    specs = []
    for i, t in enumerate(tasks):
        label = t.get("label") if isinstance(t, dict) else None
        what = f"{path}: icl_tasks[{i}]" + (f" ({label})" if label else "")
        if not isinstance(t, dict):
            raise CoreDataError(f"{what}: expected a mapping")
        for key in ("label", "icl_task_type", "dataset_uri", "num_fewshot"):
            if key not in t:
                raise CoreDataError(f"{what}: missing {key!r}")
        k = t["num_fewshot"]
        if isinstance(k, list):
            if not k:
                raise CoreDataError(f"{what}: num_fewshot is an empty list")
            k = k[0]
        if label not in baselines:
            raise CoreDataError(f"{what}: no random baseline for {label!r} in {META_NAME} or the built-in table")
        try:
            specs.append(TaskSpec(str(label), t["icl_task_type"], str(t["dataset_uri"]), k,
                                  t.get("continuation_delimiter", " "), baselines[label]))
        except CoreDataError as e:
            raise CoreDataError(f"{what}: {e}") from None
    return specs


def load_bundle(directory=None) -> Bundle:
    """Read an eval bundle directory: core.yaml + eval_meta_data.csv + eval_data/*.jsonl.

    Without core.yaml the built-in 22-task table is used; without the csv, built-in
    baselines. Tasks whose jsonl is absent go to `missing`.
    """
    d = Path(directory) if directory is not None else bundle_dir()
    if not (d / DATA_DIRNAME).is_dir():
        raise FileNotFoundError(f"no CORE eval bundle at {d} (expected {d / DATA_DIRNAME}/); download it with "
                                f"`python -m train.base_eval --download --bundle-dir {d}` "
                                f"(from {EVAL_BUNDLE_URL})")
    baselines = dict(BUILTIN_BASELINES)
    sources = []
    if (d / META_NAME).is_file():
        baselines.update(_read_baselines(d / META_NAME))
        sources.append(META_NAME)
    if (d / CONFIG_NAME).is_file():
        specs = _read_core_yaml(d / CONFIG_NAME, baselines)
        sources.insert(0, CONFIG_NAME)
    else:
        specs = [TaskSpec(t.label, t.task_type, t.dataset_uri, t.num_fewshot, t.continuation_delimiter,
                          baselines[t.label]) for t in BUILTIN_TASKS]
        sources.insert(0, "built-in task table")
    present = [s for s in specs if (d / DATA_DIRNAME / s.dataset_uri).is_file()]
    missing = [s for s in specs if s not in present]
    return Bundle(d, present, missing, " + ".join(sources))


# ---- download ---------------------------------------------------------------------------------------

def _is_complete(d: Path) -> bool:
    return (d / CONFIG_NAME).is_file() and (d / DATA_DIRNAME).is_dir()


def _bundle_root(zf: zipfile.ZipFile) -> str:
    """The member prefix ('' or 'name/') under which core.yaml and eval_data/ sit."""
    names = zf.namelist()
    for name in sorted(names, key=len):
        if name == CONFIG_NAME or (name.endswith("/" + CONFIG_NAME) and name.count("/") == 1):
            prefix = name[: -len(CONFIG_NAME)]
            if any(n.startswith(prefix + DATA_DIRNAME + "/") for n in names):
                return prefix
    raise ValueError(f"the zip has no {CONFIG_NAME} with an {DATA_DIRNAME}/ beside it "
                     f"(at the top or in one top-level folder)")


def _check_zip(path: Path) -> None:
    """The downloader's check: a valid zip, every CRC right, core.yaml and eval_data/ inside."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"corrupt member {bad!r} in the zip (CRC mismatch)")
            _bundle_root(zf)
    except zipfile.BadZipFile as e:
        raise ValueError(f"not a valid zip file ({e})") from None


def _install(zip_path: Path, dest: Path) -> None:
    """Extract the zip next to dest, check that it reads as a bundle, then rename it into place."""
    with zipfile.ZipFile(zip_path) as zf:
        prefix = _bundle_root(zf)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.extract")
        try:
            zf.extractall(tmp)
            root = tmp / prefix if prefix else tmp
            load_bundle(root)  # core.yaml and the csv parse
            try:
                os.replace(root, dest)
            except OSError:
                if not _is_complete(dest):  # not a concurrent download that finished first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def download_bundle(dest=None, url: str = EVAL_BUNDLE_URL, **download_kw) -> Path:
    """Fetch eval_bundle.zip and unpack it to `dest` (default $NANOCHAT_JAX_HOME/eval_bundle).

    The zip comes through nanochat_jax.download (checked: a valid zip, CRCs, core.yaml and
    eval_data/ present), is extracted to a temp directory next to dest, and only then is
    renamed to dest, so an interrupted download never leaves a directory that reads as a
    bundle. A complete bundle already at dest is kept. `download_kw` goes to download().
    """
    dest = Path(dest) if dest is not None else bundle_dir()
    if _is_complete(dest):
        return dest
    if dest.exists():
        raise DownloadError(f"{dest} exists but is not a complete eval bundle (no {CONFIG_NAME}); "
                            "move it away or choose another bundle directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for stale in dest.parent.glob(f".{dest.name}.*"):  # leftovers of a crashed attempt, an hour old
        if now - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    zip_path = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.zip")
    try:
        download(url, zip_path, check=_check_zip, **download_kw)
        _install(zip_path, dest)
    finally:
        zip_path.unlink(missing_ok=True)
    return dest


def bundle_for_training(directory, log: Callable[[str], None] = print) -> Bundle | None:
    """The bundle for in-training CORE, or None (after one clear notice) when there is none."""
    try:
        bundle = load_bundle(directory)
    except FileNotFoundError as e:
        log(f"note: CORE is skipped: {e}")
        return None
    if not bundle.tasks:
        log(f"note: CORE is skipped: no task files under {bundle.directory / DATA_DIRNAME}")
        return None
    log(f"CORE: {len(bundle.tasks)}/{bundle.total} tasks from {bundle.directory} ({bundle.source})")
    return bundle
