"""A cost model from measurements: node costs from a :class:`~pipec.profiling.Profile`.

Phase: cost model. Input: a profile of one traced graph (``pipec.profile``)
and, for what a single-device profile cannot measure -- the links between
ranks and the memory limit -- a hardware description or explicit figures.
Output: the :class:`~pipec.types.CostModel` protocol.

Communication is ``latency + num_bytes / bandwidth`` (the alpha-beta model,
Hockney, "The communication challenge for MPP", Parallel Computing 20(3),
1994). Link figures, in order of precedence: ``link_bandwidth`` /
``link_latency`` (every pair of ranks); the links of ``spec`` (intra- or
inter-node by ``rank // gpus_per_node``); a shipped hardware file that names
the profiled GPU in ``device_match``; else the ``cpu`` file (Gloo over
loopback). ``memory_capacity``: the argument, else ``spec``'s, else the
profiled GPU's memory (none on CPU, whose ranks share the host's memory).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from pipec.costs.analytic import _check_transfer
from pipec.costs.hardware import HardwareSpec, list_cost_models, load_hardware
from pipec.errors import CostModelError
from pipec.profiling import Profile
from pipec.types import NodeCost, TracedGraph
from pipec.units import parse_bytes

log = logging.getLogger(__name__)


def default_spec(profile: Profile) -> HardwareSpec:
    """The shipped hardware file that matches the profiled device, else ``cpu``."""
    if profile.device.startswith("cuda"):
        for name in list_cost_models():
            spec = load_hardware(name)
            if any(pattern in profile.device_name for pattern in spec.device_match):
                return spec
        log.warning(
            "no hardware file in cost_models/ matches %r; link figures default to the cpu "
            "file (Gloo loopback). Pass spec= or link_bandwidth=/link_latency=.",
            profile.device_name,
        )
    return load_hardware("cpu")


class ProfiledCostModel:
    """Measured node costs plus a link model; see the module docstring."""

    def __init__(
        self,
        profile: Profile,
        *,
        link_bandwidth: float | None = None,
        link_latency: float | None = None,
        memory_capacity: int | str | None = None,
        spec: HardwareSpec | None = None,
    ) -> None:
        if not isinstance(profile, Profile):
            raise CostModelError(
                f"ProfiledCostModel: expected a pipec.Profile (from pipec.profile), "
                f"found {type(profile).__name__}"
            )
        if link_bandwidth is not None and not link_bandwidth > 0:
            raise CostModelError(f"link_bandwidth: expected bytes/s > 0, found {link_bandwidth!r}")
        if link_latency is not None and not link_latency >= 0:
            raise CostModelError(f"link_latency: expected seconds >= 0, found {link_latency!r}")
        self.profile = profile
        self.spec = spec if spec is not None else default_spec(profile)
        self.link_bandwidth = link_bandwidth
        self.link_latency = link_latency
        if memory_capacity is not None:
            self._memory_capacity: int | None = parse_bytes(memory_capacity, what="memory_capacity")
        elif spec is not None:
            self._memory_capacity = spec.memory_capacity
        elif profile.device.startswith("cuda"):
            self._memory_capacity = profile.memory_capacity
        else:
            # CPU ranks share the host's memory: no per-rank default limit.
            self._memory_capacity = None

    @property
    def name(self) -> str:
        return f"profile:{self.profile.device_name}"

    @property
    def memory_capacity(self) -> int | None:
        return self._memory_capacity

    def __repr__(self) -> str:
        return f"ProfiledCostModel({self.profile.model_name!r} on {self.profile.device!r})"

    def node_costs(self, traced: TracedGraph) -> Mapping[str, NodeCost]:
        names = [n.name for n in traced.nodes]
        missing = [n for n in names if n not in self.profile.nodes]
        extra = [n for n in self.profile.nodes if n not in set(names)]
        if missing or extra:
            raise CostModelError(
                f"the profile (of {self.profile.model_name}, {len(self.profile.nodes)} nodes) does not "
                f"match this traced graph ({traced.model_name}, {len(names)} nodes): "
                f"{len(missing)} node(s) not profiled {missing[:5]}, {len(extra)} profiled node(s) "
                f"not in the graph {extra[:5]}; re-run pipec.profile on this traced graph"
            )
        return {n: self.profile.nodes[n] for n in names}

    def comm_time(self, num_bytes: int, src_rank: int, dst_rank: int) -> float:
        _check_transfer(num_bytes, src_rank, dst_rank)
        if src_rank == dst_rank:
            return 0.0
        bandwidth, latency = self.spec.link(src_rank, dst_rank)
        if self.link_bandwidth is not None:
            bandwidth = self.link_bandwidth
        if self.link_latency is not None:
            latency = self.link_latency
        return latency + num_bytes / bandwidth


__all__ = ["ProfiledCostModel", "default_spec"]
