"""The runtime's own cost per action and per step, measured on a tiny two-stage model.

Phase: calibration (called by :func:`pipec.runtime.calibrate.calibrate`); it
lives in ``pipec/runtime/`` because it runs :class:`~pipec.runtime.runtime.PipelineRuntime`.

Input: a backend (``"gloo"``, or ``"nccl"`` between two local GPUs) and how
many steps to time. Two processes are spawned on 127.0.0.1, each pinned to its
own core when there are two. Rank 0 profiles a tiny model (four 8-wide linear
layers and a squared-error loss: its compute takes microseconds) and sends the
profile to rank 1, so both build the same plans: 2 stages, 8 micro-batches of
one row, under ``1f1b`` (``F``, ``B``, ``SEND``, ``RECV``) and ``zb-h1`` (``I``,
``W``). Both run alternating timed steps after warm-up. Output:
:class:`~pipec.types.RuntimeOverhead`, from ``pipe.timeline()``:

- ``forward`` / ``backward`` / ``input_grad`` / ``weight_grad``: the median span
  of the kind less the plan's own time for it (the profile's, so what the
  profile already holds is not counted twice);
- ``send``: the median ``SEND`` span;
- ``recv``: the lower quartile of the ``RECV`` spans (a receive whose message
  was there already: the rest is waiting, which the simulator times itself)
  plus, per receive, the time between actions (the executor posts every
  receive of the step early, between two actions);
- ``split_per_param_node``: on stage 1 (it sends a gradient back), the median
  ``I`` plus the median ``W`` over the median ``B`` (of ``1f1b``), per node of
  the stage with a weight gradient; it comes off ``weight_grad``'s fixed part, which the simulator
  adds to every ``W`` besides;
- ``step``: the median over steps of the time after the last action
  (waiting for the last sends, the step's end), the most of the ranks, plus
  the time before the first (splitting the batch).

Every wait is bounded: the process group has a timeout, the parent waits at
most ``timeout`` seconds for a result, then kills what is left.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipec.errors import ProfileError
from pipec.runtime.p2p_bench import run_two_ranks
from pipec.types import RuntimeOverhead

log = logging.getLogger(__name__)

_SCHEDULES = ("1f1b", "zb-h1")
_MICROBATCHES = 8
_WIDTH = 8

TimedStep = tuple[float, list[tuple[float, float, int, str]]]  # (local step seconds, timeline)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(_WIDTH, _WIDTH), nn.Tanh()]
    return nn.Sequential(*layers)


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean()


def _kind(text: str) -> str:
    from pipec.errors import ScheduleError
    from pipec.schedule.ir import Action

    try:
        return str(Action.parse(text).kind.value)
    except ScheduleError:
        return text  # ALLREDUCE and other spans the IR does not name


def _worker(rank: int, port: int, backend: str, steps: int, timeout: float, results: Any) -> None:
    try:
        from pipec.costs.profiled import ProfiledCostModel
        from pipec.facade import partition
        from pipec.profiling import Profile, profile
        from pipec.runtime.runtime import PipelineRuntime
        from pipec.tracing import trace

        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        elif (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {rank})  # one core per rank, as a CPU pipeline runs
        torch.set_num_threads(1)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2, timeout=timedelta(seconds=timeout))
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(_MICROBATCHES, _WIDTH, generator=gen)
        y = torch.randn(_MICROBATCHES, _WIDTH, generator=gen)
        box: list[Any] = [None]
        if rank == 0:
            traced = trace(_tiny_model(), (x[:1],))
            box[0] = profile(traced, device=str(device), progress=False, loss_fn=_mse,
                                   target=y[:1]).model_dump_json()
        dist.broadcast_object_list(box, src=0)
        cost_model = ProfiledCostModel(Profile.model_validate_json(box[0]))
        runners = {}
        for name in _SCHEDULES:
            plan = partition(_tiny_model(), (x,), num_stages=2, num_microbatches=_MICROBATCHES,
                                   schedule=name, loss_fn=_mse, cost_model=cost_model, target=y)
            runners[name] = (plan, PipelineRuntime(plan, loss_fn=_mse, device=device))
        timed: dict[str, list[TimedStep]] = {name: [] for name in _SCHEDULES}
        for i in range(steps + 3):
            for name in _SCHEDULES if i % 2 == 0 else _SCHEDULES[::-1]:
                pipe = runners[name][1]
                dist.barrier()
                started = _now(device)
                pipe.step(x.to(device), target=y.to(device))
                local = _now(device) - started
                if i >= 3:  # warm-up steps left out
                    timed[name].append((local, pipe.timeline()))
        gathered: list[Any] = [None, None]
        dist.all_gather_object(gathered, timed)
        if rank == 0:
            stage_times = {name: [(st.forward_time, st.backward_time, st.input_grad_time or 0.0,
                                   st.weight_grad_time or 0.0, _param_nodes(runners[name][0].data, st.nodes))
                                  for st in runners[name][0].stages]
                           for name in _SCHEDULES}
            results.put(("ok", (gathered, stage_times)))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as err:  # reported to the parent, which raises ProfileError
        results.put(("error", f"rank {rank}: {type(err).__name__}: {err}"))


def _param_nodes(data: Any, nodes: Sequence[str]) -> int:
    """How many of ``nodes`` have a weight gradient (what the I/W split's cost grows with)."""
    return sum(1 for n in nodes if n in data.node_costs and data.node_costs[n].weight_grad_time > 0)


def _now(device: torch.device) -> float:
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def overhead_from_timelines(
    ranks: Sequence[dict[str, list[TimedStep]]],
    stage_times: dict[str, list[tuple[float, float, float, float, int]]],
) -> RuntimeOverhead:
    """:class:`RuntimeOverhead` from timed steps (see the module docstring): ``ranks[r][schedule]``
    is rank ``r``'s list of ``(step seconds, timeline)``; ``stage_times[schedule][stage]`` the
    plan's ``(forward, backward, input_grad, weight_grad)`` seconds of that stage and its
    number of nodes with a weight gradient."""
    from pipec.schedule.ir import Action

    extra: dict[str, list[float]] = {"F": [], "B": [], "I": [], "W": [], "SEND": [], "RECV": []}
    # per (kind, stage), the overhead of the stages that send a gradient back (not stage 0)
    later: dict[tuple[str, int], list[float]] = {}
    column = {"F": 0, "B": 1, "I": 2, "W": 3}
    between, receives, tails, heads = 0.0, 0, [], []
    for schedule, own in stage_times.items():
        for rank_steps in ranks:
            for local, timeline in rank_steps[schedule]:
                actions = [(s, e, t) for s, e, _, t in timeline if _kind(t) != t]  # the schedule's actions
                if not actions:
                    continue
                previous_end = actions[0][0]
                for start, end, text in actions:
                    kind = _kind(text)
                    between += max(0.0, start - previous_end)
                    previous_end = end
                    if kind in column:
                        stage = Action.parse(text).stage
                        extra[kind].append(end - start - own[stage][column[kind]])
                        if stage > 0:
                            later.setdefault((kind, stage), []).append(extra[kind][-1])
                    elif kind.startswith("SEND"):
                        extra["SEND"].append(end - start)
                    elif kind.startswith("RECV"):
                        extra["RECV"].append(end - start)
                        receives += 1
                last = max(e for _, e, _, _ in timeline)
                tails.append(local - last)
                heads.append(actions[0][0])
    missing = [k for k, v in extra.items() if not v]
    if missing:
        raise ProfileError(f"runtime overhead: no {missing} actions in the timed steps; expected every kind of "
                           f"{list(extra)} from the schedules {list(stage_times)}")

    def median(values: list[float]) -> float:
        return max(0.0, statistics.median(values))

    recv = sorted(extra["RECV"])[len(extra["RECV"]) // 4]
    # the split's own cost per node: on a stage that sends a gradient back, I + W over B
    split: list[float] = []
    for (kind, stage), values in later.items():
        if kind == "B" and ("I", stage) in later and ("W", stage) in later:
            nodes = max(1, max(st[stage][4] for st in stage_times.values() if stage < len(st)))
            more = median(later[("I", stage)]) + median(later[("W", stage)]) - median(values)
            split.append(max(0.0, more) / nodes)
    split_per_param_node = statistics.median(split) if split else 0.0
    nodes = max(st[-1][4] for st in stage_times.values())
    return RuntimeOverhead(
        forward=median(extra["F"]),
        backward=median(extra["B"]),
        input_grad=median(extra["I"]),
        # the split's share, which the simulator adds per node, comes off the fixed part
        weight_grad=max(0.0, median(extra["W"]) - split_per_param_node * nodes),
        send=median(extra["SEND"]),
        recv=max(0.0, recv) + between / max(receives, 1),
        step=median(tails) + median(heads),
        split_per_param_node=split_per_param_node,
    )


def measure_overhead(*, backend: str = "gloo", steps: int = 20, timeout: float = 120.0) -> RuntimeOverhead:
    """Run the tiny pipeline on two spawned processes; see the module docstring."""
    if backend not in ("gloo", "nccl"):
        raise ProfileError(f"backend: expected 'gloo' or 'nccl', found {backend!r}")
    if steps < 1:
        raise ProfileError(f"steps: expected >= 1 timed steps, found {steps}")
    status, payload = run_two_ranks(_worker, (backend, steps, timeout), timeout)
    if status != "ok":
        raise ProfileError(f"runtime overhead measurement with {backend} on 127.0.0.1 failed: {payload}; "
                           "check that two local processes can open TCP ports")
    found = overhead_from_timelines(*payload)
    log.info("runtime overhead per action: %s", found)
    return found


__all__ = ["measure_overhead", "overhead_from_timelines"]
