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
loopback). A tied gradient's all-reduce is a ring over the same links at the
file's ``allreduce_bandwidth`` (Gloo's, measured by ``pipec calibrate``, is
about 0.4 of its point-to-point bandwidth). ``memory_capacity``: the argument, else ``spec``'s, else the
profiled GPU's memory (none on CPU, whose ranks share the host's memory).

**Whole-model correction** (``whole_model_correction=True``, the default).
Each node is timed alone, repeatedly, on inputs that stay in cache and with
its output's memory reused call after call; in a stage's forward and
backward every op also pays the interpreter and the autograd engine between
ops and writes fresh memory. The profile measures the whole graph too, so
the differences ``whole - sum of nodes`` are known, forward and backward
apart. The forward's, when positive, is spread evenly over the compute
nodes -- a fixed cost per op, which is how it behaves: a stage of one big
matmul is timed right alone, a stage of hundreds of small ops is not. The
backward's scales every node's I and W by ``whole / sum``: there the gap
grows with the work (large gradients written to fresh memory), not with the
count of ops. A negative forward gap (a GPU overlapping the host's dispatch
with the kernels of small ops) scales the forward times instead. On a
6-layer GPT-2 on one CPU core the nodes sum to 0.92 of the whole forward and
0.90 of the whole backward; for stages of 44 to 245 of its nodes run alone,
the corrected times came within 2-12% of the measured forward and backward
(most within 5%), the uncorrected ones 4-24% under.

**The loss.** A profile taken with ``loss_fn`` holds the loss's cost
(``Profile.loss``); it runs on the last stage right after the model's output,
so it is added to the last compute node -- the one node every split puts on
the last stage.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from pipec.costs.analytic import _check_transfer
from pipec.costs.hardware import HardwareSpec, list_cost_models, load_hardware
from pipec.costs.node_exec import FREE_OPS
from pipec.errors import CostModelError
from pipec.profiling import Profile
from pipec.types import NodeCost, RuntimeOverhead, TracedGraph
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
        whole_model_correction: bool = True,
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
        self.whole_model_correction = whole_model_correction
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
        precision = self.profile.precision
        return f"profile:{self.profile.device_name}" + (f"[{precision}]" if precision != "fp32" else "")

    @property
    def memory_capacity(self) -> int | None:
        return self._memory_capacity

    @property
    def runtime_overhead(self) -> RuntimeOverhead | None:
        """The runtime's own cost per action and step (the hardware file's; see
        :class:`~pipec.types.RuntimeOverhead`): the plan carries it, the simulator adds it."""
        return self.spec.runtime_overhead

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
        costs = {n: self.profile.nodes[n] for n in names}
        compute = [n.name for n in traced.nodes if n.op not in FREE_OPS]
        if self.whole_model_correction:
            costs = corrected_to_whole(costs, compute, self.profile.forward_time, self.profile.forward_backward_time)
        loss = self.profile.loss
        if loss is not None and compute:
            last = costs[compute[-1]]
            costs[compute[-1]] = last.model_copy(update={
                "forward_time": last.forward_time + loss.forward_time,
                "input_grad_time": last.input_grad_time + loss.input_grad_time,
                "saved_bytes": last.saved_bytes + loss.saved_bytes,
            })
        return costs

    def comm_time(self, num_bytes: int, src_rank: int, dst_rank: int) -> float:
        _check_transfer(num_bytes, src_rank, dst_rank)
        return self.spec.link_time(num_bytes, src_rank, dst_rank, link_bandwidth=self.link_bandwidth,
                                   link_latency=self.link_latency)

    def allreduce_time(self, num_bytes: int, ranks: Sequence[int]) -> float:
        """Seconds for an all-reduce of ``num_bytes`` among ``ranks``: a ring over the
        links above, at the spec's all-reduce efficiency (see
        :meth:`~pipec.costs.hardware.HardwareSpec.allreduce_time`)."""
        return self.spec.allreduce_time(num_bytes, ranks, link_bandwidth=self.link_bandwidth,
                                        link_latency=self.link_latency)


def corrected_to_whole(
    costs: Mapping[str, NodeCost], compute: Sequence[str], whole_forward: float, whole_forward_backward: float
) -> dict[str, NodeCost]:
    """``costs`` corrected to the whole-model times (see the module docstring): the
    forward gap spread evenly over the ``compute`` nodes, their backward scaled to the
    whole backward; nodes outside ``compute`` are unchanged."""
    out = dict(costs)
    nodes = [n for n in compute if n in costs]
    sum_f = sum(costs[n].forward_time for n in nodes)
    sum_b = sum(costs[n].backward_time for n in nodes)
    whole_b = max(whole_forward_backward - whole_forward, 0.0)
    extra_f = whole_forward - sum_f
    scale_b = whole_b / sum_b if sum_b > 0 else 1.0
    for n in nodes:
        c = costs[n]
        f = c.forward_time
        if extra_f > 0:
            f += extra_f / len(nodes)
        elif sum_f > 0:
            f *= whole_forward / sum_f
        out[n] = c.model_copy(update={"forward_time": f, "input_grad_time": c.input_grad_time * scale_b,
                                      "weight_grad_time": c.weight_grad_time * scale_b})
    return out


__all__ = ["ProfiledCostModel", "corrected_to_whole", "default_spec"]
