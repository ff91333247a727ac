"""Links of a D x P device mesh: one pipeline's transfers and a stage's replica all-reduce.

Phase: cost model (planner side; plain arithmetic over a cost model's links).

Input: a cost model (its ``comm_time`` and ``allreduce_time`` over *global*
ranks, intra- or inter-node by ``rank // devices_per_node``) and the mesh
(``data_parallel`` D, ``num_ranks`` P, ``mesh_order``; :mod:`pipec.schedule.mesh`).
Output: :class:`MeshCostModel`, a cost model over *pipeline* ranks ``0 .. P-1``
that the partitioner uses unchanged, plus :meth:`MeshCostModel.dp_allreduce_time`.

- A pipeline transfer ``a -> b`` is priced as the slowest of the D replicas'
  copies of it (``global(dp, a) -> global(dp, b)``): every replica runs the
  same schedule and the step waits for the slowest. So with ``("dp", "pp")``
  a link is inter-node where some replica's pipeline straddles a node
  boundary, and with ``("pp", "dp")`` wherever ``D`` ranks apart leaves the node.
- A tied group's all-reduce inside a replica: the same, slowest replica.
- A stage's data-parallel gradient all-reduce: a ring over its replica group
  (:func:`pipec.schedule.mesh.replica_group`) with the cost model's ``allreduce_time``,
  i.e. ``2 (D - 1) * (latency + bytes / D / bus_bandwidth)`` on the ring's
  slowest link (:func:`pipec.costs.ring.ring_allreduce_time`; Patarasuk and
  Yuan, JPDC 2009): inter-node as soon as the group spans two nodes.

Whether two global ranks share a node depends only on the ranks modulo the
node size, so the first ``min(D, devices_per_node)`` replicas show every case;
looking at those alone keeps a 1,024-device mesh as cheap to price as an 8-device one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

from pipec.costs.ring import ring_allreduce_time
from pipec.errors import ConfigError
from pipec.schedule.mesh import DP_PP, MESH_ORDERS, MeshOrder, global_rank, replica_group
from pipec.types import CostModel, NodeCost, TracedGraph


class MeshCostModel:
    """``base`` seen from one pipeline of a D x P mesh (see the module docstring).
    ``devices_per_node`` must be the node size ``base`` prices its links with."""

    def __init__(self, base: CostModel, *, data_parallel: int, num_ranks: int, mesh_order: MeshOrder = DP_PP,
                 devices_per_node: int) -> None:
        if tuple(mesh_order) not in MESH_ORDERS:
            raise ConfigError(f"mesh_order: expected one of {list(MESH_ORDERS)}, found {mesh_order!r}")
        if data_parallel < 1 or num_ranks < 1 or devices_per_node < 1:
            raise ConfigError(
                f"MeshCostModel: expected data_parallel, num_ranks and devices_per_node >= 1, found "
                f"{data_parallel}, {num_ranks}, {devices_per_node}"
            )
        self.base = base
        self.data_parallel = data_parallel
        self.num_ranks = num_ranks
        self.mesh_order: MeshOrder = (mesh_order[0], mesh_order[1])
        self.devices_per_node = devices_per_node
        self._replicas = range(min(data_parallel, devices_per_node))
        self._comm = lru_cache(maxsize=65536)(self._comm_uncached)

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def memory_capacity(self) -> int | None:
        return self.base.memory_capacity

    @property
    def runtime_overhead(self) -> object:
        """The base model's runtime overhead per action (its hardware file's; None without)."""
        return getattr(self.base, "runtime_overhead", None)

    def node_costs(self, traced: TracedGraph) -> Mapping[str, NodeCost]:
        return self.base.node_costs(traced)

    def global_rank(self, dp: int, pp: int) -> int:
        return global_rank(dp, pp, data_parallel=self.data_parallel, num_ranks=self.num_ranks,
                           mesh_order=self.mesh_order)

    def comm_time(self, num_bytes: int, src_rank: int, dst_rank: int) -> float:
        """Seconds of a transfer between pipeline ranks: the slowest replica's copy."""
        return float(self._comm(num_bytes, src_rank, dst_rank))

    def _comm_uncached(self, num_bytes: int, src_rank: int, dst_rank: int) -> float:
        if src_rank == dst_rank:
            return 0.0
        return max(self.base.comm_time(num_bytes, self.global_rank(dp, src_rank), self.global_rank(dp, dst_rank))
                   for dp in self._replicas)

    def _base_allreduce(self, num_bytes: int, ranks: Sequence[int]) -> float:
        method = getattr(self.base, "allreduce_time", None)
        if callable(method):
            return float(method(num_bytes, tuple(ranks)))
        return ring_allreduce_time(self.base.comm_time, num_bytes, ranks)

    def allreduce_time(self, num_bytes: int, ranks: Sequence[int]) -> float:
        """An all-reduce among pipeline ranks of one replica (a tied group): the slowest replica's."""
        if len(set(ranks)) < 2:
            return 0.0
        return max(self._base_allreduce(num_bytes, [self.global_rank(dp, r) for r in ranks])
                   for dp in self._replicas)

    def dp_allreduce_time(self, num_bytes: int, pp_rank: int) -> float:
        """Seconds of the gradient all-reduce of ``num_bytes`` held on pipeline rank
        ``pp_rank``, among its D replicas (a ring over the replica group); 0 for D = 1."""
        if self.data_parallel < 2 or num_bytes <= 0:
            return 0.0
        group = replica_group(pp_rank, data_parallel=self.data_parallel, num_ranks=self.num_ranks,
                              mesh_order=self.mesh_order)
        return self._base_allreduce(num_bytes, group)

    def __repr__(self) -> str:
        return (f"MeshCostModel({self.base!r}, data_parallel={self.data_parallel}, num_ranks={self.num_ranks}, "
                f"mesh_order={self.mesh_order}, devices_per_node={self.devices_per_node})")


def with_devices_per_node(cost_model: CostModel, devices_per_node: int | None) -> tuple[CostModel, int | None]:
    """``cost_model`` pricing its links with nodes of ``devices_per_node`` ranks, and
    that node size. ``None`` keeps the model's own (its hardware file's
    ``gpus_per_node``; None for a model without one). A model with a hardware
    spec is copied with the node size replaced; one without cannot change it."""
    spec = getattr(cost_model, "spec", None)
    own = getattr(spec, "gpus_per_node", None)
    if devices_per_node is None or devices_per_node == own:
        return cost_model, own if isinstance(own, int) else None
    if spec is None:
        raise ConfigError(
            f"devices_per_node={devices_per_node}: the cost model {cost_model.name!r} has no hardware "
            "description to set a node size on; pass a hardware name such as 'h100-sxm' or leave it out"
        )
    import copy

    changed = copy.copy(cost_model)
    changed.spec = spec.model_copy(update={"gpus_per_node": devices_per_node})  # type: ignore[attr-defined]
    return changed, devices_per_node


__all__ = ["MeshCostModel", "with_devices_per_node"]
