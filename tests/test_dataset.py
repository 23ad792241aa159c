"""Shard downloader (docs/numerics.md#shards) against a local HTTP server that can drop, corrupt or refuse files."""

import io
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fault_server import FaultServer

from nanochat_jax.data.dataset import (
    DATASETS,
    check_parquet,
    default_data_dir,
    download_shards,
    iter_texts,
    list_shards,
    shard_indices,
    shard_name,
    shard_url,
)
from nanochat_jax.download import DownloadError

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS, ROW_GROUP = 10, 2  # 5 row groups per fixture shard
CLIMBMIX_VAL, FINEWEB_VAL = 6542, 1822


def docs(index: int) -> list[str]:
    return [f"shard {index} doc {j} ✓" for j in range(DOCS)]


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP)
    return buf.getvalue()


def shard_bytes(index: int) -> bytes:
    return parquet_bytes(pa.table({"text": docs(index)}))


class ShardServer(FaultServer):
    """Serves fixture shards under /data/; hits and faults are keyed by file name."""

    def __init__(self):
        super().__init__()
        self.routes = {f"/data/{shard_name(i)}": shard_bytes(i) for i in [*range(6), CLIMBMIX_VAL, FINEWEB_VAL]}
        self.url = f"{self.base}/data"

    def key(self, path: str) -> str:
        return path.rpartition("/")[2]


@pytest.fixture
def server(monkeypatch):
    for var in ("no_proxy", "NO_PROXY"):  # a configured HTTP proxy must not intercept 127.0.0.1
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    with ShardServer() as srv:
        yield srv


@pytest.fixture
def sleeps():
    """Recorded backoff sleeps; passed as `sleep=` so no test really waits."""
    return []


def fetch(server, data_dir, num_shards, sleeps, **kw):
    kw = {"base_url": server.url, "progress": False, "sleep": sleeps.append, **kw}
    return download_shards(num_shards, data_dir, **kw)


def leftovers(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if p.name.endswith(".tmp"))


def assert_shard_ok(data_dir: Path, index: int) -> None:
    path = data_dir / shard_name(index)
    check_parquet(path)
    assert path.read_bytes() == shard_bytes(index)


# ----------------------------------------------------------------------------- happy path


def test_downloads_shards_plus_val(server, tmp_path, sleeps):
    paths = fetch(server, tmp_path, 3, sleeps, workers=3)
    names = [shard_name(i) for i in (0, 1, 2, CLIMBMIX_VAL)]
    assert [p.name for p in paths] == names
    assert all(p.parent == tmp_path for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    for i in (0, 1, 2, CLIMBMIX_VAL):
        assert_shard_ok(tmp_path, i)
    assert server.hits == Counter(names)
    assert sleeps == []


def test_downloads_in_parallel(server, tmp_path, sleeps):
    server.barrier = threading.Barrier(2)  # each request waits for a second one in flight
    fetch(server, tmp_path, 3, sleeps, workers=2, retries=1)
    for i in (0, 1, 2, CLIMBMIX_VAL):
        assert_shard_ok(tmp_path, i)


def test_base_url_prefix_is_kept(server, tmp_path, sleeps):
    fetch(server, tmp_path, 1, sleeps, base_url=server.url + "/")
    assert_shard_ok(tmp_path, 0)
    with pytest.raises(DownloadError, match="404"):
        fetch(server, tmp_path / "other", 1, sleeps, base_url=server.url.removesuffix("/data") + "/elsewhere")


def test_fineweb_edu_val_is_its_last_shard(server, tmp_path, sleeps):
    paths = fetch(server, tmp_path, 2, sleeps, dataset="fineweb-edu")
    assert [p.name for p in paths] == [shard_name(i) for i in (0, 1, FINEWEB_VAL)]
    assert_shard_ok(tmp_path, FINEWEB_VAL)


def test_progress_bar_counts_shards(server, tmp_path, sleeps, capsys):
    fetch(server, tmp_path, 2, sleeps, progress=True)
    assert "3/3" in capsys.readouterr().err
    fetch(server, tmp_path, 2, sleeps, progress=False)
    assert capsys.readouterr().err == ""


def test_urls_indices_and_default_dir(monkeypatch, tmp_path):
    assert shard_url(5) == (
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_00005.parquet"
    )
    assert shard_url(7, "fineweb-edu") == (
        "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00007.parquet"
    )
    assert DATASETS["climbmix"].base_url + "/shard_00005.parquet" == shard_url(5)
    assert DATASETS["climbmix"].max_shard == CLIMBMIX_VAL
    assert shard_url(3, base_url="http://h/p/") == "http://h/p/shard_00003.parquet"
    assert shard_indices(3) == [0, 1, 2, CLIMBMIX_VAL]
    assert shard_indices(3, "fineweb-edu") == [0, 1, 2, FINEWEB_VAL]
    assert shard_indices(-1) == list(range(CLIMBMIX_VAL + 1))
    assert shard_indices(10**6, "fineweb-edu") == list(range(FINEWEB_VAL + 1))
    with pytest.raises(ValueError, match="unknown dataset"):
        shard_indices(1, "c4")
    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "base_data_climbmix"
    monkeypatch.delenv("NANOCHAT_JAX_HOME")
    assert default_data_dir() == Path.home() / ".cache" / "nanochat-jax" / "base_data_climbmix"


def test_default_data_dir_is_used(server, tmp_path, sleeps, monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(tmp_path))
    fetch(server, None, 1, sleeps)
    assert_shard_ok(tmp_path / "base_data_climbmix", 0)
    assert_shard_ok(tmp_path / "base_data_climbmix", CLIMBMIX_VAL)


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize("kind", ["drop", "500"])
def test_transient_failure_is_retried(server, tmp_path, sleeps, kind):
    server.fail(shard_name(1), kind, times=1)
    fetch(server, tmp_path, 3, sleeps, backoff=2.0)
    assert server.hits[shard_name(1)] == 2
    assert sleeps == [2.0]
    for i in (0, 1, 2, CLIMBMIX_VAL):
        assert_shard_ok(tmp_path, i)
    assert leftovers(tmp_path) == []


def test_always_dropping_shard_fails_and_keeps_the_others(server, tmp_path, sleeps):
    server.fail(shard_name(1), "drop")
    with pytest.raises(DownloadError, match=r"shard_00001\.parquet.*3 attempt.*connection dropped"):
        fetch(server, tmp_path, 3, sleeps, retries=3, backoff=3.0)
    assert server.hits[shard_name(1)] == 3
    assert sleeps == [3.0, 9.0]
    assert not (tmp_path / shard_name(1)).exists()
    assert leftovers(tmp_path) == []
    for i in (0, 2, CLIMBMIX_VAL):
        assert_shard_ok(tmp_path, i)


def test_short_body_with_valid_parquet_is_rejected_by_content_length(server, tmp_path, sleeps):
    server.fail(shard_name(0), "overlong")  # the body alone would pass the parquet check
    n = len(shard_bytes(0))
    with pytest.raises(DownloadError, match=rf"shard_00000\.parquet.*got {n} of {n + 100} bytes"):
        fetch(server, tmp_path, 1, sleeps, retries=2)
    assert not (tmp_path / shard_name(0)).exists()
    assert leftovers(tmp_path) == []


BAD_PAYLOADS = {
    "corrupt": ("corrupt", None),
    "partial-206": ("partial", None),
    "no-text-column": (None, parquet_bytes(pa.table({"content": ["a", "b"]}))),
    "int-text-column": (None, parquet_bytes(pa.table({"text": [1, 2]}))),
}


@pytest.mark.parametrize("case", sorted(BAD_PAYLOADS))
def test_invalid_payload_is_never_kept(server, tmp_path, sleeps, case):
    fault, body = BAD_PAYLOADS[case]
    if fault:
        server.fail(shard_name(2), fault)
    else:
        server.routes["/data/" + shard_name(2)] = body
    with pytest.raises(DownloadError, match=r"shard_00002\.parquet.*2 attempt"):
        fetch(server, tmp_path, 3, sleeps, retries=2)
    assert server.hits[shard_name(2)] == 2
    assert not (tmp_path / shard_name(2)).exists()
    assert leftovers(tmp_path) == []
    assert_shard_ok(tmp_path, 1)


def test_404_fails_fast_with_clear_error(server, tmp_path, sleeps):
    del server.routes["/data/" + shard_name(3)]
    with pytest.raises(DownloadError, match=r"shard_00003\.parquet.*1 attempt.*404"):
        fetch(server, tmp_path, 4, sleeps)
    assert server.hits[shard_name(3)] == 1
    assert sleeps == []
    assert not (tmp_path / shard_name(3)).exists()
    assert_shard_ok(tmp_path, 2)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_rerun_fetches_only_missing_or_damaged(server, tmp_path, sleeps, damage):
    fetch(server, tmp_path, 2, sleeps)
    good = shard_bytes(1)
    (tmp_path / shard_name(1)).write_bytes(b"garbage" if damage == "garbage" else good[: len(good) // 2])
    for stale in ("shard_00000.parquet.abc.tmp", "shard_00002.parquet.tmp", "shard_00002.parquet.123.tmp"):
        (tmp_path / stale).write_bytes(b"partial")
    server.hits.clear()
    fetch(server, tmp_path, 3, sleeps)
    assert server.hits == Counter([shard_name(1), shard_name(2)])
    for i in (0, 1, 2, CLIMBMIX_VAL):
        assert_shard_ok(tmp_path, i)
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- reading


def test_list_shards_and_iter_texts(server, tmp_path, sleeps):
    fetch(server, tmp_path, 3, sleeps)
    (tmp_path / "shard_00009.parquet.abc.tmp").write_bytes(b"in flight")
    train, val = list_shards(tmp_path)
    assert [p.name for p in train] == [shard_name(i) for i in (0, 1, 2)]
    assert val.name == shard_name(CLIMBMIX_VAL)
    batches = list(iter_texts(train))
    assert batches == [docs(i)[k : k + ROW_GROUP] for i in (0, 1, 2) for k in range(0, DOCS, ROW_GROUP)]
    strided = list(iter_texts(train, start=1, step=2))  # row groups 1 and 3 of each file
    assert strided == [docs(i)[rg * ROW_GROUP : (rg + 1) * ROW_GROUP] for i in (0, 1, 2) for rg in (1, 3)]
    assert list(iter_texts([val], start=4, step=5)) == [docs(CLIMBMIX_VAL)[8:10]]
    with pytest.raises(ValueError, match="step"):
        next(iter_texts(train, step=0))


def test_list_shards_needs_two_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="at least 2.*found 0"):
        list_shards(tmp_path / "missing")
    (tmp_path / shard_name(0)).write_bytes(shard_bytes(0))
    (tmp_path / "shard_00001.parquet.x.tmp").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="at least 2.*found 1"):
        list_shards(tmp_path)


# ----------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
    cmd = [sys.executable, "-m", "nanochat_jax.data.dataset", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_cli_downloads(server, tmp_path):
    res = run_cli("-n", "2", "-w", "2", "--data-dir", str(tmp_path), "--base-url", server.url)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard_name(i) for i in (0, 1, CLIMBMIX_VAL)]
    for i in (0, 1, CLIMBMIX_VAL):
        assert_shard_ok(tmp_path, i)
    res = run_cli("-n", "1", "--dataset", "fineweb-edu", "--data-dir", str(tmp_path / "fw"), "--base-url", server.url)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "fw").iterdir()) == [shard_name(i) for i in (0, FINEWEB_VAL)]


def test_cli_reports_failure(server, tmp_path):
    del server.routes["/data/" + shard_name(0)]
    res = run_cli("-n", "1", "--data-dir", str(tmp_path), "--base-url", server.url)
    assert res.returncode == 1
    assert "shard_00000.parquet" in res.stderr and "404" in res.stderr
    assert_shard_ok(tmp_path, CLIMBMIX_VAL)
