"""``PipelineRuntime``: this rank's stages of a plan, trained or run under any schedule.

Phase: stage runtime, the last phase. Input: a :class:`pipec.Plan` (or a
directory saved by ``plan.save``) inside a torch.distributed process group
(torchrun, ``pipec run``). It builds this rank's stage modules, lowers the
plan's schedule (adding SEND/RECV actions) and hands both to the one
:class:`~pipec.runtime.executor.Executor`. Every rank passes the full batch to
:meth:`PipelineRuntime.step` -- with D replicas (``partition(..., data_parallel=D)``),
every rank of replica ``d`` passes that replica's batch, rows ``[d b, (d + 1) b)`` of
the global batch (:func:`pipec.microbatch.replica_share`; ``pipe.data_parallel_rank``
and ``pipe.data_parallel_size`` for a ``DistributedSampler``), the gradients are summed
over the replicas per stage as soon as its backward is done
(:mod:`pipec.runtime.data_parallel`) and the loss returned is the global one; gradients accumulate into the local parameters
exactly as ``loss_fn(model(*inputs), target).backward()`` would for a
mean-reduced loss (or of ``sum(loss_sum) / sum(count)`` for a ``loss_fn``
returning ``(loss_sum, count)``, :mod:`pipec.runtime.loss_scale`), and tied
parameters get the sum over every rank holding them.

Usage (one process per rank)::

    pipe = pipec.PipelineRuntime("plan_dir", loss_fn=torch.nn.functional.cross_entropy)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    loss = pipe.step(x, target=y)   # mean loss on the last rank, None elsewhere
    opt.step(); opt.zero_grad()
    pipe.save_checkpoint("ckpt", optimizer=opt, step=k)   # collective; resume with load_checkpoint

Mixed precision is the plan's (``pipec.partition(..., precision="bf16")``): the
stages run under autocast, parameters and gradients stay float32. Under "fp16"
the loss is scaled (:mod:`pipec.runtime.amp`): build the optimizer with
:meth:`PipelineRuntime.optimizer` (its ``step()`` skips an overflowed step on
every rank and updates the scale) or call :meth:`PipelineRuntime.optimizer_step`;
the loop above is otherwise unchanged.

No wait lasts longer than ``timeout`` seconds, and a rank that fails tells
the others through the c10d store (:mod:`pipec.runtime.failure`): when any
rank raises or dies during a step, every rank raises a ``RuntimeFailure``
(a :class:`~pipec.runtime.failure.PeerFailure` on the others) within about a
second, or ``heartbeat_timeout`` seconds for a stopped process. The same
holds while the runtime is built (a rank that fails there, or dies before the
tied-parameter subgroups exist, stops its peers, named) and for the c10d
store: no store operation lasts longer than ``min(timeout, heartbeat_timeout)``,
and a store whose host is gone (rank 0, when not launched by torchrun) is a
``PeerFailure`` naming that rank. A failed pipeline runs no more steps:
restart every rank and resume from a checkpoint (``pipec run DIR
--max-restarts N`` does it for you; a checkpoint loads into any layout).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, overload

import torch
import torch.distributed as dist
from torch import nn

from pipec.costs.precision import check_device_precision
from pipec.errors import ConfigError, NonfiniteError, RuntimeFailure
from pipec.facade import Plan
from pipec.microbatch import (
    merge_outputs,
    plan_shapes,
    split_inputs,
    split_target,
    step_shapes,
)
from pipec.runtime.agree import any_rank
from pipec.runtime.amp import LossScaler, LossScaling, is_wrapped, wrap_optimizer_step
from pipec.runtime.checkpoint import RankView, load_checkpoint, save_checkpoint
from pipec.runtime.clipping import check_norm_type, global_grad_norm, scale_grads
from pipec.runtime.comm import P2P, ProcessGroupInfo, ReceiveCounts, init_process_group
from pipec.runtime.data_parallel import DEFAULT_BUCKET_BYTES, DataParallelReducer, last_backward
from pipec.runtime.executor import Executor, StepResult
from pipec.runtime.failure import (
    FailureMonitor,
    FailureRecord,
    PeerFailure,
    create_monitor,
    record_of,
)
from pipec.runtime.gloo_io import calm_gloo_io_threads
from pipec.runtime.loss_scale import CountNormalizer
from pipec.runtime.memory import MemoryMeter, MemoryStats
from pipec.runtime.mesh import Mesh, build_mesh, position
from pipec.runtime.nonfinite import (
    FORWARD,
    NonfiniteWatch,
    agree_first,
    check_policy,
    locate_node,
    share_text,
)
from pipec.runtime.parent_death import die_with_parent
from pipec.runtime.routing import StageRoutes, build_routes
from pipec.runtime.setup import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_TIMEOUT,
    as_plan,
    grad_flags,
    lowered_schedule,
    resolve_seed,
    seconds,
    tensor_names,
)
from pipec.runtime.tied import TiedGradReducer, share_local_parameters
from pipec.runtime.timeline import TimelineEvent, TimelineLog, write_chrome_trace
from pipec.runtime.waiting import Waiter
from pipec.runtime.zero import consolidate, zero_optimizer
from pipec.timeline_format import ALLREDUCE

_Optimizer = TypeVar("_Optimizer", bound=torch.optim.Optimizer)

log = logging.getLogger(__name__)


def _shapes_text(specs: Sequence[Any], shapes: Sequence[Any]) -> str:
    return ", ".join(f"{s.name} {tuple(shape)}" for s, shape in zip(specs, shapes) if shape is not None)


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class PipelineRuntime:
    """Runs this rank's stages of ``plan_or_dir``.

    ``loss_fn(output, target)`` (or ``loss_fn(output)`` when no target is
    given) returns the micro-batch's mean loss (a scalar tensor), or a tuple
    ``(loss_sum, count)`` -- the loss summed over the micro-batch's items and
    their number (a token-mean loss with padding, Hugging Face's
    ``num_items_in_batch``) -- for a step loss of ``sum(loss_sum) / sum(count)``
    over the whole batch (:mod:`pipec.loss`). It defaults to the plan's.
    ``device`` defaults to ``cuda:<local rank>`` under NCCL, else the CPU;
    ``backend`` ("gloo" / "nccl") is used only when this call initialises the
    process group from torchrun's environment. ``timeout`` (default
    ``$PIPEC_TIMEOUT`` or 300 s) bounds every wait for a peer, joining the
    process group included; ``heartbeat_timeout`` (default
    ``$PIPEC_HEARTBEAT_TIMEOUT`` or 30 s) is how long a peer, or the c10d
    store, may stay silent before it counts as unreachable. Building the
    runtime raises :class:`~pipec.runtime.failure.PeerFailure` when another
    rank failed or is gone, or the store's host is.

    ``seed`` seeds every random operation of the stages (dropout, ...): node
    ``n`` of micro-batch ``m`` in step ``k`` draws from ``(seed, k, m, n)``, so
    runs with the same seed give the same losses and gradients whatever the
    stage layout or schedule, and :func:`pipec.reference_step` reproduces them
    in one process. It defaults to ``torch.initial_seed()``: call
    ``torch.manual_seed(s)`` with the same ``s`` on every rank before creating
    the runtime for a reproducible run. ``step`` counts :meth:`step` and
    :meth:`forward` calls (from a loaded checkpoint's step).

    The stages start in the mode the model was traced in; :meth:`train` and
    :meth:`eval` switch dropout and batch norm as on the original model.

    A plan of D replicas (``pipec.partition(..., data_parallel=D)``) runs on
    ``D x num_ranks`` processes laid out by ``plan.data.mesh_order``
    (:mod:`pipec.runtime.mesh`): point-to-point inside each replica, gradients
    summed across replicas per stage in buckets of ``bucket_bytes`` (25 MiB by
    default), each stage's all-reduce starting once its backward for the step
    is done (:mod:`pipec.runtime.data_parallel`). ``zero=1`` makes
    :meth:`optimizer` shard the optimizer state over the replicas (ZeRO-1,
    :mod:`pipec.runtime.zero`); ``zero=None`` (default) takes the plan's
    (``pipec.partition(..., zero=1)``, whose memory counts a 1/D share). With replicas, ``seed`` draws micro-batch ``m`` of
    replica ``d`` as global micro-batch ``d * M + m``: dropout equals one process
    running the global batch.

    ``loss_scaling`` (:class:`~pipec.runtime.amp.LossScaling`) sets float16's dynamic
    loss scale: initial scale, growth and backoff factors, growth interval (torch
    GradScaler's defaults). A plan precision this device cannot compute in is a
    :class:`~pipec.errors.PrecisionError` here.

    ``nonfinite`` (default ``"raise"``): each step checks its loss and gradients on
    every rank (one all-reduce of one number, plus a finiteness reduction per boundary
    tensor and one over the gradients; :mod:`pipec.runtime.nonfinite`). A non-finite
    value raises :class:`~pipec.errors.NonfiniteError` on every rank, naming the
    first stage, micro-batch and node where it appeared; ``"skip"`` instead drops
    every rank's gradients (the optimizer's ``step()`` changes nothing), counts the
    step in :attr:`skipped_steps` and logs it; ``"off"`` checks nothing. Under float16 loss scaling
    the scaler owns non-finite gradients (an overflow skips the step on every rank and
    lowers the scale, as ``torch.amp.GradScaler`` does), so this check is off there.
    """

    def __init__(
        self,
        plan_or_dir: Plan | str | os.PathLike[str],
        loss_fn: Callable[..., Any] | None = None,
        *,
        device: str | torch.device | None = None,
        backend: str | None = None,
        timeout: float | None = None,
        heartbeat_timeout: float | None = None,
        seed: int | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        zero: int | None = None,
        loss_scaling: LossScaling | None = None,
        track_memory: bool = False,
        nonfinite: str = "raise",
    ) -> None:
        if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: never outlive it
            die_with_parent()
        plan = as_plan(plan_or_dir)
        if zero is None:  # the plan's: a plan made with zero=1 counted a 1/D share of the state
            zero = plan.data.zero
        if zero not in (0, 1) or isinstance(zero, bool):
            raise ConfigError(f"zero: expected 0 (off) or 1 (ZeRO-1: optimizer state sharded over the "
                              f"replicas), found {zero!r}")
        self._zero = zero == 1
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ConfigError(f"bucket_bytes: expected a size in bytes >= 1, found {bucket_bytes!r}; "
                              f"pass e.g. {DEFAULT_BUCKET_BYTES} (25 MiB, as DDP)")
        self._bucket_bytes = bucket_bytes
        self.precision = plan.data.precision
        self.loss_scaling = loss_scaling if loss_scaling is not None else LossScaling()
        if not isinstance(self.loss_scaling, LossScaling):
            raise ConfigError(f"loss_scaling: expected a pipec.LossScaling, found {type(loss_scaling).__name__}")
        self.nonfinite = check_policy(nonfinite)
        self.skipped_steps = 0  # steps whose update was skipped for a non-finite value (nonfinite="skip")
        self.seed = resolve_seed(seed)
        self.plan = plan
        self.loss_fn = loss_fn if loss_fn is not None else plan.loss_fn
        self.timeout = seconds(timeout, "PIPEC_TIMEOUT", DEFAULT_TIMEOUT)
        self.heartbeat_timeout = seconds(heartbeat_timeout, "PIPEC_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT)
        data = plan.data
        self.info: ProcessGroupInfo = init_process_group(
            data.world_size, backend=backend, device=device, timeout=self.timeout,
            data_parallel=data.data_parallel,
        )
        self.schedule = lowered_schedule(plan, self.info.backend)
        self.rank = self.info.rank  # global
        self.device = self.info.device
        check_device_precision(self.device, self.precision)  # the same answer on every rank
        self.num_microbatches = plan.num_microbatches
        # this rank's place among the replicas; the DeviceMesh's groups come in _connect
        self.pp_rank, self.dp_rank = position(data, self.rank)
        self.mesh = Mesh(rank=self.rank, pp_rank=self.pp_rank, dp_rank=self.dp_rank, num_ranks=data.num_ranks,
                         data_parallel=data.data_parallel, mesh_order=data.mesh_order)
        self.stage_indices = self.schedule.stages_of(self.pp_rank)
        self.stage_modules: dict[int, nn.Module] = {
            s: plan.stage_module(s).to(self.device) for s in self.stage_indices
        }
        self._params = share_local_parameters(self.stage_modules)
        self._routes: dict[int, StageRoutes] = {
            s: build_routes(
                s,
                tensor_names(m, s, "input_names"),
                tensor_names(m, s, "output_names"),
                boundaries=plan.data.boundaries,
                num_stages=plan.num_stages,
                requires_grad=grad_flags(m),
            )
            for s, m in self.stage_modules.items()
        }
        self.is_last = (plan.num_stages - 1) in self.stage_modules
        self.monitor: FailureMonitor | None = None  # heartbeats and the failure record (see the class doc)
        self._failure: FailureRecord | None = None
        if self.info.distributed and self.info.world_size > 1:
            # raises PeerFailure, naming the store's host, when that host is gone
            self.monitor = create_monitor(
                rank=self.rank, world_size=self.info.world_size, heartbeat_timeout=self.heartbeat_timeout,
                store_timeout=min(self.timeout, self.heartbeat_timeout),
            )
        self._waiter = Waiter(rank=self.rank, timeout=self.timeout, monitor=self.monitor,
                              inline=self.info.backend == "nccl")
        # measured memory per step (pipe.memory_stats()): the CUDA allocator, or on a CPU
        # the runtime's own count when track_memory=True (pipec.runtime.memory)
        self._memory = MemoryMeter(self.device, track_cpu=track_memory)
        self._optimizers: weakref.WeakSet[Any] = weakref.WeakSet()
        try:
            self._connect(plan)
        except BaseException as exc:
            # peers waiting for this rank (in the setup barrier, or later) stop at once
            self._on_failure(exc, setup=True)
            self.close()
            raise
        if self.info.backend == "gloo":
            calm_gloo_io_threads()  # every group exists now (pipec.runtime.gloo_io says why)
        # under loss scaling an inf/NaN gradient is an overflow the scaler handles (skip, lower the scale)
        self._watch = NonfiniteWatch() if self.nonfinite != "off" and not self.scaler.enabled else None
        self._executor.watch = self._watch
        self._needed_inputs = {n for r in self._routes.values() for n in r.graph_inputs()}
        self._timelines = TimelineLog()
        self._allreduce_pending = False
        self._step = 0
        log.info(
            "rank %d: stages %s on %s, %d actions, schedule %s",
            self.rank,
            list(self.stage_indices),
            self.device,
            len(self.schedule.actions[self.pp_rank]),
            self.schedule.name,
        )

    def _connect(self, plan: Plan) -> None:
        """The parts that talk to the other ranks: point-to-point routes, the tied-parameter
        subgroups (collective: after a barrier that stops when a rank failed or is gone), the
        executor."""
        self._saves = 0
        replicated = self.data_parallel_size > 1 and self.info.distributed
        if replicated:  # init_device_mesh creates its groups collectively, on every rank
            self._barrier("mesh", "waiting for every rank to set up the data x pipeline DeviceMesh")
            self.mesh = build_mesh(plan.data, rank=self.rank, device=self.device, distributed=True)
        mesh = self.mesh
        pp_rank_of = self.schedule.rank_of

        def rank_of(stage: int) -> int:  # the global rank of ``stage`` in this replica
            return mesh.global_rank(pp_rank_of(stage))

        p2p = None
        if plan.num_ranks > 1:
            p2p = P2P(
                self.info,
                self._routes,
                boundaries=plan.data.boundaries,
                rank_of=rank_of,
                num_stages=plan.num_stages,
                num_microbatches=plan.num_microbatches,
                waiter=self._waiter,
                actions=self.schedule.actions,
                pipeline_rank=self.pp_rank,
                to_global=mesh.global_rank,
            )
        self._p2p = p2p
        self._plan_shapes = plan_shapes(plan.data.inputs)
        if any(len({pp_rank_of(s) for s in g.stages}) > 1 or replicated for g in plan.data.tied_groups):
            self._barrier("tied", "waiting for every rank to set up the tied-parameter groups")
        self._tied = TiedGradReducer(
            plan.data.tied_groups, rank_of=pp_rank_of, info=self.info, params=self._params,
            waiter=self._waiter, timeout=self.timeout, mesh=mesh if replicated else None,
        )
        actions = self.schedule.actions[self.pp_rank]
        self._executor = Executor(
            rank=self.rank,
            stages=self.stage_modules,
            routes=self._routes,
            actions=actions,
            rank_of=rank_of,
            p2p=p2p,
            num_microbatches=plan.num_microbatches,
            device=self.device,
            seed=self.seed,
            microbatch_offset=self.dp_rank * plan.num_microbatches,
            precision=self.precision,
            recompute={s: plan.data.stages[s].recompute for s in self.stage_indices},
        )
        self._dp: DataParallelReducer | None = None
        if replicated:
            done = last_backward(actions)
            self._dp = DataParallelReducer(
                self.stage_modules, order=sorted(self.stage_modules, key=lambda s: done.get(s, -1)),
                exclude=self._tied.param_ids(), group=mesh.dp_group,
                peers=[r for r in mesh.replica_ranks() if r != self.rank], waiter=self._waiter,
                clock=self._executor.clock, bucket_bytes=self._bucket_bytes,
            )
            self._executor.after_backward = self._dp.launch
        self._counts = CountNormalizer(
            info=self.info, source=rank_of(plan.num_stages - 1),
            params=lambda: list(self.parameters()), waiter=self._waiter, mesh=mesh if replicated else None,
        )
        self.scaler = LossScaler(self.loss_scaling, precision=self.precision, info=self.info,
                                 waiter=self._waiter, params=lambda: list(self.parameters()))

    def _barrier(self, name: str, what: str) -> None:
        """Wait until every rank has called ``_barrier(name)``, through the c10d store: stops
        with a PeerFailure when a rank failed (published), stopped answering or died
        (heartbeats), or the store is gone, and after ``timeout`` seconds."""
        if self.monitor is None:
            return
        store, key, world_size = self.monitor.store, f"barrier/{name}", self.info.world_size
        store.add(key, 1)
        others = [r for r in range(world_size) if r != self.rank]
        self._waiter.poll(lambda: store.add(key, 0) >= world_size, what, others)

    # -- running -----------------------------------------------------------
    def _microbatches(self, inputs: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Split the batch and tell P2P and the executor the step's input shapes: a batch
        size or sequence length other than the plan's runs (:mod:`pipec.runtime.comm`)."""
        specs = self.plan.data.inputs
        values = self.plan.flatten_inputs(inputs, kwargs)
        microbatches = split_inputs(values, specs, self.num_microbatches, self.device, self._needed_inputs)
        shapes = step_shapes(values, specs, self.num_microbatches)
        planned = shapes == self._plan_shapes
        if self._p2p is not None:
            self._p2p.begin_step(shapes, planned=planned)
        self._executor.shape_note = None if planned else (
            f"this step's micro-batch input shapes {_shapes_text(specs, shapes)} differ from the plan's "
            f"{_shapes_text(specs, self._plan_shapes)}"
        )
        return microbatches

    def step(self, *inputs: Any, target: Any = None, **kwargs: Any) -> torch.Tensor | None:
        """One training step on the full batch (every rank passes it).

        With D replicas (``data_parallel=D``) every rank of replica ``d`` passes
        its REPLICA's batch instead -- the global batch's rows ``[d b, (d + 1) b)``,
        ``b = batch / D`` (:func:`pipec.microbatch.replica_share`, or a
        ``DistributedSampler`` with ``num_replicas=pipe.data_parallel_size``,
        ``rank=pipe.data_parallel_rank`` and ``drop_last=True``) -- and the loss
        and gradients are those of the global batch.

        Returns the mean of the micro-batch losses on the rank holding the last
        stage -- ``sum(loss_sum) / sum(count)`` over the batch when ``loss_fn``
        returns ``(loss_sum, count)``; with replicas, over every replica's
        micro-batches, the same on each replica's last rank -- and None elsewhere.
        Gradients accumulate into :meth:`parameters` (those of that loss on the
        whole batch); call your optimizer's ``step`` and ``zero_grad`` afterwards.

        The batch may have any size that splits into ``num_microbatches`` equal
        micro-batches, and other sizes than the plan's example in its other
        dimensions (a sequence length), as long as the stage code follows them:
        code traced with the example's sizes baked in (torch.export specialises
        views) fails on every rank, naming the stage and node. The first step of
        each new input shape sends a small shape header with every boundary
        tensor (:mod:`pipec.runtime.comm`); later ones run as fast as the plan's.

        Gradient accumulation: gradients of several calls add up (no ``zero_grad`` in
        between). Each call's gradient is that of its own batch's mean loss, so ``k``
        calls on ``k`` equal parts of a batch give ``k`` times the full batch's
        gradient: divide the loss by ``k`` (``loss_fn=lambda o, t: F.mse_loss(o, t) / k``)
        or the learning rate, for the gradient of one step on the whole batch.

        Under float16 loss scaling the loss is multiplied by :attr:`loss_scale` on the
        last stage and the gradients divided by it after the schedule: ``.grad`` holds
        unscaled gradients, and the loss returned is unscaled. An inf/NaN gradient on
        any rank sets :attr:`found_inf` on every rank (collective check); the next
        optimizer step through :meth:`optimizer_step` (or an optimizer from
        :meth:`optimizer`) is then skipped everywhere.
        """
        if self.loss_fn is None:
            raise ConfigError(
                "PipelineRuntime.step needs a loss function: pass loss_fn to PipelineRuntime(...) "
                "or to pipec.partition(..., loss_fn=...)"
            )
        self._check_usable()
        self._resolve_allreduce()
        try:
            microbatches = self._microbatches(inputs, kwargs)
            targets = None
            if self.is_last and target is not None:
                targets = split_target(target, self.num_microbatches, self.device)
            self._tied.begin_step()
            self._counts.begin_step()  # after the tied reducer's: tied gradients are set aside there
            if self._dp is not None:
                self._dp.begin_step()
            self.scaler.begin_step()  # after the count normaliser's: the rest of the earlier gradients
            self._executor.loss_scale = self.scaler.scale
            if self._watch is not None:
                self._watch.begin_step()
            with self._memory.step(self._model_state()):
                result = self._executor.run(
                    microbatches, targets=targets, loss_fn=self.loss_fn, train=True, step=self._step
                )
            if self._p2p is not None:
                self._p2p.end_step()
            self._finish_data_parallel(result)  # summed over the replicas: before the division
            count = self._counts.end_step(result.counts, self._step)
            # a mean loss: the replicas' sum / D; a count loss was divided by the global count
            scale = 1.0 / self.data_parallel_size if self._dp is not None and count is None else None
            if scale is not None and self._dp is not None:
                for p in self._dp.params():
                    if p.grad is not None:
                        p.grad.mul_(scale)
            self.scaler.unscale(self._step)  # collective when scaling: every rank learns of an overflow
            self._end_step_timed(scale)
            where = self._find_nonfinite() if self._watch is not None else None
            self._counts.restore()
            self.scaler.restore()
            if where is not None:
                self._on_nonfinite(where)
            loss = self._step_loss(result, count) if self.is_last else None
        except BaseException as exc:
            failure = self._on_failure(exc)
            if failure is exc:
                raise
            raise failure from exc.__cause__
        self._record(result)
        return loss

    def _find_nonfinite(self) -> str | None:
        """None when every rank's loss and gradients of this step are finite (one all-reduce);
        else where the first non-finite value appeared, the same text on every rank
        (:mod:`pipec.runtime.nonfinite`)."""
        watch = self._watch
        if watch is None:
            return None
        try:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            flag = watch.local_flag(grads, self.device)
            if not any_rank(flag, info=self.info, waiter=self._waiter,
                            what=f"the non-finite check of step {self._step}"):
                return None
            stage_grads = {s: [p.grad for p in m.parameters() if p.grad is not None]
                           for s, m in self.stage_modules.items()}
            score, place = watch.local_first(stage_grads, self.plan.num_stages, self.num_microbatches)
            _, owner = agree_first(score, info=self.info, waiter=self._waiter, step=self._step)
            text = ""
            if self.rank == owner and place is not None:
                if place.kind == FORWARD and place.microbatch is not None:
                    node = locate_node(self.stage_modules[place.stage], watch.inputs[(place.stage, place.microbatch)],
                                       seed=self.seed, step=self._step,
                                       microbatch=self._executor.microbatch_offset + place.microbatch)
                    place = replace(place, node=node or "(none when re-run: a random op, or the loss)")
                replica = f", replica {self.dp_rank}" if self.data_parallel_size > 1 else ""
                text = f"{place.describe()} (rank {self.rank}{replica})"
            return share_text(text, owner=owner, info=self.info, waiter=self._waiter, step=self._step)
        finally:
            watch.begin_step()  # drop the step's input references

    def _on_nonfinite(self, where: str) -> None:
        """The policy, the same on every rank: raise, or drop every gradient (no update)."""
        if self.nonfinite == "raise":
            raise NonfiniteError(
                f"step {self._step} has a non-finite loss or gradient; it first appeared in {where}. Check that "
                "micro-batch's data and the learning rate, or pass PipelineRuntime(nonfinite='skip') to skip "
                "such steps on every rank",
                rank=self.rank, step=self._step,
            )
        for p in self.parameters():
            p.grad = None  # the optimizer's step() then updates nothing, on every rank alike
        self.skipped_steps += 1
        if self.rank == 0:
            log.warning("step %d skipped (no optimizer update on any rank; %d so far): a non-finite loss or "
                        "gradient first appeared in %s", self._step, self.skipped_steps, where)

    def _finish_data_parallel(self, result: StepResult) -> None:
        """Wait for the replicas' gradient all-reduces (started as each stage's backward
        ended) and add their spans to the step's timeline."""
        if self._dp is None:
            return
        clock = self._executor.clock

        def span(started: Any, text: str) -> None:
            clock.stop(started, text)
            result.timeline.append(clock.last_event(self.rank))

        self._dp.finish(span)

    def _step_loss(self, result: StepResult, count: torch.Tensor | None) -> torch.Tensor:
        """The step's loss on a last-stage rank: over every replica's micro-batches (the
        global batch), by one all-reduce among the replicas' last-stage ranks."""
        losses = torch.stack([result.losses[m] for m in range(self.num_microbatches)])
        total = losses.sum() if count is not None else losses.mean()
        if self._dp is not None:
            total = total.detach().clone()
            work = dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.mesh.dp_group, async_op=True)
            if work is None:
                raise RuntimeError(f"all_reduce on rank {self.rank} returned no request")
            others = [r for r in self.mesh.replica_ranks() if r != self.rank]
            self._waiter.wait_collective(work, others, "the all-reduce of the step's loss across replicas")
            if count is None:
                total = total / self.data_parallel_size
        if count is not None:
            return (total / count).to(losses.dtype)
        return total

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Inference on the full batch: the model's output (micro-batches concatenated
        along dim 0) on the rank holding the last stage, None elsewhere."""
        self._check_usable()
        self._resolve_allreduce()
        try:
            microbatches = self._microbatches(inputs, kwargs)
            with torch.no_grad():
                result = self._executor.run(microbatches, train=False, step=self._step)
            if self._p2p is not None:
                self._p2p.end_step()
        except BaseException as exc:
            self._on_failure(exc)
            raise
        self._record(result)
        if not self.is_last:
            return None
        return merge_outputs([result.outputs[m] for m in range(self.num_microbatches)])

    __call__ = forward

    # -- failures -----------------------------------------------------------
    def _on_failure(self, exc: BaseException, *, setup: bool = False) -> BaseException:
        """Publish the failure to the other ranks (distributed runs only) and mark
        this runtime failed; returns the exception to raise. ``setup``: it happened
        while building the runtime, in no step."""
        step = None if setup else self._step
        if isinstance(exc, PeerFailure) and exc.action is None and exc.step is None and step is not None:
            exc = exc.located(action=None, step=step)  # e.g. in the tied-gradient all-reduce
        if self.info.distributed and self.info.world_size > 1:
            self._publish(record_of(exc, rank=self.rank, step=step))
        return exc

    def report_failure(self, exc: BaseException, *, step: int | None = None) -> FailureRecord:
        """Tell the other ranks that this rank failed with ``exc`` and stop this runtime.

        ``step``/``pipe.step`` call it themselves; call it for a failure outside
        them (the optimizer, data loading) so peers waiting for this rank stop
        at once. Returns the first failure any rank reported: the one to show.
        """
        return self._publish(record_of(exc, rank=self.rank, step=step if step is not None else self._step))

    def _publish(self, record: FailureRecord) -> FailureRecord:
        if self._failure is None:
            self._failure = record
        if self.monitor is None:
            return record
        first = self.monitor.report(record)
        self.monitor.break_connections()  # peers blocked on this rank stop at once
        return first

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise RuntimeFailure(
                f"rank {self.rank}: this pipeline already failed ({self._failure.describe()}); "
                "restart every rank (`pipec run DIR --resume` continues from the last checkpoint)",
                rank=self.rank,
                step=self._step,
            )

    def close(self) -> None:
        """Stop this runtime's failure monitor (its thread also stops when the runtime is freed)."""
        if self.monitor is not None:
            self.monitor.close()

    def _end_step_timed(self, scale: float | None = None) -> None:
        """The tied-gradient all-reduces, timed on the executor's clock (on CUDA its
        events) as one ``ALLREDUCE`` span of the step, added to the step's timeline
        by :meth:`_resolve_allreduce` -- later, so on CUDA the step returns without
        waiting for the all-reduce, as NCCL allows."""
        if not len(self._tied):
            self._tied.end_step(scale)
            return
        clock = self._executor.clock
        started = clock.start()
        self._tied.end_step(scale)
        clock.stop(started, ALLREDUCE)
        self._allreduce_pending = True

    def _resolve_allreduce(self) -> None:
        """Add the last step's ALLREDUCE span to its timeline, before the clock is
        reused (next step) or the timeline is read."""
        if self._allreduce_pending:
            self._allreduce_pending = False
            self._timelines.append_to_last(self._executor.clock.last_event(self.rank))

    def _record(self, result: StepResult) -> None:
        self._timelines.add(self._step, result.started, result.timeline)
        self._step += 1

    @property
    def data_parallel_rank(self) -> int:
        """This rank's replica (0 .. D-1): the ``rank`` of a ``DistributedSampler``."""
        return self.dp_rank

    @property
    def data_parallel_size(self) -> int:
        """The number of replicas D: the ``num_replicas`` of a ``DistributedSampler``."""
        return self.plan.data.data_parallel

    def train(self, mode: bool = True) -> PipelineRuntime:
        """Training (``mode=True``) or inference mode for dropout and batch norm, as
        ``model.train(mode)`` on the original model; returns the runtime."""
        for m in self.stage_modules.values():
            m.train(mode)
        return self

    def eval(self) -> PipelineRuntime:
        """Inference mode: no dropout, batch norm uses (and keeps) its running statistics."""
        return self.train(False)

    def any_rank(self, flag: bool, what: str = "an agreement between the ranks") -> bool:
        """Whether ``flag`` holds on any rank -- the same answer on every rank (collective:
        one all-reduce of one number). For decisions every rank must take alike, e.g. to
        save a checkpoint because some minutes passed on rank 0's clock."""
        self._check_usable()
        try:
            return any_rank(flag, info=self.info, waiter=self._waiter, what=f"{what} (step {self._step})")
        except BaseException as exc:
            failure = self._on_failure(exc)
            if failure is exc:
                raise
            raise failure from exc.__cause__

    # -- parameters and state ----------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under their original FQNs, each once."""
        seen: set[int] = set()
        for name, p in self._params.items():
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters, each once (a tied one too, whatever the number of
        local stages using it): what a per-rank optimizer updates."""
        for _, p in self.named_parameters():
            yield p

    @overload
    def optimizer(self, cls: Callable[..., _Optimizer], *, zero: Literal[False], **kwargs: Any) -> _Optimizer: ...

    @overload
    def optimizer(self, cls: Callable[..., _Optimizer], *, zero: bool | None = None,
                  **kwargs: Any) -> torch.optim.Optimizer: ...

    def optimizer(self, cls: Callable[..., _Optimizer], *, zero: bool | None = None,
                  **kwargs: Any) -> torch.optim.Optimizer:
        """``cls(self.parameters(), **kwargs)``: an optimizer over this rank's parameters
        (a tied one once), e.g. ``pipe.optimizer(torch.optim.AdamW, lr=1e-3)``. Tied
        copies on other ranks stay equal because every holder gets the same summed
        gradient at :meth:`step` and applies the same update.

        ``zero=True`` (default: the runtime's ``zero=1``) with D > 1 replicas shards
        the optimizer state over the replicas (ZeRO-1,
        ``torch.distributed.optim.ZeroRedundancyOptimizer``; :mod:`pipec.runtime.zero`):
        about ``1 / D`` of the state per rank. With one replica it is the plain optimizer.

        Under loss scaling (``precision="fp16"``) its ``step()`` is :meth:`optimizer_step`:
        it skips the update on every rank after an overflow and updates the scale, so a
        plain ``pipe.step(...); opt.step(); opt.zero_grad()`` loop trains fp16 correctly
        (``step(closure)`` is refused). Otherwise it is the plain optimizer."""
        use_zero = self._zero if zero is None else zero
        if use_zero and self.data_parallel_size > 1 and self.info.distributed:
            optimizer = zero_optimizer(self.parameters(), cls, self.mesh.dp_group, **kwargs)
        else:
            optimizer = cls(self.parameters(), **kwargs)
        if self.scaler.enabled:
            wrap_optimizer_step(optimizer, self.scaler)
        self._optimizers.add(optimizer)  # its state counts in memory_stats()
        return optimizer

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()`` unless the gradients accumulated since the last optimizer
        step overflowed on any rank (:attr:`found_inf`); then the loss scale is updated
        (halved after an overflow, doubled after ``growth_interval`` clean steps). Returns
        whether the optimizer stepped: the same on every rank. For an optimizer made
        elsewhere than :meth:`optimizer` (one from it steps this way by itself). Without
        loss scaling it just steps. Not collective: the overflow flag is already agreed."""
        self._check_usable()
        if is_wrapped(optimizer, self.scaler):  # its step() goes through the scaler already
            stepped = not self.scaler.found_inf
            optimizer.step()
            return stepped
        return self.scaler.step(optimizer.step)

    @property
    def loss_scale(self) -> float:
        """The current float16 loss scale, the same on every rank (1.0 without scaling)."""
        return self.scaler.scale

    @property
    def found_inf(self) -> bool:
        """Whether a gradient overflowed (inf/NaN) on any rank since the last optimizer step."""
        return self.scaler.found_inf

    def _model_state(self) -> Iterator[torch.Tensor]:
        """The tensors this rank holds across steps: parameters, buffers, gradients, the
        state of the optimizers made by :meth:`optimizer` and the point-to-point receive
        buffers (:meth:`pipec.runtime.comm.P2P.buffers`). Lazy: read only when memory is
        measured."""
        for module in self.stage_modules.values():
            for p in module.parameters():
                yield p
                if p.grad is not None:
                    yield p.grad
            yield from module.buffers()
        for opt in list(self._optimizers):
            for state in opt.state.values():
                if isinstance(state, Mapping):  # ZeroRedundancyOptimizer may hold None for others' shards
                    yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        if self._p2p is not None:  # receive buffers, allocated once from the plan and reused
            yield from self._p2p.buffers()

    def memory_stats(self) -> MemoryStats:
        """This rank's memory over its last training step, measured, with the plan's
        prediction for the rank (the sum of its stages' ``memory_bytes``) and each stage's
        recompute policy. Measured by the CUDA allocator, or on a CPU by the runtime's own
        count of tensor storages (``PipelineRuntime(..., track_memory=True)``; see
        :mod:`pipec.runtime.memory`)."""
        if not self._memory.enabled:
            raise ConfigError(
                "memory_stats: on a CPU the runtime counts memory only when asked; create the "
                "runtime with PipelineRuntime(..., track_memory=True) and run a step first"
            )
        if not self._memory.measured:
            raise ConfigError("memory_stats: no training step measured yet; call pipe.step(...) first")
        meter = self._memory
        stages = [self.plan.data.stages[s] for s in self.stage_indices]
        peak = meter.model_state + meter.step_peak
        return MemoryStats(rank=self.rank, source="cuda" if self.device.type == "cuda" else "cpu",
                           peak_bytes=peak, model_state_bytes=meter.model_state,
                           step_peak_bytes=meter.step_peak,
                           predicted_bytes=sum(st.memory_on(self.info.backend) for st in stages),
                           recompute={st.index: st.recompute for st in stages})

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients by the norm of the WHOLE model's gradient, as
        ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)`` on
        the single-process model; returns that total norm (the same on every rank).

        Collective: call it on every rank, after :meth:`step` and before the
        optimizer's ``step``. ``torch.nn.utils.clip_grad_norm_(pipe.parameters(), ...)``
        would clip each rank by its own part's norm -- a different, silently wrong
        update. Each rank sums ``|g|^p`` over its parameters (a tied parameter counted
        on its lowest holder rank only: after :meth:`step` every holder has the same
        gradient), one all-reduce over the pipeline's process group (MAX for
        ``norm_type=inf``) gives the total, and every local gradient is scaled by
        ``min(1, max_norm / (total + 1e-6))``. Under fp16 loss scaling the gradients are
        unscaled already (:meth:`step` divides them by the scale), so this clips the true
        gradients, as ``GradScaler.unscale_`` before clipping does. A non-finite total is returned and
        scaled with as torch does by default (``error_if_nonfinite=False``): the
        gradients turn NaN. The norm is accumulated in float64 and returned in float32
        (float64 when this rank's gradients are). ``norm_type`` must be > 0 or inf.
        """
        self._check_usable()
        norm_type = check_norm_type(norm_type)  # the same on every rank: raise before the collective
        skip = self._tied.counted_elsewhere()
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        counted = [p.grad for p in self.parameters() if p.grad is not None and id(p) not in skip]
        try:
            total = global_grad_norm(counted, norm_type, info=self.info, waiter=self._waiter,
                                     group=self.mesh.pp_group, ranks=self.mesh.pipeline_ranks())
        except BaseException as exc:
            failure = self._on_failure(exc)
            if failure is exc:
                raise
            raise failure from exc.__cause__
        scale_grads(grads, max_norm, total)
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        return total.to(dtype)

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

    # -- checkpoints (pipec.runtime.checkpoint) -------------------------------
    def _view(self, *, saving: bool) -> RankView:
        self._saves += saving
        return RankView(
            rank=self.rank, world_size=self.info.world_size, plan=self.plan, stages=tuple(self.stage_indices),
            tensors=self.state_dict(), param_names={id(p): n for n, p in self.named_parameters()},
            store=self.monitor.store if self.monitor is not None else None, waiter=self._waiter,
            save_index=self._saves - 1, file_rank=self.pp_rank, num_ranks=self.plan.num_ranks,
            writes=self.dp_rank == 0, scaler=self.scaler, seed=self.seed,
        )

    def save_checkpoint(
        self,
        directory: str | os.PathLike[str],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        step: int | None = None,
        keep: int | None = None,
        scheduler: Any = None,
    ) -> Path:
        """Write a checkpoint of every rank into ``directory`` (collective: every rank calls
        it) and return its ``step_<k>`` directory. ``step`` defaults to the steps run so
        far; ``keep`` deletes all but the newest ``keep`` checkpoints there; ``scheduler``
        (an LR scheduler) is saved with the optimizer."""
        self._check_usable()
        try:
            if optimizer is not None:
                consolidate(optimizer)  # ZeRO-1: the replicas' shards onto replica 0, which writes
            return save_checkpoint(self._view(saving=True), directory, optimizer=optimizer,
                                   step=self._step if step is None else step, keep=keep, scheduler=scheduler)
        except BaseException as exc:
            failure = self._on_failure(exc)
            if failure is exc:
                raise
            raise failure from exc.__cause__

    def load_checkpoint(
        self, directory: str | os.PathLike[str], *, optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
    ) -> int:
        """Load this rank's parameters (and ``optimizer``'s, ``scheduler``'s and the RNG state)
        from the newest checkpoint in ``directory``; returns its step. The checkpoint may come
        from another layout (stages, ranks, replicas): optimizer state is resharded by
        parameter FQN. The runtime takes the checkpoint's ``seed``, so random ops (dropout)
        continue as in the run that saved it. See :mod:`pipec.runtime.checkpoint`."""
        try:
            manifest = load_checkpoint(self._view(saving=False), directory, optimizer=optimizer,
                                       scheduler=scheduler)
        except BaseException as exc:
            self._on_failure(exc)  # peers must not wait for a rank that cannot start
            raise
        if manifest.seed is not None and manifest.seed != self.seed:
            log.info("rank %d: seed %d from the checkpoint replaces %d", self.rank, manifest.seed, self.seed)
            self.seed = self._executor.seed = manifest.seed
        self._step = manifest.step
        return manifest.step

    # -- timelines ----------------------------------------------------------
    def receive_counts(self) -> ReceiveCounts:
        """How this rank's receive actions were posted since the runtime was built:
        ``ahead`` (early in their step: Gloo, so data lands as soon as it is sent),
        ``on_demand`` (when their action ran: NCCL, and the first step of a new input
        shape; on Gloo otherwise a round trip on the critical path) and ``unused``
        (posted ahead, not yet taken: 0 after every step). All 0 on a one-rank plan."""
        if self._p2p is None:
            return ReceiveCounts(0, 0, 0)
        return self._p2p.receive_counts()

    def timeline(self) -> list[TimelineEvent]:
        """``(start, end, rank, action)`` of this rank's last step, seconds from its start;
        a training step on a rank holding a tied parameter ends with an ``ALLREDUCE`` entry."""
        self._resolve_allreduce()
        return self._timelines.last()

    def save_timeline(self, path: str | os.PathLike[str]) -> Path:
        """Write this rank's recent steps as Chrome trace JSON (see :mod:`pipec.runtime.timeline`)."""
        self._resolve_allreduce()
        memory = None
        if self._memory.enabled and self._memory.measured:
            stats = self.memory_stats()
            memory = (self.rank, stats.peak_bytes, stats.predicted_bytes)
        return write_chrome_trace(Path(path), self._timelines.steps(), memory)

    def __repr__(self) -> str:
        return (
            f"PipelineRuntime(rank={self.rank}, stages={list(self.stage_indices)}, "
            f"schedule={self.schedule.name!r}, num_microbatches={self.num_microbatches}, device={self.device})"
        )
