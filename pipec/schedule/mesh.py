"""The 2-D device mesh of a hybrid plan: D replicas of a P-rank pipeline.

Layer: schedule library (plain Python, no torch): placement of ranks, as ``rank_of`` places stages. The one rule that maps a
(replica, pipeline rank) pair to a global rank, and a global rank to its node;
the cost model (:mod:`pipec.costs.mesh_links`), the planner
(:mod:`pipec.partitioner.hybrid`) and the report read it here.

``mesh_order`` names the mesh's dimensions outermost first:

- ``("dp", "pp")``: mesh (D, P) with ``pp`` innermost -- a pipeline's ranks are
  adjacent, ``global = dp * P + pp``. Pipeline neighbours share a node; a
  stage's replicas are P ranks apart.
- ``("pp", "dp")``: replicas adjacent, ``global = pp * D + dp``. A stage's
  gradient all-reduce stays inside a node; pipeline neighbours are D apart.

A node holds ``devices_per_node`` consecutive global ranks (as torchrun numbers
them: ``node_rank * nproc_per_node + local_rank``).
"""

from __future__ import annotations

from pipec.plan import DP_PP, MESH_ORDERS, PP_DP, MeshOrder  # the orders a saved plan may name


def global_rank(dp: int, pp: int, *, data_parallel: int, num_ranks: int, mesh_order: MeshOrder) -> int:
    """The global rank of replica ``dp``'s pipeline rank ``pp``."""
    return dp * num_ranks + pp if tuple(mesh_order) == DP_PP else pp * data_parallel + dp


def mesh_coords(rank: int, *, data_parallel: int, num_ranks: int, mesh_order: MeshOrder) -> tuple[int, int]:
    """``(dp, pp)`` of a global rank (the inverse of :func:`global_rank`)."""
    if tuple(mesh_order) == DP_PP:
        return divmod(rank, num_ranks)
    pp, dp = divmod(rank, data_parallel)
    return dp, pp


def replica_group(pp: int, *, data_parallel: int, num_ranks: int, mesh_order: MeshOrder) -> tuple[int, ...]:
    """The global ranks that hold pipeline rank ``pp`` in each replica: one gradient all-reduce group."""
    return tuple(global_rank(dp, pp, data_parallel=data_parallel, num_ranks=num_ranks, mesh_order=mesh_order)
                 for dp in range(data_parallel))


def node_of(rank: int, devices_per_node: int) -> int:
    """The node of a global rank."""
    return rank // devices_per_node


__all__ = ["DP_PP", "MESH_ORDERS", "PP_DP", "MeshOrder", "global_rank", "mesh_coords", "node_of",
           "replica_group"]
