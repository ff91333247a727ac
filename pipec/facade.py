"""The façade: :class:`Plan`, :func:`partition` and :func:`load` -- the user's pipec.

Layer: façade, the one module that ties the phases together for users (the
runtime and the command line build on it). Each method of :class:`Plan`
calls one phase function over the plan's data:

- :func:`partition`       trace, cost, split      (pipec/partitioner/)
- ``plan.simulate()``     the schedule simulator  (pipec/schedule/simulator.py)
- ``plan.stage_module(i)`` split, or the saved stage file (pipec/split/, pipec/codegen.py)
- ``plan.summary()``      the text table          (pipec/summary.py)
- ``plan.save(dir)``      the plan directory and its drawings (pipec/codegen.py, pipec/viz/)
- :func:`load`            the plan directory read back and checked (pipec/codegen.py)
- :func:`export_torch`    the plan as torch.distributed.pipelining runs it (pipec/split/torch_export.py)

A plan made in memory and one loaded from disk are the same class and behave
the same; a loaded one has no traced graph and takes its stage modules from
its directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from pipec.codegen import load_plan_data, load_stage_module, lowered_schedule, save_plan
from pipec.errors import PlanError
from pipec.microbatch import flatten_call
from pipec.partitioner.api import partition_model
from pipec.partitioner.config import MemoryLimit
from pipec.plan import Boundary, PlanData, StageInfo
from pipec.schedule.ir import Schedule
from pipec.schedule.simulator import Simulation, simulate_plan
from pipec.split import build_stage_module, check_stage_index
from pipec.split.torch_export import write_torch_export
from pipec.summary import plan_summary
from pipec.types import CostModel, NodeCost, TracedGraph
from pipec.viz.report import REPORT_NAME, render_report
from pipec.viz.svg import schedule_svg


class Plan:
    """A pipeline plan: :class:`~pipec.plan.PlanData` plus what lives in memory only
    (the traced graph, the loss function, the directory it was loaded from).

    ``stage_modules`` gives stages built elsewhere (written by hand, or kept from
    another plan object over the same data): :meth:`stage_module` returns them
    instead of splitting the traced graph or loading the stage files. Each reads
    its inputs and writes its outputs under the names the plan's boundaries use,
    as the generated stages do (their ``input_names`` / ``output_names``)."""

    def __init__(
        self,
        data: PlanData,
        *,
        traced: TracedGraph | None = None,
        loss_fn: Callable[..., Any] | None = None,
        directory: Path | None = None,
        stage_modules: Mapping[int, nn.Module] | None = None,
    ) -> None:
        self.data = data
        self.traced = traced
        self.loss_fn = loss_fn
        self.directory = directory
        self._stage_modules: dict[int, nn.Module] = {}
        for index, module in (stage_modules or {}).items():
            self._stage_modules[check_stage_index(data, index)] = module

    # -- data views -----------------------------------------------------
    @property
    def stages(self) -> list[StageInfo]:
        return list(self.data.stages)

    @property
    def boundaries(self) -> list[Boundary]:
        return list(self.data.boundaries)

    @property
    def node_costs(self) -> dict[str, NodeCost]:
        return dict(self.data.node_costs)

    @property
    def schedule(self) -> Schedule:
        return self.data.schedule

    @property
    def num_stages(self) -> int:
        return self.data.num_stages

    @property
    def num_ranks(self) -> int:
        return self.data.num_ranks

    @property
    def num_microbatches(self) -> int:
        return self.data.num_microbatches

    def with_factory(self, factory: str) -> Plan:
        """The same plan recording the ``FILE.py:FACTORY`` it was built from."""
        return Plan(
            self.data.model_copy(update={"factory": factory}),
            traced=self.traced,
            loss_fn=self.loss_fn,
            directory=self.directory,
            stage_modules=self._stage_modules,
        )

    def flatten_inputs(self, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> tuple[Any, ...]:
        """A call's ``(args, kwargs)`` as one value per graph input (``data.inputs``),
        bound as the trace bound the example (:func:`pipec.microbatch.flatten_call` over
        ``data.input_structure``): the same for a plan in memory and one loaded from disk."""
        if self.data.input_structure is None and self.traced is not None:
            return self.traced.flatten_inputs(args, kwargs)  # plan data made without the structure
        return flatten_call(args, kwargs or {}, self.data.input_structure, self.data.inputs)

    # -- phases ---------------------------------------------------------
    def simulate(self, backend: str | None = None) -> Simulation:
        """Simulate the plan's schedule, as lowered for ``backend`` when the plan was
        made ("gloo" or "nccl"; default NCCL's lowering when there is one, else
        Gloo's), with the plan's own costs."""
        return simulate_plan(self.data, backend)

    def stage_module(self, index: int) -> nn.Module:
        """Stage ``index`` as an ``nn.Module`` whose state_dict keys are the original FQNs:
        split from the traced graph, or (a loaded plan) built from ``stage_<index>.py``
        and its weights. Built once; later calls return the same module."""
        index = check_stage_index(self.data, index)
        if index not in self._stage_modules:
            if self.traced is not None:
                module: nn.Module = build_stage_module(self.traced, self.data, index)
            elif self.directory is not None:
                module = load_stage_module(self.directory, self.data, index)
            else:
                raise PlanError(
                    "this plan has neither a traced graph nor a directory to load its stages from; "
                    "build it with pipec.partition(...) or load it with pipec.load(DIR)"
                )
            self._stage_modules[index] = module
        return self._stage_modules[index]

    def summary(self, measured: Mapping[int, int] | None = None) -> str:
        """The plan's stages as a text table (``pipec show``); ``measured``: peak bytes per
        rank from a run (``pipe.memory_stats().peak_bytes``), shown beside the prediction."""
        return plan_summary(self.data, measured)

    def save(self, directory: str | Path) -> Path:
        """Write the plan directory (plan.json, stage files and weights, schedule,
        run.py, schedule.svg, report.html, manifest) and return its path."""
        drawings = {
            "schedule.svg": schedule_svg(lowered_schedule(self.data)),
            REPORT_NAME: render_report(self.data, traced=self.traced, measured=None),
        }
        return save_plan(
            self.data,
            Path(directory),
            stage_module=self.stage_module,
            source=self.directory,
            drawings=drawings,
        )

    def __repr__(self) -> str:
        d = self.data
        return (
            f"Plan(model={d.model_name!r}, num_stages={d.num_stages}, num_ranks={d.num_ranks}, "
            f"schedule={d.schedule.name!r}, num_microbatches={d.num_microbatches}, "
            f"bottleneck={d.bottleneck:.3g}s)"
        )


def partition(
    model: nn.Module,
    example_inputs: Any,
    *,
    num_stages: int | None = None,
    num_microbatches: int | str | None = None,
    schedule: str | Schedule = "1f1b",
    stages_per_rank: int | str = 1,
    loss_fn: Callable[..., Any] | None = None,
    cost_model: str | Path | CostModel = "profile",
    memory_limit: MemoryLimit = None,
    device_speeds: Sequence[float] | None = None,
    strategy: str = "optimal",
    example_kwargs: Mapping[str, Any] | None = None,
    method: str = "auto",
    optimizer_state_bytes_per_param: int = 8,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    target: Any = None,
    data_parallel: int | str = 1,
    num_devices: int | None = None,
    devices_per_node: int | None = None,
    precision: str = "fp32",
    recompute: str = "none",
    zero: int = 0,
) -> Plan:
    """Split ``model`` into ``num_stages`` pipeline stages with the smallest bottleneck.

    ``example_inputs`` (a tuple of positional arguments, or one tensor) and
    ``example_kwargs`` form one full batch; every tensor in them is split
    along dim 0 into ``num_microbatches`` micro-batches (default: the largest
    divisor of the batch that is at most ``2 * num_ranks``). The model is
    traced and costed on one micro-batch. ``memory_limit`` (a size such as
    ``"80GiB"``, or one per rank) defaults to the cost model's memory capacity.

    ``schedule``, ``num_microbatches`` and ``stages_per_rank`` may each be
    ``"auto"``: :func:`pipec.partitioner.auto.partition_auto` then searches them
    and keeps the fastest simulated configuration that fits memory (see that
    module for how ``num_stages`` is read when ``stages_per_rank="auto"``).
    ``schedule`` may also be a :class:`pipec.Schedule` of your own (compute
    actions; its ``placement`` may be V-shaped, see
    :func:`pipec.schedule.ir.v_placement`): its sizes must be ``num_stages``,
    ``stages_per_rank`` and ``num_microbatches`` (default: the schedule's).

    ``loss_fn`` with ``target`` (the full batch's, split like the inputs; without
    it ``loss_fn(output)`` is called) is profiled with the model when
    ``cost_model="profile"``, and its time and memory count on the last stage.

    What pipelining would change silently is said with a warning here: BatchNorm
    layers that see one micro-batch at a time; random operations the stages
    draw in ``eval()`` too (stochastic depth traced in training mode); and,
    whatever the cost model, a scalar ``loss_fn`` whose mean over the example's
    micro-batches differs from its full-batch loss (padding / ``ignore_index``:
    return ``(loss_sum, count)``), checked in eval mode without gradients.

    ``data_parallel=D`` plans D replicas of the pipeline (``example_inputs`` is
    then the GLOBAL batch, D x ``num_microbatches`` micro-batches), priced on
    nodes of ``devices_per_node`` devices (default: the hardware file's) and
    placed by the faster mesh order. ``data_parallel="auto"`` with
    ``num_devices=N`` searches D x P = N, stages per rank, micro-batches and the
    schedule for the fastest simulated step that fits memory
    (:mod:`pipec.partitioner.hybrid`); ``num_stages`` may then be left out.

    ``precision`` ("fp32", the default; "bf16"; "fp16") is the stages' compute dtype:
    their forward runs under ``torch.autocast`` in it, parameters and their gradients
    stay float32 (master weights), and float tensors cross stages in it (half the
    bytes: the plan's boundaries and the communication the partitioner charges say
    so). The cost model prices it (profiled under autocast; the analytic model at
    the dtype's peak FLOP/s). "fp16" trains with dynamic loss scaling
    (:class:`pipec.LossScaling`, :meth:`pipec.PipelineRuntime.optimizer`). An unknown
    name is a :class:`pipec.PrecisionError`, as is a precision the runtime's device
    cannot compute in (checked when the runtime starts).

    ``recompute`` (activation recompute, per stage; :mod:`pipec.costs.recompute`):
    ``"none"`` (the default: every activation is kept, as without the option),
    ``"full"`` / ``"selective"`` on every stage, or ``"auto"``: the partitioner
    chooses each stage's policy together with the split -- the fastest that fits
    the memory limit, so a plan that fits without recompute gets none. The
    chosen policies are ``plan.stages[k].recompute``.
    """
    found = partition_model(
        model, example_inputs, num_stages=num_stages, num_microbatches=num_microbatches,
        schedule=schedule, stages_per_rank=stages_per_rank, loss_fn=loss_fn, cost_model=cost_model,
        memory_limit=memory_limit, device_speeds=device_speeds, strategy=strategy,
        example_kwargs=example_kwargs, method=method,
        optimizer_state_bytes_per_param=optimizer_state_bytes_per_param, leaf_modules=leaf_modules,
        target=target, data_parallel=data_parallel, num_devices=num_devices, devices_per_node=devices_per_node,
        precision=precision, recompute=recompute, zero=zero,
    )
    return Plan(found.data, traced=found.traced, loss_fn=loss_fn)


def load(directory: str | Path, *, verify: bool = True) -> Plan:
    """The plan saved in ``directory`` (by ``plan.save`` or ``pipec partition -o``),
    every file checked before it is trusted (see :func:`pipec.codegen.load_plan_data`;
    ``verify=False`` skips only the checksums). Its stage modules come from the
    directory's ``stage_<k>.py`` and weights; it has no traced graph."""
    data = load_plan_data(directory, verify=verify)
    return Plan(data, directory=Path(directory))


def export_torch(plan_or_dir: Plan | str | Path, out_dir: str | Path) -> Path:
    """Write the plan (a :class:`Plan`, or a plan directory, loaded and checked) for
    torch.distributed.pipelining to ``out_dir``, atomically, and return it: its
    lowered schedule as torch's pipeline-order CSV and its stage modules for
    ``PipelineStage`` (:func:`pipec.load_torch_stage`); see
    :mod:`pipec.split.torch_export`. Raises :class:`PlanError` naming what torch's
    runtime lacks for plans it cannot run (skip tensors, tied weights across stages)."""
    plan = plan_or_dir if isinstance(plan_or_dir, Plan) else load(plan_or_dir)
    return write_torch_export(plan.data, Path(out_dir), stage_module=plan.stage_module, source=plan.directory)


__all__ = ["Plan", "export_torch", "load", "partition"]
