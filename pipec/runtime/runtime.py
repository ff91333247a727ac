"""``PipelineRuntime``: this rank's stages of a plan, trained or run under any schedule.

Phase: stage runtime, the last phase. Input: a :class:`~pipec.plan.Plan` (or a
directory saved by ``plan.save``) inside a torch.distributed process group
(torchrun, ``pipec run``). It builds this rank's stage modules, lowers the
plan's schedule (adding SEND/RECV actions) and hands both to the one
:class:`~pipec.runtime.executor.Executor`. Every rank passes the full batch to
:meth:`PipelineRuntime.step`; gradients accumulate into the local parameters
exactly as ``loss_fn(model(*inputs), target).backward()`` would for a
mean-reduced loss, and tied parameters get the sum over every rank holding them.

Usage (one process per rank)::

    pipe = pipec.PipelineRuntime("plan_dir", loss_fn=torch.nn.functional.cross_entropy)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    loss = pipe.step(x, target=y)   # mean loss on the last rank, None elsewhere
    opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from pipec.errors import ConfigError, PlanError
from pipec.plan import Plan
from pipec.runtime.comm import P2P, ProcessGroupInfo, init_process_group
from pipec.runtime.executor import Executor, StepResult
from pipec.runtime.microbatch import bind_inputs, merge_outputs, split_inputs, split_target
from pipec.runtime.routing import StageRoutes, build_routes
from pipec.runtime.tied import TiedGradReducer, share_local_parameters
from pipec.runtime.timeline import TimelineEvent, TimelineLog, write_chrome_trace
from pipec.schedule.ir import Schedule

log = logging.getLogger(__name__)


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _as_plan(plan_or_dir: Plan | str | os.PathLike[str]) -> Plan:
    if isinstance(plan_or_dir, Plan):
        return plan_or_dir
    if isinstance(plan_or_dir, (str, os.PathLike)):
        from pipec.codegen import load

        plan: Plan = load(Path(plan_or_dir))
        return plan
    raise ConfigError(
        f"PipelineRuntime: expected a pipec.Plan or a plan directory, found {type(plan_or_dir).__name__}"
    )


def _names(module: nn.Module, stage: int, attr: str) -> tuple[str, ...]:
    value = getattr(module, attr, None)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise PlanError(
            f"stage module {stage} ({type(module).__name__}) has no {attr} (a tuple of tensor names); "
            "the runtime needs the stage modules pipec.split builds, re-create the plan"
        )
    return tuple(value)


def _grad_flags(module: nn.Module) -> dict[str, bool] | None:
    flags = getattr(module, "requires_grad", None)
    if isinstance(flags, Mapping):
        return {str(k): bool(v) for k, v in flags.items()}
    return None


def _lowered(plan: Plan, backend: str | None) -> Schedule:
    schedule = plan.schedule
    if schedule.num_ranks != plan.num_ranks or schedule.num_stages != plan.num_stages:
        raise PlanError(
            f"the plan has {plan.num_stages} stages on {plan.num_ranks} ranks but its schedule "
            f"{schedule.name!r} has {schedule.num_stages} stages on {schedule.num_ranks} ranks; re-create the plan"
        )
    if schedule.is_lowered:
        return schedule
    from pipec.errors import ScheduleError
    from pipec.schedule.lowering import lower

    try:
        return lower(schedule, plan.data.boundaries)
    except ScheduleError:
        # Interleaved placement with skip tensors can need a per-pair message order
        # that one RECV per (stage, micro-batch) cannot give. NCCL needs that order;
        # Gloo matches messages by tag, so there the plain order is safe.
        if backend == "nccl":
            raise
        log.info("lowering %s without per-pair ordering (messages matched by tag on %s)",
                 schedule.name, backend)
        return lower(schedule, plan.data.boundaries, match_pair_order=False)


class PipelineRuntime:
    """Runs this rank's stages of ``plan_or_dir``.

    ``loss_fn(output, target)`` (or ``loss_fn(output)`` when no target is
    given) must return a mean-reduced scalar; it defaults to the plan's.
    ``device`` defaults to ``cuda:<local rank>`` under NCCL, else the CPU;
    ``backend`` ("gloo" / "nccl") is used only when this call initialises the
    process group from torchrun's environment.
    """

    def __init__(
        self,
        plan_or_dir: Plan | str | os.PathLike[str],
        loss_fn: Callable[..., Any] | None = None,
        *,
        device: str | torch.device | None = None,
        backend: str | None = None,
    ) -> None:
        plan = _as_plan(plan_or_dir)
        self.plan = plan
        self.loss_fn = loss_fn if loss_fn is not None else plan.loss_fn
        self.info: ProcessGroupInfo = init_process_group(plan.num_ranks, backend=backend, device=device)
        self.schedule = _lowered(plan, self.info.backend)
        self.rank = self.info.rank
        self.device = self.info.device
        self.num_microbatches = plan.num_microbatches
        self.stage_indices = self.schedule.stages_of(self.rank)
        self.stage_modules: dict[int, nn.Module] = {
            s: plan.stage_module(s).to(self.device) for s in self.stage_indices
        }
        self._params = share_local_parameters(self.stage_modules)
        self._routes: dict[int, StageRoutes] = {
            s: build_routes(
                s,
                _names(m, s, "input_names"),
                _names(m, s, "output_names"),
                boundaries=plan.data.boundaries,
                num_stages=plan.num_stages,
                requires_grad=_grad_flags(m),
            )
            for s, m in self.stage_modules.items()
        }
        self.is_last = (plan.num_stages - 1) in self.stage_modules
        p2p = None
        if self.info.world_size > 1:
            p2p = P2P(
                self.info,
                self._routes,
                boundaries=plan.data.boundaries,
                rank_of=self.schedule.rank_of,
                num_stages=plan.num_stages,
                num_microbatches=plan.num_microbatches,
            )
        self._tied = TiedGradReducer(
            plan.data.tied_groups, rank_of=self.schedule.rank_of, info=self.info, params=self._params
        )
        self._executor = Executor(
            rank=self.rank,
            stages=self.stage_modules,
            routes=self._routes,
            actions=self.schedule.actions[self.rank],
            rank_of=self.schedule.rank_of,
            p2p=p2p,
            num_microbatches=plan.num_microbatches,
            device=self.device,
        )
        self._needed_inputs = {n for r in self._routes.values() for n in r.graph_inputs()}
        self._timelines = TimelineLog()
        self._step = 0
        log.info(
            "rank %d: stages %s on %s, %d actions, schedule %s",
            self.rank,
            list(self.stage_indices),
            self.device,
            len(self.schedule.actions[self.rank]),
            self.schedule.name,
        )

    # -- running -----------------------------------------------------------
    def _microbatches(self, inputs: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[dict[str, Any]]:
        specs = self.plan.data.inputs
        if self.plan.traced is not None:
            values = self.plan.traced.flatten_inputs(inputs, kwargs)
        else:
            values = bind_inputs(inputs, kwargs, specs)
        return split_inputs(values, specs, self.num_microbatches, self.device, self._needed_inputs)

    def step(self, *inputs: Any, target: Any = None, **kwargs: Any) -> torch.Tensor | None:
        """One training step on the full batch (every rank passes it).

        Returns the mean of the micro-batch losses on the rank holding the last
        stage, None elsewhere. Gradients accumulate into :meth:`parameters`;
        call your optimizer's ``step`` and ``zero_grad`` afterwards.
        """
        if self.loss_fn is None:
            raise ConfigError(
                "PipelineRuntime.step needs a loss function: pass loss_fn to PipelineRuntime(...) "
                "or to pipec.partition(..., loss_fn=...)"
            )
        microbatches = self._microbatches(inputs, kwargs)
        targets = None
        if self.is_last and target is not None:
            targets = split_target(target, self.num_microbatches, self.device)
        self._tied.begin_step()
        result = self._executor.run(
            microbatches, targets=targets, loss_fn=self.loss_fn, train=True, step=self._step
        )
        self._tied.end_step()
        self._record(result)
        if not self.is_last:
            return None
        return torch.stack([result.losses[m] for m in range(self.num_microbatches)]).mean()

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Inference on the full batch: the model's output (micro-batches concatenated
        along dim 0) on the rank holding the last stage, None elsewhere."""
        microbatches = self._microbatches(inputs, kwargs)
        with torch.no_grad():
            result = self._executor.run(microbatches, train=False, step=self._step)
        self._record(result)
        if not self.is_last:
            return None
        return merge_outputs([result.outputs[m] for m in range(self.num_microbatches)])

    __call__ = forward

    def _record(self, result: StepResult) -> None:
        self._timelines.add(self._step, result.started, result.timeline)
        self._step += 1

    def train(self, mode: bool = True) -> PipelineRuntime:
        for m in self.stage_modules.values():
            m.train(mode)
        return self

    def eval(self) -> PipelineRuntime:
        return self.train(False)

    # -- parameters and state ----------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under their original FQNs, each once."""
        seen: set[int] = set()
        for name, p in self._params.items():
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's parameters and buffers under their original FQNs (tied ones once)."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()  # a tied tensor under an alias name counts once
        for s in sorted(self.stage_modules):
            for k, v in self.stage_modules[s].state_dict(keep_vars=True).items():
                if k not in out and id(v) not in seen:
                    seen.add(id(v))
                    out[k] = v.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> LoadResult:
        """Load this rank's entries of ``state_dict`` (this rank's or the whole model's).

        With ``strict``, every local key must be present, and -- when the plan
        still knows the model's parameters -- every key must belong to the model.
        """
        local = self.state_dict()
        missing = [k for k in local if k not in state_dict]
        unexpected: list[str] = []
        if self.plan.traced is not None:
            known = set(local)
            for info in self.plan.traced.params.values():
                known.add(info.fqn)
                known.update(info.aliases)
            unexpected = [k for k in state_dict if k not in known]
        if strict and (missing or unexpected):
            raise ConfigError(
                f"load_state_dict on rank {self.rank}: missing keys {missing[:10]}, unexpected keys "
                f"{unexpected[:10]}; pass the original model's state_dict (original FQNs) or strict=False"
            )
        for module in self.stage_modules.values():
            part = {k: state_dict[k] for k in module.state_dict() if k in state_dict}
            module.load_state_dict(part, strict=False)
        return LoadResult(missing, unexpected)

    # -- timelines ----------------------------------------------------------
    def timeline(self) -> list[TimelineEvent]:
        """``(start, end, rank, action)`` of this rank's last step, seconds from its start."""
        return self._timelines.last()

    def save_timeline(self, path: str | os.PathLike[str]) -> Path:
        """Write this rank's recent steps as Chrome trace JSON (see :mod:`pipec.runtime.timeline`)."""
        return write_chrome_trace(Path(path), self._timelines.steps())

    def __repr__(self) -> str:
        return (
            f"PipelineRuntime(rank={self.rank}, stages={list(self.stage_indices)}, "
            f"schedule={self.schedule.name!r}, num_microbatches={self.num_microbatches}, device={self.device})"
        )
