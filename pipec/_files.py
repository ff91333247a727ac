"""File digests, atomic directories and the check that a directory may be replaced, shared by the phases that write and verify files on disk.

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

from pipec.errors import PlanError


def sha256_file(path: Path) -> str:
    """The sha256 of the file at ``path`` as a hex string, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_replaceable(directory: Path, marker: str, doing: str, what: str) -> None:
    """PlanError unless ``directory`` can take what :func:`atomic_directory` writes: it
    does not exist, is empty, or holds ``marker`` (it is ``what``, e.g. "a pipec plan",
    which the new one replaces). ``doing`` starts the message ("save the plan to")."""
    if directory.exists() and not directory.is_dir():
        raise PlanError(f"cannot {doing} {directory}: it is a file; choose a directory path")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / marker).is_file():
        raise PlanError(
            f"cannot {doing} {directory}: the directory is not empty and holds no {marker}, so it is not "
            f"{what}; choose a new or empty directory"
        )


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
