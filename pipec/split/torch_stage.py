"""A pipec stage as the module a ``torch.distributed.pipelining.PipelineStage`` wraps.

Phase: split (the stage modules), for the torch export
(:mod:`pipec.split.torch_export`). torch's stages pass values positionally: the
first stage's ``forward`` gets the model's arguments (each micro-batch's chunk),
every later stage gets the previous stage's outputs as its arguments, in order,
and the last stage's output goes to ``loss_fn(output, target)``. A pipec stage
takes one value per ``input_names`` and returns one per ``output_names`` (plus
the model's output on the last stage). :class:`TorchStage` adapts the one to the
other, by name: it binds the model's arguments as the trace did (the first
stage), or the previous stage's outputs by their boundary names (the others).
It also keeps every tensor it sends contiguous, its outputs and the gradients
of its inputs: torch sends and receives a tensor with the layout it had
(``empty_strided``), and Gloo refuses a buffer that is not contiguous -- the
input gradients of a ``torch.cat`` are slices of one gradient, for instance.

torch's ``_PipelineScheduleRuntime`` cannot run every plan;
:func:`torch_export_problems` names what a plan needs that it lacks:

- skip tensors: it passes values only from stage ``s`` to stage ``s + 1``
  (``PipelineScheduleMulti`` refuses other edges);
- model inputs read by a stage other than the first: torch hands the
  micro-batch to the first stage only;
- weights shared by two stages (tied embeddings): torch does not all-reduce
  their gradients, pipec's runtime does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pipec.errors import PlanError
from pipec.microbatch import flatten_call
from pipec.plan import InputSpec, PlanData
from pipec.split.stage import StageModule
from pipec.types import InputStructure


class TorchStage(nn.Module):
    """Stage ``stage.index`` with torch's calling convention (module docstring).

    ``self.stage`` is the pipec stage: its ``state_dict`` keys are the original
    FQNs (this module's carry the prefix ``stage.``). On the first stage
    ``inputs`` and ``structure`` bind the model's arguments (the plan's
    ``data.inputs`` and ``data.input_structure``); on the others ``incoming`` names
    the previous stage's outputs, the arguments torch passes."""

    def __init__(
        self,
        stage: StageModule,
        *,
        incoming: Sequence[str] = (),
        inputs: Sequence[InputSpec] = (),
        structure: InputStructure | None = None,
    ) -> None:
        super().__init__()
        self.stage = stage
        self.incoming = tuple(incoming)
        self.inputs = tuple(inputs)
        self.structure = structure
        self.first = stage.index == 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.first:
            values = dict(zip((s.name for s in self.inputs),
                              flatten_call(args, kwargs, self.structure, self.inputs), strict=True))
        else:
            if kwargs or len(args) != len(self.incoming):
                raise PlanError(
                    f"stage {self.stage.index} (torch export): expected the {len(self.incoming)} outputs of "
                    f"stage {self.stage.index - 1} {list(self.incoming)} as positional arguments, found "
                    f"{len(args)} positional and keyword arguments {sorted(kwargs)}; build the torch "
                    "PipelineStages from pipec.load_torch_stage for every stage of one export"
                )
            values = dict(zip(self.incoming, args, strict=True))
        out = self.stage(*(_contiguous_grad(values[name]) for name in self.stage.input_names))
        if self.stage.is_last:
            return out[-1]  # the model's output, for torch's loss_fn(output, target)
        outputs = tuple(o.contiguous() if isinstance(o, torch.Tensor) else o
                        for o in out[: len(self.stage.output_names)])
        return outputs[0] if len(outputs) == 1 else outputs


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward makes the gradient contiguous (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _contiguous_grad(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return _ContiguousGrad.apply(value)  # type: ignore[no-untyped-call]
    return value


def pipec_stage(stage_module: Callable[[int], nn.Module], index: int) -> StageModule:
    """``stage_module(index)``, checked to be a pipec stage module."""
    module = stage_module(index)
    if not isinstance(module, StageModule):
        raise PlanError(f"stage {index} is a {type(module).__name__}, not a pipec StageModule")
    return module


def torch_export_problems(data: PlanData, stages: Sequence[StageModule]) -> list[str]:
    """What the plan ``data`` (with its stage modules ``stages``) needs that torch's
    ``_PipelineScheduleRuntime`` and ``PipelineStage`` lack (module docstring); empty
    when it can run there."""
    problems = []
    skips = [b for b in data.boundaries if tuple(b.consumer_stages) != (b.producer_stage + 1,)]
    if skips:
        shown = ", ".join(f"{b.name} (stage {b.producer_stage} -> {list(b.consumer_stages)})" for b in skips[:3])
        problems.append(
            f"{len(skips)} boundary tensor(s) go to a stage other than the next one: {shown}; torch's "
            "runtime passes values only from stage s to stage s + 1 (no skip connections)")
    later = {s.index: list(s.graph_input_names) for s in stages if s.index > 0 and s.graph_input_names}
    if later:
        shown = ", ".join(f"stage {k} reads {names}" for k, names in list(later.items())[:3])
        problems.append(
            f"model inputs are read by stages after the first ({shown}); torch hands the micro-batch "
            "to the first stage only")
    tied = [g for g in data.tied_groups if len(set(g.stages)) > 1]
    if tied:
        problems.append(
            f"weight(s) {[g.fqn for g in tied[:3]]} are shared by several stages "
            f"({[list(g.stages) for g in tied[:3]]}); torch's runtime does not all-reduce their "
            "gradients as pipec's does")
    if data.data_parallel > 1:
        problems.append(
            f"the plan has {data.data_parallel} data-parallel replicas; the export runs one pipeline "
            "(torch's runtime does not reduce gradients across replicas: wrap its stages in DDP/FSDP "
            "yourself, or export a plan made with data_parallel=1)")
    if data.precision != "fp32":
        problems.append(
            f"the plan's precision is {data.precision}; the exported stage modules run without pipec's "
            "autocast, boundary casts and loss scaling (export a plan made with precision='fp32' and "
            "add torch.autocast yourself)")
    return problems


def check_torch_exportable(data: PlanData, stages: Sequence[StageModule]) -> None:
    """Raise :class:`PlanError` naming each limitation of torch's runtime the plan hits."""
    problems = torch_export_problems(data, stages)
    if problems:
        raise PlanError(
            "this plan cannot run on torch.distributed.pipelining's _PipelineScheduleRuntime: "
            + "; ".join(problems)
            + ". Run it with pipec's runtime (pipec run / pipec.PipelineRuntime), or re-partition so "
            "that the stages form a chain and only the first reads the model's inputs"
        )


def draws_random(module: nn.Module) -> bool:
    """Whether the pipec stage ``module`` has random operations: pipec seeds them per
    (seed, step, micro-batch, node) inside its runtime; under torch's they draw from
    the global generator, so the numbers differ from pipec's run."""
    code = getattr(module, "code", None)
    if not isinstance(code, str):
        try:
            code = inspect.getsource(type(module))
        except (OSError, TypeError):
            return False
    return "seeded(" in code


__all__ = [
    "TorchStage", "check_torch_exportable", "draws_random", "pipec_stage", "torch_export_problems",
]
