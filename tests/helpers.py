"""Small helpers shared by several test modules."""

import io
import tarfile
from pathlib import Path

import pytest

try:  # the torch reference backend is optional: Python 3.12+ legs and accelerator hosts may lack our pin
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch, the reference backend (pip install -e '.[torch]')")


def write_tarball(path: Path, files: dict[str, str]) -> Path:
    """A .tar.gz at `path` holding `files` (name → text), like the sdists the corpus reads."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def communicate_all(procs, timeout: float) -> list:
    """Each process's (stdout, stderr); any still running when this fails or times out is killed."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
