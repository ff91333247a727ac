"""Who sends what to whom: a stage's inputs and outputs resolved against the plan.

Phase: stage runtime (pure; no communication). Inputs: the plan's boundaries
(producer stage -> consumer stages, per-micro-batch shape and dtype) and one
stage module's ``input_names`` / ``output_names``. Output: a :class:`StageRoutes`
per local stage that the executor and the P2P layer both read, so the two can
never disagree about message order.

Message order (the contract with :mod:`pipec.schedule.lowering` for NCCL, where
messages between a pair of ranks are matched in issue order) is
:func:`pipec.schedule.stage_graph.message_order`: within one action, per peer
stage ascending, then per boundary in plan order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipec.errors import PlanError
from pipec.plan import Boundary
from pipec.schedule.stage_graph import carries_grad


@dataclass(frozen=True)
class InputRoute:
    """One value a stage reads: a graph input (``producer is None``) or a boundary.
    ``carries_grad``: a gradient flows back through it to its producer."""

    name: str
    producer: int | None
    boundary: Boundary | None
    carries_grad: bool = False


@dataclass(frozen=True)
class OutputRoute:
    """One boundary tensor a stage produces and the stages that read it."""

    name: str
    consumers: tuple[int, ...]
    boundary: Boundary
    carries_grad: bool = False


@dataclass(frozen=True)
class StageRoutes:
    """Everything the runtime needs to know about one stage's wiring."""

    stage: int
    inputs: tuple[InputRoute, ...]  # in the stage module's input order
    outputs: tuple[OutputRoute, ...]  # in the stage module's output order
    is_last: bool

    def boundary_inputs(self) -> tuple[InputRoute, ...]:
        return tuple(r for r in self.inputs if r.producer is not None)

    def graph_inputs(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.inputs if r.producer is None)


def build_routes(
    stage: int,
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    boundaries: Sequence[Boundary],
    num_stages: int,
    requires_grad: Mapping[str, bool] | None = None,
) -> StageRoutes:
    """Resolve a stage module's names against ``boundaries``.

    A boundary carries a gradient when it is floating point and the stage
    module's ``requires_grad`` mapping (``pipec.split`` contract) does not say
    False for it; producer and consumer read the same analysis, so both ends
    agree on which gradients travel.

    Raises :class:`PlanError` when the stage module and the plan disagree (a
    stage output the plan does not list, or an input produced by no stage).
    """
    by_name = {b.name: b for b in boundaries}
    flags = requires_grad or {}

    def grad(b: Boundary) -> bool:
        return carries_grad(b, flags)  # the predicate lowering used for SEND_B/RECV_B

    inputs: list[InputRoute] = []
    for name in input_names:
        b = by_name.get(name)
        if b is None:
            inputs.append(InputRoute(name, None, None))
            continue
        if stage not in b.consumer_stages:
            raise PlanError(
                f"stage {stage} reads boundary tensor {name!r}, but the plan lists its consumers "
                f"as {list(b.consumer_stages)}; the plan and its stage modules are out of sync, "
                "re-create the plan (plan.save / pipec.load) from one partition run"
            )
        inputs.append(InputRoute(name, b.producer_stage, b, grad(b)))
    outputs: list[OutputRoute] = []
    for name in output_names:
        b = by_name.get(name)
        if b is None or b.producer_stage != stage:
            found = "no boundary" if b is None else f"a boundary of stage {b.producer_stage}"
            raise PlanError(
                f"stage {stage} produces {name!r}, but the plan has {found} of that name; "
                "the plan and its stage modules are out of sync, re-create the plan"
            )
        outputs.append(OutputRoute(name, tuple(sorted(b.consumer_stages)), b, grad(b)))
    return StageRoutes(stage, tuple(inputs), tuple(outputs), is_last=stage == num_stages - 1)


def boundary_index(boundaries: Sequence[Boundary]) -> dict[str, int]:
    """Plan order of each boundary, used for message order and Gloo tags."""
    return {b.name: i for i, b in enumerate(boundaries)}
