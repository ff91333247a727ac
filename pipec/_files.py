"""File digests shared by the phases that write and verify files on disk.

Basic-values layer: used by the plan directory's manifest (:mod:`pipec.manifest`,
codegen) and by checkpoints (:mod:`pipec.runtime.checkpoint_io`), so it lives
below both.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """The sha256 of the file at ``path`` as a hex string, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["sha256_file"]
