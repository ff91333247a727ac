"""The one executor: interprets a lowered schedule's actions on one rank.

Phase: stage runtime. Input: this rank's row of a lowered
:class:`~pipec.schedule.ir.Schedule` (``F B I W SEND_F RECV_F SEND_B RECV_B``),
its stage modules and their :class:`~pipec.runtime.routing.StageRoutes`, and the
micro-batches. Output: per-micro-batch losses (last stage) or model outputs
(inference), gradients accumulated into the stage parameters, and a measured
timeline. Every schedule -- GPipe, 1F1B, interleaved 1F1B, ZB-H1 -- runs through
this one loop; none is written as imperative code.

Autograd is cut at stage boundaries: a stage's boundary inputs are detached
leaves, so each stage's backward is its own graph. ``B`` runs the full
backward; ``I`` computes input gradients only (keeping the graph) and ``W`` the
weight gradients later, reusing ``I``'s graph: the split of zero-bubble
pipeline parallelism (Qi et al. 2023, section 2), in :mod:`pipec.runtime.backward`. A mean
loss (a scalar from ``loss_fn``) is scaled by ``1 / num_microbatches`` on the last
stage so accumulated gradients equal those of a mean-reduced loss on the full
batch. A ``(loss_sum, count)`` loss (:mod:`pipec.loss`) is backpropagated
unscaled: the batch's total count is known only after the last micro-batch's
forward, later than the first backward under 1F1B, so the runtime divides the
step's gradients by it afterwards (:mod:`pipec.runtime.loss_scale`).
Each forward runs in a
:func:`~pipec.split.randomness.random_scope` of ``(seed, step, micro-batch)``,
so dropout draws the same masks whatever the schedule or stage layout.

Mixed precision (a plan's ``precision`` "bf16"/"fp16", :mod:`pipec.costs.precision`):
each stage forward runs under autocast; its float boundary outputs are cast to
the plan's boundary dtype (the compute dtype) inside the autograd graph, so
what crosses ranks, what local consumers read and the gradients that come back
all have that dtype, whatever op produced the tensor; the loss runs outside
autocast on the output cast to float32, and is multiplied by ``loss_scale``
(float16 loss scaling, :mod:`pipec.runtime.amp`) before its backward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipec.costs.precision import autocast, cast_boundary, upcast_floats
from pipec.errors import ConfigError, RuntimeFailure
from pipec.loss import loss_parts
from pipec.runtime.backward import (
    PendingWeightGrad,
    full_backward,
    input_backward,
    param_nodes,
    weight_backward,
)
from pipec.runtime.comm import BACKWARD, FORWARD, P2P
from pipec.runtime.data_parallel import last_backward
from pipec.runtime.failure import PeerFailure
from pipec.runtime.memory import MemoryMeter
from pipec.runtime.nonfinite import NonfiniteWatch
from pipec.runtime.recompute import Replay, forward_kept, replay_forward
from pipec.runtime.routing import StageRoutes
from pipec.runtime.shapes import baked_shape_message
from pipec.runtime.timeline import Clock, TimelineEvent
from pipec.schedule.ir import Action, ActionKind
from pipec.split.randomness import random_scope


@dataclass
class _Slot:
    """What one (stage, micro-batch) keeps between its actions."""

    forwarded: bool = False
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # boundary inputs (leaves)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    scaled_loss: torch.Tensor | None = None
    out_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    grads_seen: set[tuple[str, int]] = field(default_factory=set)  # (boundary, consumer stage)
    pending_w: PendingWeightGrad | None = None
    replay: Replay | None = None  # a recomputing stage's forward, to run again at its backward


@dataclass
class StepResult:
    losses: dict[int, torch.Tensor]  # micro-batch -> unscaled loss, or loss_sum (last stage only)
    outputs: dict[int, Any]  # micro-batch -> model output (inference, last stage only)
    timeline: list[TimelineEvent]
    started: float = 0.0  # perf_counter seconds at the step's start
    # micro-batch -> count, when loss_fn returned (loss_sum, count) (last stage only)
    counts: dict[int, torch.Tensor] = field(default_factory=dict)


def _early_receives(actions: Sequence[Action]) -> tuple[list[tuple[int, int, int]], int]:
    """The receives ``(direction, stage, micro-batch)`` of ``actions`` and the index of the
    action before which they are all posted (see :meth:`pipec.runtime.comm.P2P.post_receives`):
    before the first receive or the second compute action, whichever comes first. A rank
    that starts by computing starts at once and sends its first result before it spends
    time posting (tens of microseconds per request, more for the first request after a
    collective)."""
    receives = [
        (FORWARD if a.kind == ActionKind.RECV_F else BACKWARD, a.stage, a.microbatch)
        for a in actions
        if a.kind in (ActionKind.RECV_F, ActionKind.RECV_B)
    ]
    if not receives:
        return receives, -1
    computed = False
    for i, a in enumerate(actions):
        if a.kind in (ActionKind.RECV_F, ActionKind.RECV_B) or (a.kind.is_compute and computed):
            return receives, i
        computed = computed or a.kind.is_compute
    return receives, -1  # unreachable: a receive exists


class Executor:
    """Runs one rank's actions. ``stages`` and ``routes`` hold this rank's stages;
    ``p2p`` is None when every stage is local (a one-rank plan)."""

    def __init__(
        self,
        *,
        rank: int,
        stages: Mapping[int, nn.Module],
        routes: Mapping[int, StageRoutes],
        actions: Sequence[Action],
        rank_of: Callable[[int], int],
        p2p: P2P | None,
        num_microbatches: int,
        device: torch.device,
        seed: int = 0,
        microbatch_offset: int = 0,
        after_backward: Callable[[int], None] | None = None,
        precision: str = "fp32",
        recompute: Mapping[int, str] | None = None,
        memory: MemoryMeter | None = None,
    ) -> None:
        self.rank = rank
        self.device = device
        self.precision = precision
        self.loss_scale = 1.0  # set by the runtime before each training step (fp16 loss scaling)
        self.seed = seed
        # replica d of D draws as global micro-batches d * M + m: the same as one process
        # running the global batch (pipec.runtime.data_parallel)
        self.microbatch_offset = microbatch_offset
        # called with a stage once its last backward action of a training step is done:
        # the data-parallel all-reduce of its gradients starts there
        self.after_backward = after_backward
        # set by the runtime unless nonfinite="off": flags of each forward / backward (no sync)
        self.watch: NonfiniteWatch | None = None
        self._done_at = {i: s for s, i in last_backward(actions).items()}
        # per local stage: its activation-recompute policy (pipec.runtime.recompute)
        self.recompute = {s: (recompute or {}).get(s, "none") for s in stages}
        self.memory = memory
        self.stages = dict(stages)
        self.routes = dict(routes)
        self.actions = tuple(actions)
        self.forward_actions = tuple(
            a for a in actions if a.kind in (ActionKind.F, ActionKind.SEND_F, ActionKind.RECV_F)
        )
        self.rank_of = rank_of
        self.p2p = p2p
        self.num_microbatches = num_microbatches
        self.clock = Clock(device)
        self._params = {
            s: [p for p in m.parameters() if p.requires_grad] for s, m in self.stages.items()
        }
        self._handlers: dict[ActionKind, Callable[[Action], None]] = {
            ActionKind.F: self._forward,
            ActionKind.B: self._backward,
            ActionKind.I: self._input_grad,
            ActionKind.W: self._weight_grad,
            ActionKind.SEND_F: self._send_forward,
            ActionKind.RECV_F: self._recv_forward,
            ActionKind.SEND_B: self._send_backward,
            ActionKind.RECV_B: self._recv_backward,
        }
        self._early_receives = {train: _early_receives(self.actions if train else self.forward_actions)
                                for train in (True, False)}
        # what every action reads of the plan, looked up once: the hot loop runs per action
        # (the timeline's labels, dtypes, which consumers and producers are local)
        self._labels = {True: tuple(str(a) for a in self.actions),
                        False: tuple(str(a) for a in self.forward_actions)}
        self._out_dtypes = {s: tuple(o.boundary.meta.torch_dtype for o in r.outputs) for s, r in self.routes.items()}
        self._local_consumers = {
            s: tuple(tuple(c for c in o.consumers if rank_of(c) == rank) for o in r.outputs)
            for s, r in self.routes.items()
        }
        self._boundary_inputs = {s: r.boundary_inputs() for s, r in self.routes.items()}
        self._local_producer = {
            s: {i.name: i.producer is not None and rank_of(i.producer) == rank for i in r.inputs}
            for s, r in self.routes.items()
        }
        self._carries = {s: {i.name: i.carries_grad for i in r.inputs} for s, r in self.routes.items()}
        self._param_nodes = {s: param_nodes(ps) for s, ps in self._params.items()}
        # per-step state
        self._slots: dict[tuple[int, int], _Slot] = {}
        self._send_grads: dict[tuple[int, int], dict[str, torch.Tensor | None]] = {}
        self._microbatches: Sequence[Mapping[str, Any]] = ()
        self._targets: Sequence[Any] | None = None
        self._loss_fn: Callable[..., Any] | None = None
        self._train = True
        self._step = 0
        self._result = StepResult({}, {}, [])
        # set by the runtime when a step's input shapes differ from the plan's: said when a
        # stage fails, since code traced on the example may have its shapes baked in
        self.shape_note: str | None = None

    # -- the loop ----------------------------------------------------------
    def run(
        self,
        microbatches: Sequence[Mapping[str, Any]],
        *,
        targets: Sequence[Any] | None = None,
        loss_fn: Callable[..., Any] | None = None,
        train: bool,
        step: int,
    ) -> StepResult:
        """Execute this rank's actions once. ``microbatches[m]`` maps graph-input
        names to micro-batch ``m``'s values; ``targets[m]`` is its target."""
        self._microbatches, self._targets, self._loss_fn, self._train = microbatches, targets, loss_fn, train
        self._slots, self._send_grads = {}, {}
        self._result = StepResult({}, {}, [])
        self._step = step
        actions = self.actions if train else self.forward_actions
        receives, post_at = self._early_receives[train]
        labels = self._labels[train]
        if self.p2p is not None:
            self.p2p.begin_actions(train)
        self.clock.begin()
        current: Action | None = None
        try:
            with torch.set_grad_enabled(train):
                for i, current in enumerate(actions):
                    if i == post_at and self.p2p is not None:
                        self.p2p.post_receives(receives)
                    started = self.clock.start()
                    self._handlers[current.kind](current)
                    self.clock.stop(started, labels[i])
                    if train and self.after_backward is not None and i in self._done_at:
                        self.after_backward(self._done_at[i])
                current = None
                if self.p2p is not None:
                    self.p2p.wait_sends()
        except PeerFailure as e:  # a peer failed while this rank waited at ``current``
            raise e.located(action=str(current) if current is not None else None, step=step) from e.__cause__
        except RuntimeFailure:
            raise
        except Exception as e:
            where = f"action {current}" if current is not None else "waiting for its sends to complete"
            raise RuntimeFailure(
                f"rank {self.rank} failed at {where} of step {step}: {type(e).__name__}: {e}",
                rank=self.rank,
                action=str(current) if current is not None else None,
                step=step,
            ) from e
        finally:
            self._slots, self._send_grads = {}, {}
            if self.p2p is not None:
                self.p2p.discard_posted()
            self._microbatches, self._targets = (), None
        self._result.timeline = self.clock.events(self.rank)
        self._result.started = self.clock.origin
        self._check_complete(step)
        return self._result

    def _check_complete(self, step: int) -> None:
        last = max(self.stages, default=-1)
        if last >= 0 and self.routes[last].is_last:
            done = self._result.losses if self._train else self._result.outputs
            missing = sorted(set(range(self.num_microbatches)) - set(done))
            if missing:
                raise RuntimeFailure(
                    f"rank {self.rank}: the schedule never ran the last stage's forward for "
                    f"micro-batches {missing} in step {step}; expected every micro-batch "
                    f"0..{self.num_microbatches - 1}, check the schedule with pipec.validate",
                    rank=self.rank,
                    step=step,
                )

    def _fail(self, action: Action, message: str) -> RuntimeFailure:
        return RuntimeFailure(
            f"rank {self.rank}, action {action}, step {self._step}: {message}",
            rank=self.rank,
            action=str(action),
            step=self._step,
        )

    def _slot(self, stage: int, microbatch: int) -> _Slot:
        key = (stage, microbatch)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        return slot

    # -- compute -----------------------------------------------------------
    def _forward(self, a: Action) -> None:
        routes = self.routes[a.stage]
        slot = self._slot(a.stage, a.microbatch)
        graph_inputs = self._microbatches[a.microbatch]
        values: list[Any] = []
        for r in routes.inputs:
            if r.producer is None:
                values.append(graph_inputs[r.name])
            elif r.name in slot.inputs:
                values.append(slot.inputs[r.name])
            else:
                raise self._fail(
                    a,
                    f"input {r.name!r} from stage {r.producer} has not arrived; the schedule needs "
                    f"{r.producer}F{a.microbatch} (and {a.stage}RECV_F{a.microbatch} across ranks) first",
                )
        mode = self.recompute[a.stage] if self._train else "none"
        try:
            with random_scope(self.seed, self._step, self.microbatch_offset + a.microbatch), \
                    autocast(self.device, self.precision):  # same random draws on any layout
                if mode == "none":
                    result = self.stages[a.stage](*values)
                else:
                    result, slot.replay = forward_kept(self.stages[a.stage], values, mode)
        except Exception as e:
            if self.shape_note is None:
                raise
            message = baked_shape_message(a.stage, self.stages[a.stage], e, self.shape_note)
            cause = RuntimeError(message)  # what the failure record shows the other ranks
            cause.__cause__ = e
            raise self._fail(a, message) from cause
        if not isinstance(result, tuple):
            result = (result,)
        expected = len(routes.outputs) + (1 if routes.is_last else 0)
        if len(result) != expected:
            raise self._fail(a, f"stage {a.stage} returned {len(result)} values, expected {expected}")
        slot.forwarded = True
        slot.outputs = self._boundary_outputs(a.stage, result)
        for o, local in zip(routes.outputs, self._local_consumers[a.stage]):
            value = slot.outputs[o.name]
            for c in local:
                self._slot(c, a.microbatch).inputs[o.name] = self._leaf(value, o.carries_grad)
        if routes.is_last:
            self._finish_last(a, slot, result[-1])
        if self.watch is not None and self._train:
            loss = self._result.losses.get(a.microbatch) if routes.is_last else None
            n = len(routes.outputs)  # boundary outputs; then the model's output on the last stage
            self.watch.forward(a.stage, a.microbatch, values,
                               [t for o, t in zip(routes.outputs, result) if o.carries_grad] + list(result[n:]), loss,
                               constants=[t for o, t in zip(routes.outputs, result) if not o.carries_grad])
        if not self._train:
            slot.inputs.clear()
            if self.p2p is None or not self.p2p.has_forward_sends(a.stage):
                self._slots.pop((a.stage, a.microbatch), None)

    def _finish_last(self, a: Action, slot: _Slot, output: Any) -> None:
        if not self._train:
            self._result.outputs[a.microbatch] = output
            return
        if self._loss_fn is None:
            raise self._fail(a, "no loss function: pass loss_fn to PipelineRuntime or pipec.partition")
        loss, count = self._loss(a, output)
        result = self._result
        if (count is None) != (not result.counts) and (result.losses or result.counts):
            kinds = ("a scalar", "a (loss_sum, count) tuple")
            now, before = kinds if count is None else kinds[::-1]
            raise self._fail(a, f"loss_fn returned {now} here but {before} for the step's earlier micro-batches; "
                                "return the same kind for every micro-batch")
        result.losses[a.microbatch] = loss.detach()
        if count is not None:
            result.counts[a.microbatch] = count
        slot.scaled_loss = self._scaled(loss, count)

    def _scaled(self, loss: torch.Tensor, count: torch.Tensor | None) -> torch.Tensor:
        """The loss the backward starts from: a mean loss over the micro-batches (a count
        loss is divided by the batch's count after the step, pipec.runtime.loss_scale),
        times the fp16 loss scale (unscaled after the step, pipec.runtime.amp)."""
        scaled = loss / self.num_microbatches if count is None else loss
        if self.loss_scale != 1.0:
            scaled = scaled * self.loss_scale
        return scaled

    def _loss(self, a: Action, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._loss_fn is None:
            raise self._fail(a, "no loss function: pass loss_fn to PipelineRuntime or pipec.partition")
        if self.precision != "fp32":
            output = upcast_floats(output)  # the loss in float32, outside autocast (as _forward ends it)
        if self._targets is None:
            value = self._loss_fn(output)
        else:
            value = self._loss_fn(output, self._targets[a.microbatch])
        try:
            return loss_parts(value)
        except ConfigError as e:
            raise self._fail(a, str(e)) from None

    def _replay(self, a: Action, slot: _Slot) -> None:
        """A recomputing stage's forward again, with autograd: its outputs (and loss) then
        carry the graph the backward runs through (:mod:`pipec.runtime.recompute`)."""
        replay, slot.replay = slot.replay, None
        if replay is None:
            return
        with random_scope(self.seed, self._step, self.microbatch_offset + a.microbatch), \
                autocast(self.device, self.precision):  # as the first run: same draws, same dtypes
            result = replay_forward(self.stages[a.stage], replay)
        if not isinstance(result, tuple):
            result = (result,)
        slot.outputs = self._boundary_outputs(a.stage, result)
        if self.routes[a.stage].is_last:
            loss, count = self._loss(a, result[-1])
            slot.scaled_loss = self._scaled(loss, count)

    def _boundary_outputs(self, stage: int, result: tuple[Any, ...]) -> dict[str, torch.Tensor]:
        """A stage forward's boundary outputs by name, floats cast to the plan's boundary
        dtype inside the autograd graph (the compute dtype under bf16/fp16)."""
        return {o.name: cast_boundary(t, dtype, self.precision)
                for o, t, dtype in zip(self.routes[stage].outputs, result, self._out_dtypes[stage])}

    def _leaf(self, value: torch.Tensor, carries_grad: bool) -> torch.Tensor:
        leaf = value.detach()
        if carries_grad and self._train:
            leaf.requires_grad_(True)
        return leaf

    def _backward_pairs(self, a: Action, slot: _Slot) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        tensors: list[torch.Tensor] = []
        grads: list[torch.Tensor | None] = []
        for o in self.routes[a.stage].outputs:
            if not o.carries_grad:
                continue
            missing = [c for c in o.consumers if (o.name, c) not in slot.grads_seen]
            if missing:
                c = missing[0]
                raise self._fail(
                    a,
                    f"the gradient of {o.name!r} from stage {c} has not arrived; the schedule needs "
                    f"{c}B{a.microbatch} (or {c}I{a.microbatch}) and, across ranks, "
                    f"{a.stage}RECV_B{a.microbatch} first",
                )
            out, g = slot.outputs.get(o.name), slot.out_grads.get(o.name)
            if out is not None and g is not None and out.requires_grad:
                tensors.append(out)
                grads.append(g)
        if slot.scaled_loss is not None and slot.scaled_loss.requires_grad:
            tensors.append(slot.scaled_loss)
            grads.append(None)
        return tensors, grads

    def _started_slot(self, a: Action) -> _Slot:
        slot = self._slots.get((a.stage, a.microbatch))
        if slot is None or not slot.forwarded or slot.pending_w is not None:
            raise self._fail(a, f"backward before forward: the schedule needs {a.stage}F{a.microbatch} first")
        return slot

    def _grad_leaves(self, stage: int, slot: _Slot) -> list[tuple[str, torch.Tensor]]:
        return [
            (r.name, slot.inputs[r.name])
            for r in self._boundary_inputs[stage]
            if r.carries_grad and r.name in slot.inputs and slot.inputs[r.name].requires_grad
        ]

    def _backward(self, a: Action) -> None:
        slot = self._started_slot(a)
        self._replay(a, slot)
        full_backward(*self._backward_pairs(a, slot))
        self._hand_back(a, {name: leaf.grad for name, leaf in self._grad_leaves(a.stage, slot)})
        del self._slots[(a.stage, a.microbatch)]  # frees this micro-batch's activations

    def _input_grad(self, a: Action) -> None:
        slot = self._started_slot(a)
        self._replay(a, slot)
        tensors, grads = self._backward_pairs(a, slot)
        leaves = self._grad_leaves(a.stage, slot)
        computed, slot.pending_w = input_backward(tensors, grads, [t for _, t in leaves], self._params[a.stage],
                                                  self._param_nodes[a.stage])
        slot.inputs.clear()
        slot.outputs.clear()
        self._hand_back(a, {name: g for (name, _), g in zip(leaves, computed)})

    def _weight_grad(self, a: Action) -> None:
        slot = self._slots.get((a.stage, a.microbatch))
        if slot is None or slot.pending_w is None:
            raise self._fail(a, f"weight gradient before input gradient: the schedule needs {a.stage}I{a.microbatch} first")
        weight_backward(slot.pending_w, self._params[a.stage])
        del self._slots[(a.stage, a.microbatch)]

    def _hand_back(self, a: Action, input_grads: Mapping[str, torch.Tensor | None]) -> None:
        """Give input gradients to local producers now; keep remote ones for SEND_B."""
        if self.watch is not None:
            self.watch.backward(a.stage, a.microbatch, list(input_grads.values()))
        remote: dict[str, torch.Tensor | None] = {}
        local = self._local_producer[a.stage]
        for r in self._boundary_inputs[a.stage]:
            if not r.carries_grad or r.producer is None:
                continue
            g = input_grads.get(r.name)
            if local[r.name]:
                self._add_grad(self._slot(r.producer, a.microbatch), r.name, a.stage, g)
            else:
                remote[r.name] = g
        self._send_grads[(a.stage, a.microbatch)] = remote

    @staticmethod
    def _add_grad(slot: _Slot, name: str, consumer: int, grad: torch.Tensor | None) -> None:
        slot.grads_seen.add((name, consumer))
        if grad is None:
            return
        prev = slot.out_grads.get(name)
        slot.out_grads[name] = grad if prev is None else prev + grad

    # -- communication -----------------------------------------------------
    def _need_p2p(self, a: Action) -> P2P:
        if self.p2p is None:
            raise self._fail(a, "communication action in a one-rank run; every stage is local")
        return self.p2p

    def _send_forward(self, a: Action) -> None:
        slot = self._slots.get((a.stage, a.microbatch))
        if slot is None or not slot.forwarded:
            raise self._fail(a, f"nothing to send: the schedule needs {a.stage}F{a.microbatch} first")
        self._need_p2p(a).send_forward(a.stage, a.microbatch, slot.outputs)
        if not self._train:
            del self._slots[(a.stage, a.microbatch)]

    def _recv_forward(self, a: Action) -> None:
        received = self._need_p2p(a).recv_forward(a.stage, a.microbatch)
        slot = self._slot(a.stage, a.microbatch)
        carries = self._carries[a.stage]
        for name, buf in received.items():
            slot.inputs[name] = self._leaf(buf, carries[name])

    def _send_backward(self, a: Action) -> None:
        grads = self._send_grads.pop((a.stage, a.microbatch), None)
        if grads is None:
            raise self._fail(
                a, f"nothing to send: the schedule needs {a.stage}B{a.microbatch} or {a.stage}I{a.microbatch} first"
            )
        self._need_p2p(a).send_backward(a.stage, a.microbatch, grads)

    def _recv_backward(self, a: Action) -> None:
        received = self._need_p2p(a).recv_backward(a.stage, a.microbatch)
        slot = self._slot(a.stage, a.microbatch)
        for (name, consumer), g in received.items():
            self._add_grad(slot, name, consumer, g)
