"""Phase partition: the one definition of what a stage costs (time and memory).

Input: a :class:`ChainProblem` and a stage ``k`` covering positions
``[i, j)``. Output: its time per micro-batch (:func:`stage_time`) and its
memory (:func:`stage_memory`); the vectorised :func:`stage_times` /
:func:`stage_memories` are the same functions over arrays of ``(i, j)`` --
the scalar ones call them -- so the optimal search, the baselines, brute force
in the tests and the reported plan all use bit-identical numbers.

**Stage time** (seconds per micro-batch)::

    sum(compute_time[i:j]) / speed(rank(k))
    + sum over received tensors  m(t) * comm_time(bytes, rank(k-1), rank(k))
    + sum over sent tensors      m(t) * comm_time(bytes, rank(k), rank(k+1))
    + sum over split tied groups allreduce_time(bytes, link's ranks) / num_microbatches

``m(t)`` is 2 for floating tensors (activation forward, gradient backward)
and 1 otherwise. A stage *receives* a tensor produced before ``i`` with a
consumer in ``[i, j)`` and *sends* one produced in ``[i, j)`` with a consumer
at ``>= j`` -- once per tensor, however many later stages read it. A skip
(U-Net, attention mask) goes straight from producer to consumer stages:
stages in between pay nothing for it. The ranks used are those of the
neighbouring stages: exact when all links between ranks are alike (one node),
an approximation across nodes, where a skip's real link may differ. A tied
parameter group with users on this stage and elsewhere all-reduces its
gradient once per step, charged to every holder and spread over the step's
micro-batches (:func:`stage_tied_times`); the ranks are those of the stage's
send link (its receive link on the last stage). That is an approximation --
placing one stage, the search does not know the other holders' ranks, so a
group whose holders share a rank, or span three ranks or more, is charged a
two-rank all-reduce all the same. The plan reports the real groups' share
(:func:`pipec.partitioner.assemble.tied_shares`), and the simulator runs the
real all-reduce at the end of the step
(:func:`pipec.schedule.simulator.simulate_plan`).

**Stage memory** (bytes)::

    params of the stage * 2 + numel * optimizer_state_bytes_per_param
    + buffers * 1
    + (saved activations + sent tensor bytes) * in_flight[k]
    + (received tensor bytes + gradient bytes of sent floating tensors) * num_microbatches

where a tied group counts on every stage that uses it and ``in_flight[k]``
is the number of micro-batches stage ``k`` holds at its peak
(:mod:`pipec.schedule.in_flight`). Received tensors and the gradients of sent
ones count once per micro-batch, not per micro-batch in flight: the runtime
receives each (stage, tensor, micro-batch) into its own buffer, allocated once
and kept across steps (:class:`pipec.runtime.comm.P2P`; the same on Gloo and
NCCL), so a rank holds all of them. A rank's memory is the sum over its stages.

**Activation recompute** (:mod:`pipec.costs.recompute`): with several policies
allowed (``problem.recompute``), each stage takes the fastest one whose memory
fits its rank's limit (:func:`stage_policies`). Under policy ``p`` the saved
activations above become ``kept_p * (in_flight - b) + saved * b`` -- the
micro-batches in flight keep what ``p`` keeps (nothing for ``full``, matmul
outputs for ``selective``), the ``b`` whose backward is running
(``problem.in_backward``, 1 unless ``W`` runs later than ``I``) hold all of
theirs -- and the time gains the forward of the nodes ``p`` recomputes. Under
the zero-bubble split each micro-batch between its ``I`` and ``W``
(``problem.held_grads``) also keeps the gradient ``I`` captured at each
matmul-like node (its output's size), whatever the policy, and ``W`` computes
the stage's weight gradients all at once before they accumulate into ``.grad``
(:func:`pipec.runtime.backward.weight_backward`): one more copy of the stage's
trainable parameter bytes. The first stage has no boundary input, so its ``I``
captures nothing and its ``W`` is a plain backward: neither term applies there.
The stage that ends the model also holds, while its loss's backward starts, the
gradient of the model output and one temporary of its size (twice the last
node's ``output_bytes``; log-softmax's and nll's gradients under cross-entropy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from pipec.errors import PartitionError
from pipec.partitioner.liveness import tables_of
from pipec.partitioner.problem import ChainProblem, ChainSolution, ChainTensor, ParamGroup

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def stage_times(problem: ChainProblem, stage: int, starts: I64, ends: I64) -> F64:
    """Time of stage ``stage`` over ``[starts[n], ends[n])`` for every ``n`` (vectorised),
    under the recompute policy :func:`stage_policies` picks."""
    i = np.asarray(starts, dtype=np.int64)
    j = np.asarray(ends, dtype=np.int64)
    time = _base_times(problem, stage, i, j)
    tab = tables_of(problem)
    if tab.policies == ("none",):
        return time
    choice = stage_policies(problem, stage, i, j)
    extra = np.choose(choice, [tab.prefix_recompute[q][j] - tab.prefix_recompute[q][i] for q in tab.policies])
    out: F64 = time + extra / tab.speed[stage]
    return out


def _base_times(problem: ChainProblem, stage: int, i: I64, j: I64) -> F64:
    """Compute, transfers and tied all-reduce share, before any recompute."""
    tab = tables_of(problem)
    time: F64 = (tab.prefix_time[j] - tab.prefix_time[i]) / tab.speed[stage]
    if len(tab.tensor_bytes) and problem.comm_time is not None:
        time = time + tab.received(tab.comm_cumulative("recv", tab.recv_pair[stage]), i, j)
        time = time + tab.sent(tab.comm_cumulative("send", tab.send_pair[stage]), i, j)
    return time + stage_tied_times(problem, stage, i, j)


def stage_policies(problem: ChainProblem, stage: int, starts: I64, ends: I64) -> I64:
    """Index into ``problem.recompute`` of the policy stage ``stage`` takes over each
    ``[starts[n], ends[n])``: the fastest whose memory fits the stage's rank limit (ties:
    the earlier, so no needless recompute), else the one that needs the least memory.

    The choice depends on the segment alone, so a split's best policies are chosen
    stage by stage (AdaPipe's per-stage recompute choice, Sun et al. 2024 §4): exact
    when each rank holds one stage. Stages sharing a rank are each checked against the
    whole rank's limit (the same relaxation as the split; see
    :mod:`pipec.partitioner.algorithm`)."""
    tab = tables_of(problem)
    i = np.asarray(starts, dtype=np.int64)
    j = np.asarray(ends, dtype=np.int64)
    if len(tab.policies) == 1:
        return np.zeros(len(i), dtype=np.int64)
    memory = _policy_memories(problem, stage, i, j)
    time = np.stack([tab.prefix_recompute[q][j] - tab.prefix_recompute[q][i] for q in tab.policies])
    limit = problem.limit_of(problem.rank_of(stage))
    fits_limit = memory <= (np.inf if limit is None else limit)
    ranked = np.where(fits_limit, time, np.inf)
    fastest = np.argmin(ranked, axis=0)
    smallest = np.argmin(memory, axis=0)
    out: I64 = np.where(fits_limit.any(axis=0), fastest, smallest).astype(np.int64)
    return out


def _policy_memories(problem: ChainProblem, stage: int, i: I64, j: I64) -> I64:
    """Memory of the segments under each policy of ``problem.recompute`` (rows)."""
    tab = tables_of(problem)
    base = _memory_without_activations(problem, stage, i, j)
    rest, held = tab.activation_weights(stage)
    saved = tab.prefix_saved[j] - tab.prefix_saved[i]
    out: I64 = np.stack([base + (tab.prefix_kept[q][j] - tab.prefix_kept[q][i]) * rest + saved * held
                         for q in tab.policies])
    return out


def _memory_without_activations(problem: ChainProblem, stage: int, i: I64, j: I64) -> I64:
    """Parameters, optimizer state, boundary buffers and tied groups of the segments."""
    tab = tables_of(problem)
    memory: I64 = tab.prefix_param_memory[j] - tab.prefix_param_memory[i]
    if tab.held_grads[stage]:
        memory = memory + (tab.prefix_grad_held[j] - tab.prefix_grad_held[i]) * tab.held_grads[stage]
        memory = memory + (tab.prefix_param_bytes[j] - tab.prefix_param_bytes[i])  # W's weight gradients at once
    memory = memory + tab.boundary_memory(stage, i, j) + tab.loss_memory(j)
    for g, (inside, _) in enumerate(tab.tied_masks(i, j)):
        memory = memory + np.where(inside, tab.tied_memory[g], 0)
    return memory


def stage_tied_times(problem: ChainProblem, stage: int, starts: I64, ends: I64) -> F64:
    """The share per micro-batch of the tied-gradient all-reduces that stage ``stage``
    over ``[starts[n], ends[n])`` joins, for every ``n`` (part of :func:`stage_times`)."""
    tab = tables_of(problem)
    i = np.asarray(starts, dtype=np.int64)
    j = np.asarray(ends, dtype=np.int64)
    time: F64 = np.zeros(len(i), dtype=np.float64)
    if tab.tied_users and problem.comm_time is not None:
        exchange = tab.tied_exchange(tab.tie_pair[stage]) / problem.num_microbatches
        for g, (inside, outside) in enumerate(tab.tied_masks(i, j)):
            time = time + np.where(inside & outside, exchange[g], 0.0)
    return time


def stage_memories(problem: ChainProblem, stage: int, starts: I64, ends: I64) -> I64:
    """Memory of stage ``stage`` over ``[starts[n], ends[n])`` for every ``n`` (vectorised),
    under the recompute policy :func:`stage_policies` picks."""
    tab = tables_of(problem)
    i = np.asarray(starts, dtype=np.int64)
    j = np.asarray(ends, dtype=np.int64)
    if tab.policies == ("none",):
        mono = tab.prefix_memory(stage)
        memory: I64 = mono[j] - mono[i] + tab.boundary_memory(stage, i, j) + tab.loss_memory(j)
        for g, (inside, _) in enumerate(tab.tied_masks(i, j)):
            memory = memory + np.where(inside, tab.tied_memory[g], 0)
        return memory
    chosen: I64 = np.choose(stage_policies(problem, stage, i, j), _policy_memories(problem, stage, i, j))
    return chosen


def stage_policy(problem: ChainProblem, stage: int, start: int, end: int) -> str:
    """The recompute policy stage ``stage`` holding positions ``[start, end)`` takes."""
    _check_segment(problem, stage, start, end)
    one = np.array([start], dtype=np.int64), np.array([end], dtype=np.int64)
    return problem.recompute[int(stage_policies(problem, stage, *one)[0])]


def stage_recompute_time(problem: ChainProblem, stage: int, start: int, end: int) -> float:
    """Seconds per micro-batch recomputing adds to stage ``stage`` over ``[start, end)``."""
    tab = tables_of(problem)
    policy = stage_policy(problem, stage, start, end)
    return float(tab.prefix_recompute[policy][end] - tab.prefix_recompute[policy][start]) / float(tab.speed[stage])


def stage_time(problem: ChainProblem, stage: int, start: int, end: int) -> float:
    """Seconds per micro-batch of stage ``stage`` holding positions ``[start, end)``."""
    _check_segment(problem, stage, start, end)
    one = np.array([start], dtype=np.int64), np.array([end], dtype=np.int64)
    return float(stage_times(problem, stage, *one)[0])


def stage_tied_time(problem: ChainProblem, stage: int, start: int, end: int) -> float:
    """Seconds per micro-batch of :func:`stage_time` that are tied-gradient all-reduce."""
    _check_segment(problem, stage, start, end)
    one = np.array([start], dtype=np.int64), np.array([end], dtype=np.int64)
    return float(stage_tied_times(problem, stage, *one)[0])


def stage_memory(problem: ChainProblem, stage: int, start: int, end: int) -> int:
    """Bytes stage ``stage`` holding positions ``[start, end)`` needs at its peak."""
    _check_segment(problem, stage, start, end)
    one = np.array([start], dtype=np.int64), np.array([end], dtype=np.int64)
    return int(stage_memories(problem, stage, *one)[0])


def stage_params(problem: ChainProblem, start: int, end: int) -> tuple[int, int]:
    """``(numel, bytes)`` of the trainable parameters positions ``[start, end)`` read."""
    tab = tables_of(problem)
    numel = int(tab.prefix_numel[end] - tab.prefix_numel[start])
    num_bytes = int(tab.prefix_param_bytes[end] - tab.prefix_param_bytes[start])
    i, j = np.array([start], dtype=np.int64), np.array([end], dtype=np.int64)
    for g, (inside, _) in enumerate(tab.tied_masks(i, j)):
        if bool(inside[0]):
            numel += tab.tied_numel[g]
            num_bytes += tab.tied_bytes[g]
    return numel, num_bytes


def rank_memory(problem: ChainProblem, stage_memory_bytes: Sequence[int]) -> tuple[int, ...]:
    """Per-rank memory: the sum over the rank's stages (stage ``k`` on ``problem.rank_of(k)``)."""
    out = [0] * problem.ranks
    for k, m in enumerate(stage_memory_bytes):
        out[problem.rank_of(k)] += int(m)
    return tuple(out)


def check_cuts(problem: ChainProblem, cuts: Sequence[int]) -> tuple[int, ...]:
    """``cuts`` as a tuple, or a PartitionError saying what is wrong with them."""
    n, s = problem.num_nodes, problem.num_stages
    c = tuple(int(x) for x in cuts)
    if len(c) != s + 1 or c[0] != 0 or c[-1] != n or any(a >= b for a, b in zip(c, c[1:])):
        raise PartitionError(
            f"cut positions: expected {s + 1} strictly increasing positions from 0 to {n} "
            f"(one non-empty stage each), found {list(c)}"
        )
    tab = tables_of(problem)
    bad = [x for x in c[1:-1] if not tab.cuttable[x]]
    if bad:
        raise PartitionError(
            f"cut positions {bad} split a value that is not a plain tensor (an int, a tuple); "
            "move those cuts to a position where only tensors are live"
        )
    return c


def evaluate(problem: ChainProblem, cuts: Sequence[int], strategy: str = "manual", *,
             exact: bool = True) -> ChainSolution:
    """The cost of the split ``cuts`` (``num_stages + 1`` positions from 0 to N)."""
    c = check_cuts(problem, cuts)
    times = tuple(stage_time(problem, k, c[k], c[k + 1]) for k in range(problem.num_stages))
    memory = tuple(stage_memory(problem, k, c[k], c[k + 1]) for k in range(problem.num_stages))
    return ChainSolution(cuts=c, stage_times=times, stage_memory=memory,
                         rank_memory=rank_memory(problem, memory), strategy=strategy, exact=exact)


def fits(problem: ChainProblem, solution: ChainSolution) -> bool:
    """Whether every rank's memory is within its limit."""
    return all(lim is None or m <= lim
               for m, lim in zip(solution.rank_memory, problem.memory_limit or [None] * problem.ranks))


def _check_segment(problem: ChainProblem, stage: int, start: int, end: int) -> None:
    if not (0 <= stage < problem.num_stages and 0 <= start < end <= problem.num_nodes):
        raise PartitionError(
            f"stage segment: expected stage in 0..{problem.num_stages - 1} and "
            f"0 <= start < end <= {problem.num_nodes}, found stage={stage}, [{start}, {end})"
        )


__all__ = [
    "ChainProblem",
    "ChainSolution",
    "ChainTensor",
    "ParamGroup",
    "check_cuts",
    "evaluate",
    "fits",
    "rank_memory",
    "stage_memories",
    "stage_memory",
    "stage_params",
    "stage_policies",
    "stage_policy",
    "stage_recompute_time",
    "stage_tied_time",
    "stage_tied_times",
    "stage_time",
    "stage_times",
]
