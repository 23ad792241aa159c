"""Small helpers shared by several test modules."""

import io
import tarfile
from pathlib import Path


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
