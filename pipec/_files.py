"""File digests and atomic directories shared by the phases that write and verify files on disk.

Basic-values layer: used by the plan directory's manifest (:mod:`pipec.manifest`,
codegen), by checkpoints (:mod:`pipec.runtime.checkpoint_io`) and by the torch
export (:mod:`pipec.split.torch_export`), so it lives below them all.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: Path) -> str:
    """The sha256 of the file at ``path`` as a hex string, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """Write a directory all at once: yields a fresh temporary directory beside
    ``directory``; when the block ends without an error it takes ``directory``'s
    place (an existing one is moved aside first and deleted after), and on any error
    it is deleted and ``directory`` is left as it was. Readers never see a half-written
    directory. The caller decides beforehand whether ``directory`` may be replaced."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    old: Path | None = None
    try:
        yield tmp
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
            directory.rename(old)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not directory.exists():
            old.rename(directory)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["atomic_directory", "sha256_file"]
