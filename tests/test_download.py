"""The one downloader's guarantees against a 127.0.0.1 server that honours Range and can cut transfers short."""

import hashlib

import pytest
from fault_server import FaultServer

from nanochat_jax.download import DownloadError, download

BODY = bytes(range(256)) * 400  # 100 KiB


class RangeServer(FaultServer):
    """BODY at /f, resumable from any byte unless `ranges=False`; srv.queue = ["cut:N", ...] cuts transfers."""

    def __init__(self, ranges: bool = True):
        super().__init__()
        self.routes, self.honour_range, self.url = {"/f": BODY}, ranges, f"{self.base}/f"


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("no_proxy", "NO_PROXY"):  # a configured HTTP proxy must not intercept 127.0.0.1
        monkeypatch.setenv(var, "127.0.0.1,localhost")


def fetch(srv, path, sleeps, **kw):
    return download(srv.url, path, progress=False, sleep=sleeps.append, **kw)


def test_interrupted_transfer_resumes_with_range(tmp_path):
    sleeps = []
    with RangeServer() as srv:
        srv.queue = ["cut:30000", "cut:20000"]
        assert fetch(srv, tmp_path / "f", sleeps, sha256=hashlib.sha256(BODY).hexdigest()) == tmp_path / "f"
    assert (tmp_path / "f").read_bytes() == BODY
    assert srv.ranges == [None, "bytes=30000-", "bytes=50000-"]
    assert sleeps == [2.0, 4.0]
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_server_without_range_support_restarts(tmp_path):
    with RangeServer(ranges=False) as srv:
        srv.queue = ["cut:30000"]
        fetch(srv, tmp_path / "f", [], size=len(BODY))
    assert (tmp_path / "f").read_bytes() == BODY
    assert srv.ranges == [None, "bytes=30000-"]  # asked to resume, got the whole file, started over


def test_never_a_partial_file_at_the_final_path(tmp_path):
    seen = []

    def check(tmp):  # runs on the complete temp file, before the rename
        seen.append(((tmp_path / "f").exists(), tmp.stat().st_size))

    with RangeServer() as srv:
        srv.queue = ["cut:10000"] * 3
        with pytest.raises(DownloadError, match=r"^f: failed after 3 attempt\(s\) from http://127\.0\.0\.1:\d+/f: "
                                                r"connection dropped: got 30000 of 102400 bytes$"):
            fetch(srv, tmp_path / "f", [], retries=3, check=check)
        assert seen == [] and list(tmp_path.iterdir()) == []
        fetch(srv, tmp_path / "f", [], check=check)
    assert seen == [(False, len(BODY))]


def test_bad_checksum_or_check_is_retried_then_leaves_no_file(tmp_path):
    sleeps = []
    with RangeServer() as srv:
        with pytest.raises(DownloadError, match=r"2 attempt.*sha256 [0-9a-f]{64}, expected 00"):
            fetch(srv, tmp_path / "f", sleeps, retries=2, backoff=3.0, sha256="00" * 32)
        assert srv.ranges == [None, None]  # a wrong complete file is fetched again from the start
        assert sleeps == [3.0] and list(tmp_path.iterdir()) == []
        with pytest.raises(DownloadError, match=r"1 attempt.*size 102400 bytes, expected 5"):
            fetch(srv, tmp_path / "f", [], retries=1, size=5)

        def check(tmp):
            raise ValueError("not a parquet file")

        with pytest.raises(DownloadError, match="not a parquet file"):
            fetch(srv, tmp_path / "f", [], retries=2, check=check)
    assert list(tmp_path.iterdir()) == []


def test_retries_exhausted_and_client_errors(tmp_path):
    sleeps = []
    with pytest.raises(DownloadError, match=r"failed after 3 attempt\(s\) from http://127\.0\.0\.1:9/x"):
        download("http://127.0.0.1:9/x", tmp_path / "x", retries=3, progress=False, sleep=sleeps.append)
    assert sleeps == [2.0, 4.0] and list(tmp_path.iterdir()) == []
    with RangeServer() as srv:  # a 404 will not go away by asking again
        with pytest.raises(DownloadError, match=r"^y: failed after 1 attempt\(s\) from .*/nope: HTTP Error 404"):
            download(srv.url.replace("/f", "/nope"), tmp_path / "y", progress=False, sleep=sleeps.append)
    assert sleeps == [2.0, 4.0]
    with pytest.raises(ValueError, match="retries"):
        download("http://127.0.0.1:9/x", tmp_path / "x", retries=0)
