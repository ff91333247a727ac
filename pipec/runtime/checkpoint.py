"""Checkpoints of a running pipeline: every rank's tensors, optimizer and RNG state, written atomically.

Phase: stage runtime. ``pipe.save_checkpoint(dir, optimizer=..., step=k)`` is
collective; ``pipe.load_checkpoint(dir, optimizer=...)`` is per rank and
returns ``k``. Layout::

    dir/latest                        the name of the newest complete checkpoint
    dir/step_<k>/manifest.json        written LAST, by rank 0 (CheckpointManifest)
    dir/step_<k>/rank<r>/model.safetensors      rank r's parameters and buffers, original FQNs
                         optimizer.safetensors  + optimizer.json  (optional, see checkpoint_state)
                         rng.safetensors        + rng.json

Atomicity: each rank writes into ``step_<k>/.rank<r>.tmp-*`` and renames it to
``rank<r>`` when its files are complete and flushed; once every rank has
(agreed through the c10d store), rank 0 writes ``manifest.json`` -- ranks,
step, the plan's fingerprint, the sha256 of every file -- and then replaces
``latest`` by a rename. A crash at any point before that leaves ``latest``
naming the previous checkpoint; a directory without a manifest is incomplete
and never loaded. Several nodes need a shared file system.

With D replicas of the pipeline (``data_parallel``) each stage is written once,
by replica 0's rank (``rank<r>`` is then pipeline rank ``r``; the other
replicas hold equal tensors and only take part in the agreement), so a
checkpoint loads into any D -- every replica reads the same files -- and, as
above, into any number of stages.

Parameters are stored under their original FQNs, so a checkpoint loads into a
plan of the same model with any number of stages or ranks, and
:func:`merge_checkpoint` gives the full state dict of the original model.
Optimizer state is keyed by parameter FQN: in the same layout each rank reads
its own file; in another (another number of stages, ranks or replicas) each
rank picks its parameters' state out of whichever ranks saved them, so Adam's
moments follow their parameters into any plan of the same model. The
LR-scheduler's state (``scheduler=``) is the same on every rank and loads
anywhere. The runtime's ``seed`` is in the manifest, so a resumed run draws
the same random numbers (dropout) as an uninterrupted one. RNG state of the
global generators is per rank, restored only into the same layout.
The manifest also records the plan's precision and the fp16 loss scale
(restored on load); loading a checkpoint of another precision warns
(parameters are float32 in every precision).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from pipec._files import sha256_file
from pipec.errors import CheckpointError
from pipec.facade import Plan
from pipec.runtime.amp import LossScaler
from pipec.runtime.checkpoint_io import (
    MANIFEST,
    MODEL_FILE,
    OPTIMIZER_FILE,
    OPTIMIZER_JSON,
    RNG_FILE,
    RNG_JSON,
    SCHEDULER_JSON,
    CheckpointManifest,
    LossScaleState,
    RankFiles,
    read_json,
    read_manifest,
    read_tensors,
    resolve_checkpoint,
    write_atomically,
)
from pipec.runtime.checkpoint_state import (
    fsync_path,
    optimizer_from_files,
    optimizer_from_parts,
    optimizer_to_files,
    rng_from_files,
    rng_to_files,
    scheduler_from_json,
    scheduler_to_json,
)

if TYPE_CHECKING:
    from pipec.runtime.store import BoundedStore
    from pipec.runtime.waiting import Waiter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankView:
    """What a checkpoint needs of one rank's runtime."""

    rank: int
    world_size: int
    plan: Plan
    stages: tuple[int, ...]
    tensors: Mapping[str, torch.Tensor]  # canonical FQN -> tensor sharing the parameter's storage
    param_names: Mapping[int, str]  # id(parameter) -> FQN
    store: BoundedStore | None  # the runtime's prefixed c10d store; None in a one-process run
    waiter: Waiter
    save_index: int  # checkpoints this runtime saved before: keeps store keys apart
    # with D replicas: the pipeline rank whose files these are, the pipeline's ranks, and
    # whether this rank writes them (replica 0 does; the others' tensors are equal)
    file_rank: int = -1  # -1: ``rank``
    num_ranks: int = 0  # 0: ``world_size``
    writes: bool = True
    seed: int | None = None  # the runtime's seed, recorded in the manifest

    @property
    def own_rank(self) -> int:
        """The rank this view's files are saved and looked up under (its pipeline rank)."""
        return self.rank if self.file_rank < 0 else self.file_rank

    @property
    def pipeline_ranks(self) -> int:
        """How many ranks write a checkpoint: one per pipeline rank."""
        return self.world_size if self.num_ranks <= 0 else self.num_ranks
    scaler: LossScaler | None = None  # the fp16 loss scaler: its scale is saved and restored


def plan_fingerprint(plan: Plan) -> str:
    """sha256 of the plan as plan.json holds it, without where it came from."""
    text = plan.data.model_dump_json(exclude={"factory", "candidates", "chosen"})
    return hashlib.sha256(text.encode()).hexdigest()


# -- saving ---------------------------------------------------------------------------------


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.data_ptr() in seen and t.numel():  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        out[name] = t
    return out


def _write_rank(step_dir: Path, view: RankView, optimizer: torch.optim.Optimizer | None,
                scheduler: Any = None) -> RankFiles:
    model = _cpu_tensors(view.tensors)
    rng_tensors, rng_meta = rng_to_files()
    tmp = step_dir / f".rank{view.own_rank}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save_file(model, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        save_file(rng_tensors, str(tmp / RNG_FILE), metadata={"format": "pt"})
        (tmp / RNG_JSON).write_text(json.dumps(rng_meta), encoding="utf-8")
        if optimizer is not None:
            opt_tensors, opt_meta = optimizer_to_files(optimizer, view.param_names)
            save_file(opt_tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
            (tmp / OPTIMIZER_JSON).write_text(json.dumps(opt_meta), encoding="utf-8")
        if scheduler is not None:
            (tmp / SCHEDULER_JSON).write_text(json.dumps(scheduler_to_json(scheduler)), encoding="utf-8")
        files = {}
        for f in sorted(tmp.iterdir()):
            fsync_path(f)
            files[f.name] = sha256_file(f)
        fsync_path(tmp)
        tmp.rename(step_dir / f"rank{view.own_rank}")
        fsync_path(step_dir)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"rank {view.rank} could not write its checkpoint to {step_dir}: {exc}; check the free "
            "space and permissions there, then save again"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RankFiles(rank=view.own_rank, stages=view.stages, tensors=tuple(model), files=files)


def _fresh_name(root: Path, step: int) -> str:
    name = f"step_{step:08d}"
    n = 0
    while (root / name).exists():
        n += 1
        name = f"step_{step:08d}.{n}"
    return name


def _collect_garbage(root: Path, keep: int, current: str) -> None:
    """Delete incomplete checkpoints and all but the newest ``keep`` complete ones."""
    complete: list[tuple[float, Path]] = []
    for d in root.iterdir():
        if not d.is_dir() or not d.name.startswith("step_") or d.name == current:
            continue
        if not (d / MANIFEST).is_file():
            shutil.rmtree(d, ignore_errors=True)  # a save that crashed before its manifest
            continue
        try:
            complete.append((read_manifest(d).saved_at, d))
        except CheckpointError:
            continue  # unreadable: leave it for a person to look at
    complete.sort()
    for _, d in complete[: max(0, len(complete) - (keep - 1))]:
        shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(
    view: RankView,
    directory: str | os.PathLike[str],
    *,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    keep: int | None = None,
    scheduler: Any = None,
) -> Path:
    """Write this rank's part of checkpoint ``step`` under ``directory`` (every rank calls
    it); returns the checkpoint's directory once it is complete on every rank."""
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep: expected None or a number of checkpoints >= 1, found {keep}")
    root = Path(directory)
    store, prefix = view.store, f"ckpt/{view.save_index}/"
    others = [r for r in range(view.world_size) if r != view.rank]
    if view.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            name = _fresh_name(root, step)
            (root / name).mkdir()
        except OSError as exc:
            raise CheckpointError(f"cannot create a checkpoint in {root}: {exc}; choose a writable directory") from exc
        if store is not None:
            store.set(prefix + "name", name)
    elif store is None:
        raise CheckpointError(f"rank {view.rank}: saving a checkpoint on several ranks needs the c10d store")
    else:
        view.waiter.poll(lambda: store.check([prefix + "name"]), "waiting for rank 0 to start the checkpoint", [0])
        name = store.get(prefix + "name").decode()
    step_dir = root / name
    if store is None:
        entries = [_write_rank(step_dir, view, optimizer, scheduler)]
    else:
        if view.writes:  # one replica writes each pipeline rank's files
            files = _write_rank(step_dir, view, optimizer, scheduler)
            store.set(prefix + f"rank/{view.own_rank}", files.model_dump_json())
            store.add(prefix + "written", 1)
        if view.rank != 0:
            view.waiter.poll(lambda: store.check([prefix + "done"]), "waiting for rank 0 to commit the checkpoint", [0])
            store.add(prefix + "seen", 1)  # rank 0 may host the store: it waits for this before going on
            return step_dir
        view.waiter.poll(lambda: store.add(prefix + "written", 0) >= view.pipeline_ranks,
                         "waiting for every rank to write its checkpoint files", others)
        entries = [RankFiles.model_validate_json(store.get(prefix + f"rank/{r}")) for r in range(view.pipeline_ranks)]
    manifest = CheckpointManifest(
        step=step, num_ranks=view.pipeline_ranks, num_stages=view.plan.num_stages,
        plan_fingerprint=plan_fingerprint(view.plan), model_name=view.plan.data.model_name,
        saved_at=time.time(), ranks=tuple(entries), precision=view.plan.data.precision,
        loss_scale=_scaler_state(view.scaler), seed=view.seed,
    )
    try:
        write_atomically(step_dir / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
        write_atomically(root / "latest", name + "\n")
        if keep is not None:
            _collect_garbage(root, keep, name)
    except OSError as exc:
        raise CheckpointError(f"rank 0 could not commit the checkpoint {step_dir}: {exc}; save again") from exc
    if store is not None:
        store.set(prefix + "done", name)
        view.waiter.poll(lambda: store.add(prefix + "seen", 0) >= view.world_size - 1,
                         "waiting for every rank to see the checkpoint committed", others)
    log.info("checkpoint of step %d written to %s", step, step_dir)
    return step_dir


def _scaler_state(scaler: LossScaler | None) -> LossScaleState | None:
    if scaler is None or not scaler.enabled:
        return None
    return LossScaleState(scale=scaler.scale, growth_tracker=scaler.growth_tracker)


# -- loading --------------------------------------------------------------------------------


def _restore_scaler(view: RankView, manifest: CheckpointManifest, path: Path) -> None:
    """Restore the loss scale; warn when the checkpoint ran in another precision.

    Parameters are float32 master weights under every precision, so they load
    whatever the precision (a bf16 run resumed in fp32, or fine-tuned in fp16,
    is legitimate); only the loss scale has no meaning across precisions: a
    run that scales and a checkpoint without a scale start from the initial scale."""
    precision = view.plan.data.precision
    if manifest.precision != precision:
        warnings.warn(
            f"the checkpoint in {path} was saved by a {manifest.precision} run and this plan runs in "
            f"{precision}: its float32 parameters (and optimizer state) load as they are, but the "
            f"losses will not continue the saved run's exactly"
            + (", and the loss scale starts afresh" if view.scaler is not None and view.scaler.enabled else "")
            + f"; re-partition with precision={manifest.precision!r} to resume the same run",
            UserWarning, stacklevel=4,
        )
    if view.scaler is not None and view.scaler.enabled and manifest.loss_scale is not None:
        view.scaler.load_state_dict(manifest.loss_scale.model_dump())


def load_checkpoint(
    view: RankView, directory: str | os.PathLike[str], *, optimizer: torch.optim.Optimizer | None,
    scheduler: Any = None,
) -> CheckpointManifest:
    """Load this rank's tensors (and optimizer, LR-scheduler and RNG state) from the
    checkpoint in ``directory`` (its ``latest``, or a ``step_<k>`` directory); returns
    its manifest (``step``, ``seed``)."""
    path = resolve_checkpoint(Path(directory))
    manifest = read_manifest(path)
    own = next((e for e in manifest.ranks if e.rank == view.own_rank), None)
    same_layout = (
        manifest.num_ranks == view.pipeline_ranks and own is not None and set(own.tensors) == set(view.tensors)
    )
    if manifest.plan_fingerprint != plan_fingerprint(view.plan):
        log.info("checkpoint %s comes from another plan; matching its tensors by FQN", path)
    where: dict[str, RankFiles] = {}
    for entry in ([own] if own is not None else []) + list(manifest.ranks):
        for name in entry.tensors:
            where.setdefault(name, entry)
    missing = sorted(set(view.tensors) - set(where))
    if missing:
        raise CheckpointError(
            f"the checkpoint in {path} (model {manifest.model_name!r}) lacks {len(missing)} tensor(s) of "
            f"rank {view.rank}'s stages, e.g. {missing[:5]}: it was saved from another model; load a "
            "checkpoint of this model, or start without it (no --resume)"
        )
    wanted: dict[int, list[str]] = {}
    for name in view.tensors:
        wanted.setdefault(where[name].rank, []).append(name)
    entries = {e.rank: e for e in manifest.ranks}
    values: dict[str, torch.Tensor] = {}
    for rank, names in wanted.items():
        values.update(read_tensors(path, entries[rank], MODEL_FILE, names))
    for name, value in values.items():
        target = view.tensors[name]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(value.shape)} in the checkpoint {path} but "
                f"{tuple(target.shape)} here: it was saved from another model; load a checkpoint of this model"
            )
    if optimizer is not None:
        _load_optimizer(view, path, manifest, optimizer, own if same_layout else None)
    if scheduler is not None:
        source = own if own is not None and SCHEDULER_JSON in own.files else manifest.ranks[0]
        if SCHEDULER_JSON not in source.files:
            raise CheckpointError(
                f"the checkpoint in {path} holds no LR-scheduler state (it was saved without scheduler=); "
                "load it without scheduler="
            )
        scheduler_from_json(scheduler, read_json(path, source, SCHEDULER_JSON))
    with torch.no_grad():  # last: a checkpoint that cannot load leaves the parameters as they were
        for name, value in values.items():
            view.tensors[name].copy_(value)
    if own is not None and same_layout:
        rng_from_files(read_tensors(path, own, RNG_FILE), read_json(path, own, RNG_JSON))
    _restore_scaler(view, manifest, path)
    log.info("rank %d loaded checkpoint %s (step %d)", view.rank, path, manifest.step)
    return manifest


def _load_optimizer(
    view: RankView, path: Path, manifest: CheckpointManifest, optimizer: torch.optim.Optimizer,
    own: RankFiles | None,
) -> None:
    """The optimizer state of this rank's parameters: from its own file in the same
    layout, else resharded -- each parameter's state found by FQN in the rank that
    saved it (:func:`~pipec.runtime.checkpoint_state.optimizer_from_parts`)."""
    lacking = [e.rank for e in manifest.ranks if OPTIMIZER_FILE not in e.files]
    if lacking:
        raise CheckpointError(
            f"the checkpoint in {path} holds no optimizer state for rank(s) {lacking} (it was saved "
            "without optimizer=); load it without optimizer="
        )
    if own is not None:
        opt_meta: Any = read_json(path, own, OPTIMIZER_JSON)
        optimizer_from_files(optimizer, view.param_names, read_tensors(path, own, OPTIMIZER_FILE), opt_meta)
        return
    mine = set(view.param_names.values())
    parts: list[tuple[dict[str, torch.Tensor], Any]] = []
    for entry in manifest.ranks:
        meta: Any = read_json(path, entry, OPTIMIZER_JSON)
        held = mine & set(meta.get("state", {})) if isinstance(meta, dict) else set()

        def keep(key: str, held: set[str] = held) -> bool:
            kind, _, rest = key.partition("/")
            return kind == "group" or (kind == "state" and rest.rpartition("/")[0] in held)

        parts.append((read_tensors(path, entry, OPTIMIZER_FILE, keep=keep), meta))
    log.info("rank %d: optimizer state resharded from %d rank(s) of %s", view.rank, len(parts), path)
    optimizer_from_parts(optimizer, view.param_names, parts)


def merge_checkpoint(directory: str | os.PathLike[str], plan: Plan) -> dict[str, torch.Tensor]:
    """The original model's full state dict from the checkpoint in ``directory``: loads
    into the model ``plan`` was made from with ``strict=True`` (tied names included)."""
    from pipec.errors import PlanError
    from pipec.split import merge_state_dicts

    path = resolve_checkpoint(Path(directory))
    manifest = read_manifest(path)
    parts = [read_tensors(path, entry, MODEL_FILE) for entry in manifest.ranks]
    try:
        return merge_state_dicts(parts, plan=plan)
    except PlanError as exc:
        raise CheckpointError(f"the checkpoint in {path} cannot be merged: {exc}") from exc


__all__ = [
    "CheckpointManifest",
    "RankView",
    "load_checkpoint",
    "merge_checkpoint",
    "plan_fingerprint",
    "read_manifest",
    "resolve_checkpoint",
    "save_checkpoint",
]
