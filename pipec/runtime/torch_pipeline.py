"""A torch export run by torch.distributed.pipelining's own runtime.

Phase: stage runtime (the only layer that imports ``torch.distributed``). Input:
a directory written by ``pipec export DIR --format torch``
(:mod:`pipec.split.torch_export`), inside an initialised process group of
``num_ranks`` ranks. Output: this rank's ``_PipelineScheduleRuntime`` with one
``PipelineStage`` per stage the placement gives the rank, the plan's lowered
schedule loaded from ``pipeline_order.csv``. Step it as any torch schedule::

    sched = pipec.load_torch_pipeline("out/mlp-torch", loss_fn=F.cross_entropy)
    sched.step(x, target=y, losses=[])   # the first rank passes x, the last rank target
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipec.errors import ConfigError, PlanError
from pipec.split.torch_export import load_torch_stage, read_torch_export


def load_torch_pipeline(
    directory: str | Path,
    *,
    loss_fn: Callable[..., Any] | None = None,
    device: torch.device | str | None = None,
    group: Any = None,
    form: str = "compute_comms",
) -> Any:
    """This rank's ``torch.distributed.pipelining.schedules._PipelineScheduleRuntime`` for
    the torch export in ``directory`` (module docstring).

    ``form="compute_comms"`` runs the plan's lowered schedule as pipec lowered it;
    ``"compute_only"`` hands torch the compute actions to lower itself. ``device``
    defaults to the CPU; ``group`` to the default process group."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    if form not in ("compute_comms", "compute_only"):
        raise ConfigError(f"form: expected 'compute_comms' or 'compute_only', found {form!r}")
    if not dist.is_initialized():
        raise ConfigError("load_torch_pipeline runs inside a process group: call "
                          "torch.distributed.init_process_group first (torchrun does it)")
    directory = Path(directory)
    info = read_torch_export(directory)
    world = dist.get_world_size(group)
    if world != int(info["num_ranks"]):
        raise PlanError(f"{directory}: the export runs on {info['num_ranks']} ranks, this process group has "
                        f"{world}; start {info['num_ranks']} processes")
    rank = dist.get_rank(group)
    where = torch.device(device) if device is not None else torch.device("cpu")
    num_stages = int(info["num_stages"])
    mine = [s for s, r in enumerate(info["placement"]) if r == rank]
    stages = [
        PipelineStage(load_torch_stage(directory, s).to(where), s, num_stages, where, group=group)
        for s in mine
    ]
    schedule = _PipelineScheduleRuntime(  # type: ignore[no-untyped-call]
        stages, n_microbatches=int(info["num_microbatches"]), loss_fn=loss_fn)
    if form == "compute_comms":
        schedule._load_csv(str(directory / info["lowered_csv"]), format="compute_comms")
    else:
        schedule._load_csv(str(directory / info["compute_csv"]), format="compute_only")
    return schedule


__all__ = ["load_torch_pipeline"]
