"""The 2-D process layout of D replicas of a P-rank pipeline: ("dp", "pp").

Phase: stage runtime. Input: the plan's ``data_parallel`` (D), ``num_ranks``
(P) and ``mesh_order``, and this process's global rank. Output: a
:class:`Mesh` -- this process's pipeline rank (``pp_rank``, the index into the
schedule's rows) and replica (``dp_rank``), the global rank of any (pipeline
rank, replica), and, when D > 1, the
:class:`torch.distributed.device_mesh.DeviceMesh` with its two process groups:
``pp`` (the P ranks of this replica: point-to-point transfers, the loss-count
broadcast, the gradient-norm all-reduce) and ``dp`` (the D ranks holding this
pipeline rank's stages, one per replica: the gradient all-reduce,
:mod:`pipec.runtime.data_parallel`).

``mesh_order`` ("dp", "pp") lays the mesh out as (D, P) with ``pp`` innermost:
a pipeline's ranks are adjacent global ranks, ``global = dp * P + pp``;
("pp", "dp") as (P, D): a stage's replicas are adjacent, ``global = pp * D + dp``
(:meth:`pipec.plan.PlanData.global_rank`, the one rule both sides use). With
D = 1 there is no mesh: the pipeline is the whole world and ``pp_rank`` is the
global rank, as before data parallelism existed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipec.plan import PlanData
from pipec.schedule.mesh import global_rank, mesh_coords


@dataclass(frozen=True)
class Mesh:
    """Where this process sits among ``data_parallel`` replicas of a ``num_ranks``-rank
    pipeline. ``pp_group`` / ``dp_group`` are None when D = 1 (the pipeline is the
    default group; no replicas) or the run has no process group."""

    rank: int  # global
    pp_rank: int
    dp_rank: int
    num_ranks: int  # P
    data_parallel: int  # D
    mesh_order: tuple[str, str]
    device_mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh when D > 1
    pp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None

    def global_rank(self, pp_rank: int, dp_rank: int | None = None) -> int:
        """The global rank of pipeline rank ``pp_rank`` in replica ``dp_rank`` (default: this one)."""
        d = self.dp_rank if dp_rank is None else dp_rank
        return global_rank(d, pp_rank, data_parallel=self.data_parallel, num_ranks=self.num_ranks,
                           mesh_order=self.mesh_order)

    def pipeline_ranks(self) -> list[int]:
        """The global ranks of this replica's pipeline, by pipeline rank."""
        return [self.global_rank(p) for p in range(self.num_ranks)]

    def replica_ranks(self, pp_rank: int | None = None) -> list[int]:
        """The global ranks holding pipeline rank ``pp_rank`` (default: this one), by replica."""
        p = self.pp_rank if pp_rank is None else pp_rank
        return [self.global_rank(p, d) for d in range(self.data_parallel)]


def position(data: PlanData, rank: int) -> tuple[int, int]:
    """``(pp_rank, dp_rank)`` of global ``rank`` under the plan's mesh order."""
    dp, pp = mesh_coords(rank, data_parallel=data.data_parallel, num_ranks=data.num_ranks,
                         mesh_order=data.mesh_order)
    return pp, dp


def build_mesh(data: PlanData, *, rank: int, device: torch.device, distributed: bool) -> Mesh:
    """This process's :class:`Mesh`; with D > 1 it builds the DeviceMesh (collective:
    every rank of the world calls it, as ``init_device_mesh`` creates the groups)."""
    pp_rank, dp_rank = position(data, rank)
    mesh = Mesh(rank=rank, pp_rank=pp_rank, dp_rank=dp_rank, num_ranks=data.num_ranks,
                data_parallel=data.data_parallel, mesh_order=data.mesh_order)
    if data.data_parallel == 1 or not distributed:
        return mesh
    from torch.distributed.device_mesh import init_device_mesh

    order = data.mesh_order
    sizes = {"dp": data.data_parallel, "pp": data.num_ranks}
    device_mesh = init_device_mesh(device.type, (sizes[order[0]], sizes[order[1]]), mesh_dim_names=order)
    return Mesh(rank=rank, pp_rank=pp_rank, dp_rank=dp_rank, num_ranks=data.num_ranks,
                data_parallel=data.data_parallel, mesh_order=order, device_mesh=device_mesh,
                pp_group=device_mesh.get_group("pp"), dp_group=device_mesh.get_group("dp"))


__all__ = ["Mesh", "build_mesh", "position"]
