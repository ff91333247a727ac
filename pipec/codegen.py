"""Phase codegen: a plan as a directory of plain files, and back.

``save_plan(data, directory, ...)`` (``plan.save``) writes, atomically -- into a
temporary directory beside the target, renamed into place only when complete::

    plan.json                 PlanData (pydantic, has format_version)
    stage_<k>.py              readable Python: class Stage<k> with the stage's forward
    stage_<k>.safetensors     the stage's tensors under their original FQNs
    schedule.txt              the lowered schedule, one line per rank
    run.py                    a torchrun entry point with an editable training loop
    schedule.svg, report.html the drawings the caller passes (the façade draws them
                              with pipec.viz; ``pipec show`` redraws the report)
    manifest.json             the sha256 of each file above, written last (pipec.manifest)

``load_plan_data(directory)`` (``pipec.load``) checks every file and returns the
plan data; the façade's Plan then takes its stage modules from
``stage_<k>.py`` + safetensors (:func:`load_stage_module`). Checked: the files against
``manifest.json`` (a changed, missing or stray plan file is refused), the plan's
invariants and its schedule (:mod:`pipec.plan_check`), ``schedule.txt``
against the plan's schedule, and each weights file against its stage file --
all before any stage file is imported. Nothing is pickled and nothing from
``plan.json`` is evaluated; ``stage_<k>.py`` *is* code, so a plan directory is
trusted like any script you run, and only as pipec wrote it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pipec._files import atomic_directory, check_replaceable
from pipec._imports import import_file
from pipec.errors import ConfigError, PlanError, ScheduleError
from pipec.manifest import MANIFEST_FILE, manifest_problems, write_manifest
from pipec.plan import FORMAT_VERSION, PlanData
from pipec.plan_check import RERUN as _RERUN
from pipec.plan_check import check_plan_data, check_schedule
from pipec.schedule.backends import default_backend, plan_lowered
from pipec.schedule.ir import Schedule
from pipec.split import GraphStage, StageModule
from pipec.split.files import stage_file, stage_tensor_shapes, weights_file
from pipec.templates.stage import stage_source

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
_TEMPLATES = Path(__file__).parent / "templates"
_import_counter = itertools.count()


# -- saving ---------------------------------------------------------------------------


def save_plan(
    data: PlanData,
    directory: Path,
    *,
    stage_module: Callable[[int], torch.nn.Module],
    source: Path | None = None,
    drawings: Mapping[str, str] | None = None,
) -> Path:
    """Write the plan ``data`` to ``directory`` atomically and return the directory.

    ``stage_module(k)`` gives stage ``k``; a stage that was not built from a
    graph (a loaded plan's) is saved by copying ``stage_<k>.py`` from
    ``source``, the directory it was loaded from. ``drawings`` (file name ->
    text, e.g. ``report.html``) are written beside and recorded in the manifest.
    An existing plan directory is replaced only once the new one is complete;
    a directory that is not a plan (no ``plan.json``) is never overwritten.
    """
    directory = Path(directory)
    check_replaceable(directory, PLAN_FILE, "save the plan to", "a pipec plan")
    with atomic_directory(directory) as tmp:
        _write_files(data, tmp, stage_module, source, dict(drawings or {}))
    log.info("saved plan of %s (%d stages) to %s", data.model_name, data.num_stages, directory)
    return directory


def _write_files(
    data: PlanData,
    out: Path,
    stage_module: Callable[[int], torch.nn.Module],
    source: Path | None,
    drawings: dict[str, str],
) -> None:
    (out / PLAN_FILE).write_text(data.model_dump_json(indent=2) + "\n", encoding="utf-8")
    for index in range(data.num_stages):
        module = stage_module(index)
        if not isinstance(module, StageModule):
            raise PlanError(f"stage {index} is a {type(module).__name__}, not a pipec StageModule")
        (out / stage_file(index)).write_text(_stage_text(data, source, index, module), encoding="utf-8")
        tensors = {name: t.detach().cpu().contiguous() for name, t in _named_tensors(module).items()}
        aliases = json.dumps({k: list(v) for k, v in module.aliases.items()})
        save_file(tensors, str(out / weights_file(index)),
                  metadata={"format": "pt", "pipec_stage": str(index), "pipec_aliases": aliases})
    (out / "schedule.txt").write_text(lowered_schedule(data).to_text(), encoding="utf-8")
    template = (_TEMPLATES / "run.py").read_text(encoding="utf-8")
    (out / "run.py").write_text(template, encoding="utf-8")
    checked = [PLAN_FILE, "schedule.txt"] + [name for k in range(data.num_stages)
                                             for name in (stage_file(k), weights_file(k))]
    reserved = {*checked, "run.py", MANIFEST_FILE}
    for name, text in sorted(drawings.items()):
        if name in reserved or Path(name).name != name:
            raise PlanError(f"save_plan: a drawing may not be called {name!r} (a plan file, or not a plain file name)")
        (out / name).write_text(text, encoding="utf-8")
    write_manifest(out, checked, recorded=("run.py", *sorted(drawings)))


def _stage_text(data: PlanData, source: Path | None, index: int, module: StageModule) -> str:
    """``stage_<index>.py``: generated from the stage graph, or copied from the loaded plan."""
    if isinstance(module, GraphStage):
        return stage_source(module, data)
    if source is None:
        raise PlanError(f"stage {index} has neither a graph nor a source file to save; {_RERUN}")
    return (source / stage_file(index)).read_text(encoding="utf-8")


def _named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = dict(module.named_parameters())
    out.update(module.named_buffers())
    return out


def lowered_schedule(data: PlanData) -> Schedule:
    """The plan's schedule with its communication, as stored when the plan was made
    (what ``schedule.txt`` holds, is simulated and drawn: NCCL's lowering when the
    plan has one, else Gloo's; :func:`pipec.schedule.backends.plan_lowered`)."""
    return plan_lowered(data)


# -- loading ----------------------------------------------------------------------------


def load_plan_data(directory: str | Path, *, verify: bool = True) -> PlanData:
    """The plan data saved in ``directory`` (``pipec.load``); every file is checked
    before it is trusted.

    Checks, before any stage file is imported: each file against
    ``manifest.json`` (``verify=True``), ``plan.json``'s invariants and schedule,
    ``schedule.txt`` against that schedule, each weights file against its stage
    file. Problems that say more (an action missing from the schedule, a tensor
    of the wrong shape) are reported before a bare checksum mismatch.

    ``verify=False`` skips the manifest only -- for files you changed on purpose
    (a stage file you edited): everything else is still checked. Save the
    result to a new directory (``plan.save(NEW)``) to get a verified plan again.

    The plan ``pipec.load`` makes of it has no traced graph (``plan.traced is
    None``); its ``stage_module(k)`` imports ``stage_<k>.py`` and loads its
    weights (:func:`load_stage_module`).
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise PlanError(
            f"pipec.load: expected the path of a plan directory, found {type(directory).__name__}; "
            "pass the directory given to plan.save or `pipec partition -o`"
        )
    if not isinstance(verify, bool):
        raise ConfigError(f"pipec.load: verify must be True or False, found {verify!r}")
    path = Path(directory)
    if not path.is_dir():
        raise PlanError(f"no plan directory at {path}; expected the directory given to plan.save, or {_RERUN}")
    problems = manifest_problems(path) if verify else []
    data = read_plan_data(path)
    check_plan_data(data, path / PLAN_FILE)
    _check_schedule_file(path, data)
    for index in range(data.num_stages):
        expected = stage_tensor_shapes(path, index)
        found = _weights_header(path, index)
        if expected != found:
            missing = sorted(set(expected) - set(found))
            extra = sorted(set(found) - set(expected))
            wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
            detail = "; ".join(
                f"{label} {names[:5]}" for label, names in
                (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if names)
            raise PlanError(f"{path / weights_file(index)} does not match {stage_file(index)}: {detail}; {_RERUN}")
    if problems:
        raise PlanError(
            f"refusing the plan in {path}: {'; '.join(problems)}. A plan directory is code (stage_<k>.py "
            f"is imported) and pipec loads it only as it wrote it ({MANIFEST_FILE} holds each file's "
            f"sha256). Restore the files pipec wrote, or {_RERUN}; to keep files you changed on purpose, "
            "or a plan saved before pipec wrote manifests, save a verified copy with "
            "pipec.load(DIR, verify=False).save(NEW_DIR) (its other checks still run)"
        )
    return data


def _check_schedule_file(directory: Path, data: PlanData) -> None:
    """``schedule.txt`` (the lowered schedule, when present) is valid and lowers ``plan.json``'s."""
    file = directory / "schedule.txt"
    if not file.is_file():
        return  # not read by the runtime (it lowers plan.json's schedule); verify=True reports it missing
    sched = data.schedule
    try:
        lowered = Schedule.from_text(file.read_text(encoding="utf-8"), name=sched.name,
                                     num_stages=sched.num_stages, num_microbatches=sched.num_microbatches,
                                     stages_per_rank=sched.stages_per_rank, placement=sched.placement)
    except (ScheduleError, UnicodeDecodeError) as exc:
        raise PlanError(f"{file} cannot be read as a schedule ({exc}); {_RERUN}") from None
    compute = sched.compute_only().actions
    if lowered.num_ranks != len(compute):
        raise PlanError(f"{file} has {lowered.num_ranks} rank lines, the schedule in {PLAN_FILE} has "
                        f"{len(compute)} ranks; {_RERUN}")
    for rank, (got, want) in enumerate(zip(lowered.compute_only().actions, compute)):
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            found = str(got[at]) if at < len(got) else "nothing"
            expected = str(want[at]) if at < len(want) else "nothing"
            raise PlanError(f"{file} does not lower the schedule in {PLAN_FILE}: rank {rank}'s compute action "
                            f"#{at} is {found} there and {expected} in {PLAN_FILE}; {_RERUN}")
    if data.lowered:
        stored = data.lowered[default_backend(data.lowered)]
        if lowered.actions != stored.actions:
            raise PlanError(f"{file} is not the lowered schedule {PLAN_FILE} holds for "
                            f"{default_backend(data.lowered)}; {_RERUN}")
        return  # validated with plan.json
    check_schedule(lowered, data, file)


def read_plan_data(directory: Path) -> PlanData:
    """``plan.json`` validated: exists, parses, has this pipec's ``format_version``."""
    file = directory / PLAN_FILE
    if not file.is_file():
        raise PlanError(f"{directory} holds no {PLAN_FILE}, so it is not a saved plan; {_RERUN}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{file} is not valid JSON (corrupt or truncated: {exc}); {_RERUN}") from None
    if not isinstance(raw, dict):
        raise PlanError(f"{file}: expected a JSON object, found {type(raw).__name__}; {_RERUN}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise PlanError(
            f"{file} has format_version {version!r}, this pipec reads format_version {FORMAT_VERSION}; "
            f"{_RERUN} with this pipec version"
        )
    try:
        return PlanData.model_validate(raw)
    except ValidationError as exc:
        first = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        raise PlanError(f"{file} is not a valid plan ({exc.error_count()} errors: {first}); {_RERUN}") from None


def _weights_header(directory: Path, index: int) -> dict[str, tuple[int, ...]]:
    file = directory / weights_file(index)
    if not file.is_file():
        raise PlanError(f"{directory} lacks {weights_file(index)} for stage {index}; {_RERUN}")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise PlanError(f"{file} is not a readable safetensors file (corrupt or truncated: {exc}); {_RERUN}") from None


def load_stage_module(directory: Path, data: PlanData, index: int) -> StageModule:
    """Import ``stage_<index>.py`` under a fresh module name and fill it from safetensors."""
    file = directory / stage_file(index)
    name = f"_pipec_plan_stage_{index}_{next(_import_counter)}"
    try:
        module = import_file(file, name)
    except ImportError as exc:
        raise PlanError(f"cannot import {file}; {_RERUN}") from exc
    except Exception as exc:
        raise PlanError(f"{file} fails to build class Stage{index}: {type(exc).__name__}: {exc}; {_RERUN}") from exc
    try:
        stage = getattr(module, f"Stage{index}")()
    except Exception as exc:
        sys.modules.pop(name, None)
        raise PlanError(f"{file} fails to build class Stage{index}: {type(exc).__name__}: {exc}; {_RERUN}") from exc
    if not isinstance(stage, StageModule):
        raise PlanError(f"{file}: Stage{index} must subclass pipec.split.StageModule; {_RERUN}")
    if stage.index != index or stage.is_last != (index == data.num_stages - 1):
        raise PlanError(f"{file} declares index={stage.index}, is_last={stage.is_last}, but it is stage "
                        f"{index} of {data.num_stages} in {PLAN_FILE}; {_RERUN}")
    _weights_header(directory, index)  # a clear error for a missing or corrupt file
    try:
        tensors = load_file(str(directory / weights_file(index)))
    except (SafetensorError, OSError) as exc:
        raise PlanError(f"{directory / weights_file(index)} cannot be read ({exc}); {_RERUN}") from None
    own = _named_tensors(stage)
    if set(own) != set(tensors):
        raise PlanError(
            f"stage {index}: {weights_file(index)} holds {sorted(set(tensors) - set(own))[:5]} extra and "
            f"lacks {sorted(set(own) - set(tensors))[:5]} of the tensors Stage{index} declares; {_RERUN}")
    with torch.no_grad():
        for key, value in tensors.items():
            if own[key].shape != value.shape:
                raise PlanError(f"stage {index}: {key!r} has shape {tuple(value.shape)} in "
                                f"{weights_file(index)}, Stage{index} expects {tuple(own[key].shape)}; {_RERUN}")
            own[key].copy_(value)
    log.debug("loaded stage %d from %s (%d tensors)", index, file, len(tensors))
    return stage
