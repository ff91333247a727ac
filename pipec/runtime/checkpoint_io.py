"""Reading a checkpoint directory safely: its manifest, and files checked against it.

Phase: stage runtime (checkpoints; no communication). Every read goes through
the manifest: a file is used only if its sha256 matches the one the manifest
records, tensors come from safetensors and the rest from JSON. Each problem
is a :class:`CheckpointError` that says what is wrong and what to do. The
layout is described in :mod:`pipec.runtime.checkpoint`.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open

from pipec._files import sha256_file
from pipec.errors import CheckpointError
from pipec.runtime.checkpoint_state import fsync_path
from pipec.types import FrozenModel

CHECKPOINT_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_FILE = "rng.safetensors"
RNG_JSON = "rng.json"
SCHEDULER_JSON = "scheduler.json"


class RankFiles(FrozenModel):
    """One rank's part: its stages, the tensors in its model file, and each file's sha256."""

    rank: int
    stages: tuple[int, ...]
    tensors: tuple[str, ...]
    files: dict[str, str]


class LossScaleState(FrozenModel):
    """The float16 loss scaler's state (:class:`pipec.runtime.amp.LossScaler`)."""

    scale: float
    growth_tracker: int


class CheckpointManifest(FrozenModel):
    """``manifest.json``: present only when the checkpoint is complete."""

    format_version: int = CHECKPOINT_FORMAT_VERSION
    step: int
    num_ranks: int
    num_stages: int
    plan_fingerprint: str
    model_name: str
    saved_at: float  # seconds since the epoch
    ranks: tuple[RankFiles, ...]
    # the plan's precision, and the fp16 loss scaler's state (the same on every rank;
    # None when the run did not scale): older checkpoints are fp32 without a scaler
    precision: str = "fp32"
    loss_scale: LossScaleState | None = None
    # the runtime's seed: random ops of step k draw from (seed, k, ...), so a resumed run
    # needs it to repeat them (None: a checkpoint written before it was recorded)
    seed: int | None = None


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename, flushed to disk."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def _complete(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.name.startswith("step_") and (d / MANIFEST).is_file())


def resolve_checkpoint(directory: Path) -> Path:
    """The checkpoint ``directory`` stands for: itself when it holds a manifest,
    else the one its ``latest`` file names."""
    if (directory / MANIFEST).is_file():
        return directory
    latest = directory / LATEST
    if directory.is_dir() and any(d.name.startswith("rank") for d in directory.iterdir()):
        raise CheckpointError(
            f"{directory} holds no {MANIFEST}: the checkpoint is incomplete (its save was interrupted); "
            f"load the previous one (the parent directory's {LATEST} names it)"
        )
    if not latest.is_file():
        found = _complete(directory)
        hint = f" (complete ones there: {found[-3:]}; pass one of them)" if found else ""
        raise CheckpointError(
            f"no checkpoint in {directory}: expected {latest} (written by save_checkpoint) or a "
            f"{MANIFEST}{hint}; save one first (pipe.save_checkpoint, or `pipec run DIR "
            "--checkpoint-every K`), or start without --resume"
        )
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{latest} is unreadable ({exc}); delete it and pass a step_* directory") from None
    path = directory / name
    if not name or Path(name).name != name or not (path / MANIFEST).is_file():
        found = _complete(directory)
        raise CheckpointError(
            f"{latest} names {name!r}, which is not a complete checkpoint (no {MANIFEST}); "
            f"pass a complete step_* directory instead{f', e.g. {directory / found[-1]}' if found else ''}"
        )
    return path


def read_manifest(path: Path) -> CheckpointManifest:
    file = path / MANIFEST
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} holds no {MANIFEST}: the checkpoint is incomplete (its save "
                              "was interrupted); load the previous one") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is corrupt ({exc}); load an older checkpoint or save a new one") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format_version {version!r}, this pipec reads {CHECKPOINT_FORMAT_VERSION}; "
            "load it with the pipec version that wrote it"
        )
    try:
        manifest = CheckpointManifest.model_validate(raw)
    except ValidationError as exc:
        first = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        raise CheckpointError(f"{file} is not a valid manifest ({first}); load an older checkpoint") from None
    if sorted(e.rank for e in manifest.ranks) != list(range(manifest.num_ranks)):
        raise CheckpointError(f"{file} lists ranks {[e.rank for e in manifest.ranks]} for "
                              f"{manifest.num_ranks} ranks; the checkpoint is corrupt, load an older one")
    return manifest


def _checked(path: Path, entry: RankFiles, name: str) -> Path:
    file = path / f"rank{entry.rank}" / name
    expected = entry.files.get(name)
    if expected is None:
        raise CheckpointError(f"the manifest of {path} lists no {name} for rank {entry.rank}; "
                              "the checkpoint was saved without it")
    try:
        found = sha256_file(file)
    except OSError as exc:
        raise CheckpointError(f"{file} is missing or unreadable ({exc}); load an older checkpoint") from None
    if found != expected:
        raise CheckpointError(
            f"{file} does not match its checksum in {path / MANIFEST} (corrupt or modified); "
            "load an older checkpoint or save a new one"
        )
    return file


def read_tensors(
    path: Path, entry: RankFiles, name: str, names: Sequence[str] | None = None,
    keep: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors ``names`` (default: all, or those whose name ``keep`` accepts) of rank
    ``entry.rank``'s file ``name``, checksum verified."""
    file = _checked(path, entry, name)
    try:
        with safe_open(str(file), framework="pt") as f:
            stored: list[str] = list(f.keys())
            keys = [k for k in stored if keep is None or keep(k)] if names is None else list(names)
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, KeyError) as exc:
        raise CheckpointError(f"{file} cannot be read ({exc}); load an older checkpoint") from None


def read_json(path: Path, entry: RankFiles, name: str) -> Any:
    file = _checked(path, entry, name)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} cannot be read ({exc}); load an older checkpoint") from None
