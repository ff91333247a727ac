"""The torch export: a plan as files torch.distributed.pipelining runs, and back.

Phase: codegen, for torch's ``_PipelineScheduleRuntime`` (``pipec export DIR
--format torch``, :func:`pipec.export_torch`). :func:`write_torch_export` writes,
atomically (a temporary directory renamed into place when complete)::

    pipeline_order.csv          the plan's lowered schedule in torch's compute_comms
                                CSV form (pipec.schedule.torch_csv): load it with
                                schedule._load_csv(path, format="compute_comms")
    pipeline_order_compute.csv  its compute actions only (torch's compute_only form,
                                for torch to lower itself)
    torch_export.json           sizes, placement and, per stage, the names of the
                                values torch passes it (what load_torch_stage reads)
    plan/                       the pipec plan directory the stage modules come from
                                (stage_<k>.py, weights, manifest), as plan.save writes it

:func:`load_torch_stage` builds stage ``k`` from it as an ``nn.Module`` for
``torch.distributed.pipelining.PipelineStage`` (:class:`pipec.split.torch_stage.TorchStage`);
:func:`pipec.runtime.torch_pipeline.load_torch_pipeline` builds a rank's whole torch schedule.

The CSV is the lowering pipec made for NCCL, whose receives take each pair of
ranks' messages in the order they are sent: torch posts its point-to-point
operations without tags, so Gloo and NCCL both match them in that order.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from pipec._files import atomic_directory, check_replaceable
from pipec.codegen import load_plan_data, load_stage_module, save_plan
from pipec.errors import PlanError
from pipec.plan import PlanData
from pipec.schedule.backends import plan_lowered
from pipec.schedule.ir import Schedule
from pipec.schedule.torch_csv import to_torch_csv
from pipec.split.torch_stage import TorchStage, check_torch_exportable, draws_random, pipec_stage

log = logging.getLogger(__name__)

EXPORT_FILE = "torch_export.json"
LOWERED_CSV = "pipeline_order.csv"
COMPUTE_CSV = "pipeline_order_compute.csv"
PLAN_DIR = "plan"
EXPORT_FORMAT = "pipec-torch-export"
EXPORT_VERSION = 1
_REDO = "export the plan again with `pipec export PLAN_DIR --format torch -o DIR`"


def torch_lowered(data: PlanData) -> Schedule:
    """The lowered schedule torch runs: pipec's NCCL lowering (module docstring)."""
    try:
        return plan_lowered(data, "nccl")
    except PlanError as exc:
        raise PlanError(
            f"this plan cannot be exported for torch: torch's runtime matches each pair of ranks' messages "
            f"in the order they are posted, and the plan has no lowering that receives them in that order "
            f"({exc})"
        ) from None


def write_torch_export(
    data: PlanData,
    directory: Path,
    *,
    stage_module: Callable[[int], nn.Module],
    source: Path | None = None,
) -> Path:
    """Write the torch export of plan ``data`` to ``directory`` (module docstring) and
    return it. ``stage_module(k)`` gives pipec's stage ``k``; ``source`` is the plan
    directory a loaded plan came from (as for :func:`pipec.codegen.save_plan`).

    An existing export in ``directory`` is replaced once the new one is complete; a
    non-empty directory that is no export is never touched. Raises
    :class:`PlanError` for a plan torch's runtime cannot run, naming the limitation
    (:func:`pipec.split.torch_stage.torch_export_problems`)."""
    directory = Path(directory)
    check_replaceable(directory, EXPORT_FILE, "export to", "a torch export of a pipec plan")
    stages = [pipec_stage(stage_module, k) for k in range(data.num_stages)]
    check_torch_exportable(data, stages)
    lowered = torch_lowered(data)
    random = [s.index for s in stages if draws_random(s)]
    if random:
        warnings.warn(
            f"stages {random} have random operations (dropout): pipec's runtime seeds them per step and "
            "micro-batch, torch's runtime draws from the global generator, so a step on torch gives other "
            "numbers than the same step on pipec (or pipec.reference_step)", UserWarning, stacklevel=3)
    info = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model": data.model_name,
        "schedule": data.schedule.name,
        "num_stages": data.num_stages,
        "num_ranks": data.num_ranks,
        "num_microbatches": data.num_microbatches,
        "placement": list(lowered.placement),
        "lowered_csv": LOWERED_CSV,
        "compute_csv": COMPUTE_CSV,
        "plan": PLAN_DIR,
        # the values torch passes each stage, by name: the model's inputs, else the previous stage's outputs
        "stage_arguments": [[s.name for s in data.inputs]] + [list(s.output_names) for s in stages[:-1]],
    }
    with atomic_directory(directory) as tmp:
        save_plan(data, tmp / PLAN_DIR, stage_module=lambda k: stages[k], source=source)
        (tmp / LOWERED_CSV).write_text(to_torch_csv(lowered), encoding="utf-8")
        (tmp / COMPUTE_CSV).write_text(to_torch_csv(lowered.compute_only()), encoding="utf-8")
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info("exported %s (%d stages, schedule %s) for torch.distributed.pipelining to %s",
             data.model_name, data.num_stages, data.schedule.name, directory)
    return directory


def read_torch_export(directory: str | Path) -> dict[str, Any]:
    """``torch_export.json`` of the export in ``directory``, checked."""
    path = Path(directory) / EXPORT_FILE
    if not path.is_file():
        raise PlanError(f"{directory} holds no {EXPORT_FILE}, so it is not a torch export of a pipec plan; {_REDO}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path} is not valid JSON ({exc}); {_REDO}") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT or info.get("version") != EXPORT_VERSION:
        raise PlanError(f"{path}: expected format {EXPORT_FORMAT!r} version {EXPORT_VERSION}; {_REDO}")
    return info


def load_torch_stage(directory: str | Path, stage_index: int) -> TorchStage:
    """Stage ``stage_index`` of the torch export in ``directory``, as the module to wrap
    in ``torch.distributed.pipelining.PipelineStage(module, stage_index, num_stages, device)``.

    Built from the export's pipec plan (checked as :func:`pipec.load` checks it); its
    ``.stage`` is pipec's stage module, with the original FQNs."""
    directory = Path(directory)
    info = read_torch_export(directory)
    num_stages = int(info["num_stages"])
    if isinstance(stage_index, bool) or not isinstance(stage_index, int) or not 0 <= stage_index < num_stages:
        raise PlanError(f"load_torch_stage: stage_index must be 0..{num_stages - 1}, found {stage_index!r}")
    plan_dir = directory / str(info.get("plan", PLAN_DIR))
    data = load_plan_data(plan_dir)
    stage = load_stage_module(plan_dir, data, stage_index)
    arguments = tuple(info["stage_arguments"][stage_index])
    if stage_index == 0:
        return TorchStage(stage, inputs=data.inputs, structure=data.input_structure)
    if sorted(arguments) != sorted(stage.boundary_input_names):
        raise PlanError(f"{directory / EXPORT_FILE}: stage {stage_index} is passed {list(arguments)}, but reads "
                        f"{list(stage.boundary_input_names)}; {_REDO}")
    return TorchStage(stage, incoming=arguments)


__all__ = [
    "COMPUTE_CSV", "EXPORT_FILE", "LOWERED_CSV", "PLAN_DIR", "load_torch_stage", "read_torch_export",
    "torch_lowered", "write_torch_export",
]
