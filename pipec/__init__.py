"""pipec: a pipeline-parallel model partitioning compiler for PyTorch.

Phases: trace -> profile / cost model -> partition -> schedule -> split/codegen
-> stage runtime. See README.md for a tour, and its Architecture section for the
layers.

Public names are imported lazily, so ``import pipec`` stays cheap and the
planner side never imports ``torch.distributed``; type checkers see them
through the ``TYPE_CHECKING`` imports, with their real signatures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipec._lazy import lazy_exports
from pipec._version import __version__ as __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # errors
    "PipecError": "pipec.errors",
    "ConfigError": "pipec.errors",
    "PrecisionError": "pipec.errors",
    "TraceError": "pipec.errors",
    "ProfileError": "pipec.errors",
    "CostModelError": "pipec.errors",
    "PartitionError": "pipec.errors",
    "ScheduleError": "pipec.errors",
    "PlanError": "pipec.errors",
    "RuntimeFailure": "pipec.errors",
    "NonfiniteError": "pipec.errors",
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
    "export_torch": "pipec.facade",
    "load_torch_stage": "pipec.split.torch_export",
    "from_torch_csv": "pipec.schedule.torch_csv",
    "load_torch_pipeline": "pipec.runtime.torch_pipeline",
    "merge_state_dicts": "pipec.split",
    "PipelineRuntime": "pipec.runtime.runtime",
    "reference_step": "pipec.runtime.reference",
    "ReferenceStep": "pipec.runtime.reference",
    "LossScaling": "pipec.runtime.amp",
}

if TYPE_CHECKING:  # the real signatures for type checkers; at run time, __getattr__ below
    from pipec.costs.analytic import AnalyticCostModel as AnalyticCostModel
    from pipec.costs.analytic import load_cost_model as load_cost_model
    from pipec.costs.hardware import HardwareSpec as HardwareSpec
    from pipec.costs.profiled import ProfiledCostModel as ProfiledCostModel
    from pipec.errors import CheckpointError as CheckpointError
    from pipec.errors import ConfigError as ConfigError
    from pipec.errors import CostModelError as CostModelError
    from pipec.errors import NonfiniteError as NonfiniteError
    from pipec.errors import PartitionError as PartitionError
    from pipec.errors import PipecError as PipecError
    from pipec.errors import PlanError as PlanError
    from pipec.errors import PrecisionError as PrecisionError
    from pipec.errors import ProfileError as ProfileError
    from pipec.errors import RuntimeFailure as RuntimeFailure
    from pipec.errors import ScheduleError as ScheduleError
    from pipec.errors import TraceError as TraceError
    from pipec.facade import Plan as Plan
    from pipec.facade import export_torch as export_torch
    from pipec.facade import load as load
    from pipec.facade import partition as partition
    from pipec.plan import Boundary as Boundary
    from pipec.plan import PlanData as PlanData
    from pipec.plan import StageInfo as StageInfo
    from pipec.plan import TiedGroup as TiedGroup
    from pipec.profiling import Profile as Profile
    from pipec.profiling import profile as profile
    from pipec.runtime.amp import LossScaling as LossScaling
    from pipec.runtime.reference import ReferenceStep as ReferenceStep
    from pipec.runtime.reference import reference_step as reference_step
    from pipec.runtime.runtime import PipelineRuntime as PipelineRuntime
    from pipec.runtime.torch_pipeline import load_torch_pipeline as load_torch_pipeline
    from pipec.schedule.generators import make_schedule as make_schedule
    from pipec.schedule.ir import Action as Action
    from pipec.schedule.ir import ActionKind as ActionKind
    from pipec.schedule.ir import Schedule as Schedule
    from pipec.schedule.lowering import lower as lower
    from pipec.schedule.simulator import Collective as Collective
    from pipec.schedule.simulator import Simulation as Simulation
    from pipec.schedule.simulator import simulate as simulate
    from pipec.schedule.torch_csv import from_torch_csv as from_torch_csv
    from pipec.schedule.validator import validate as validate
    from pipec.split import merge_state_dicts as merge_state_dicts
    from pipec.split.torch_export import load_torch_stage as load_torch_stage
    from pipec.tracing import trace as trace
    from pipec.types import CostModel as CostModel
    from pipec.types import NodeCost as NodeCost
    from pipec.types import NodeInfo as NodeInfo
    from pipec.types import ParamInfo as ParamInfo
    from pipec.types import TensorMeta as TensorMeta
    from pipec.types import TracedGraph as TracedGraph

__all__ = sorted(_EXPORTS)


if not TYPE_CHECKING:  # hidden from type checkers, so a misspelt name is an error there
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
