"""The one HTTP downloader: pretraining shards, task datasets and the CORE bundle all come through here.

A URL streams to a unique temp name beside its destination, is checked (Content-Length, the
size and sha256 when known, the caller's `check`), fsynced and renamed into place: a file at
the final path is always complete, and a failed download leaves nothing. A cut transfer is
resumed with HTTP Range (or restarted when the server ignores Range). One retry rule: transient
failures wait backoff**attempt seconds; other 4xx fail at once. DownloadError is one line.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

from tqdm import tqdm

CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """A URL could not be fetched and verified within its attempts."""


def _retryable(exc: Exception) -> bool:
    """A client error (404, 403, ...) will not go away by asking again; timeouts and throttling may."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    return True


def _transfer(url: str, tmp: Path, timeout: float, bar: tqdm) -> None:
    """One request: append to `tmp` from its current size if the server honours Range, else rewrite it.

    Raises, keeping what arrived, when the body ends before its Content-Length.
    """
    have = tmp.stat().st_size if tmp.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resumed = have > 0 and resp.status == 206 and (resp.headers.get("Content-Range") or "").startswith(
            f"bytes {have}-")
        if resp.status != 200 and not resumed:
            raise DownloadError(f"HTTP {resp.status} (expected 200)")
        start = have if resumed else 0
        length = resp.headers.get("Content-Length")
        expected = start + int(length) if length is not None else None
        bar.reset(total=expected)
        bar.update(start)
        with open(tmp, "ab" if resumed else "wb") as f:
            while chunk := resp.read(CHUNK_BYTES):
                bar.update(f.write(chunk))
            received = f.tell()
            f.flush()
            os.fsync(f.fileno())
    if expected is not None and received != expected:
        raise DownloadError(f"connection dropped: got {received} of {expected} bytes")


def _verify(tmp: Path, size: int | None, sha256: str | None, check: Callable[[Path], None] | None) -> None:
    if size is not None and tmp.stat().st_size != size:
        raise DownloadError(f"size {tmp.stat().st_size} bytes, expected {size}")
    if sha256 is not None:
        with open(tmp, "rb") as f:
            got = hashlib.file_digest(f, "sha256").hexdigest()
        if got != sha256.lower():
            raise DownloadError(f"sha256 {got}, expected {sha256}")
    if check is not None:
        check(tmp)


def download(
    url: str,
    path: str | os.PathLike,
    *,
    check: Callable[[Path], None] | None = None,
    size: int | None = None,
    sha256: str | None = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Fetch `url` to `path` (see the module docstring); returns `path` or raises DownloadError.

    `check` raises on a bad file; `progress` shows a byte bar on a terminal; `sleep` is
    injectable so tests do not wait out the backoff.
    """
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tqdm(unit="B", unit_scale=True, desc=path.name, file=sys.stderr, leave=False,
                  disable=None if progress else True) as bar:
            for attempt in range(1, retries + 1):
                try:
                    _transfer(url, tmp, timeout, bar)
                    try:
                        _verify(tmp, size, sha256, check)
                    except Exception:
                        tmp.unlink()  # a complete body that is wrong: the next attempt starts over
                        raise
                    os.replace(tmp, path)
                    return path
                except Exception as exc:  # any failure of one attempt is a reason to retry
                    if attempt == retries or not _retryable(exc):
                        raise DownloadError(
                            f"{path.name}: failed after {attempt} attempt(s) from {url}: {exc}"
                        ) from exc
                sleep(backoff**attempt)
    finally:
        tmp.unlink(missing_ok=True)
