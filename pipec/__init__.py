"""pipec: a pipeline-parallel model partitioning compiler for PyTorch.

Phases: trace -> profile / cost model -> partition -> schedule -> split/codegen
-> stage runtime. See README.md for a tour and ARCHITECTURE.md for the design.

Public names are imported lazily, so ``import pipec`` stays cheap and the
planner side never imports ``torch.distributed``.
"""

from __future__ import annotations

from pipec._lazy import lazy_exports
from pipec._version import __version__ as __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # errors
    "PipecError": "pipec.errors",
    "ConfigError": "pipec.errors",
    "TraceError": "pipec.errors",
    "ProfileError": "pipec.errors",
    "CostModelError": "pipec.errors",
    "PartitionError": "pipec.errors",
    "ScheduleError": "pipec.errors",
    "PlanError": "pipec.errors",
    "RuntimeFailure": "pipec.errors",
    "CheckpointError": "pipec.errors",
    # types
    "TensorMeta": "pipec.types",
    "NodeInfo": "pipec.types",
    "ParamInfo": "pipec.types",
    "TracedGraph": "pipec.types",
    "NodeCost": "pipec.types",
    "CostModel": "pipec.types",
    # phases
    "trace": "pipec.tracing",
    "profile": "pipec.profiling",
    "Profile": "pipec.profiling",
    "ProfiledCostModel": "pipec.costs.profiled",
    "AnalyticCostModel": "pipec.costs.analytic",
    "HardwareSpec": "pipec.costs.hardware",
    "load_cost_model": "pipec.costs.analytic",
    "partition": "pipec.facade",
    "Plan": "pipec.facade",
    "PlanData": "pipec.plan",
    "StageInfo": "pipec.plan",
    "Boundary": "pipec.plan",
    "TiedGroup": "pipec.plan",
    "Action": "pipec.schedule.ir",
    "ActionKind": "pipec.schedule.ir",
    "Schedule": "pipec.schedule.ir",
    "make_schedule": "pipec.schedule.generators",
    "lower": "pipec.schedule.lowering",
    "validate": "pipec.schedule.validator",
    "simulate": "pipec.schedule.simulator",
    "Simulation": "pipec.schedule.simulator",
    "Collective": "pipec.schedule.simulator",
    "load": "pipec.facade",
    "merge_state_dicts": "pipec.split",
    "PipelineRuntime": "pipec.runtime.runtime",
    "reference_step": "pipec.runtime.reference",
    "ReferenceStep": "pipec.runtime.reference",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
