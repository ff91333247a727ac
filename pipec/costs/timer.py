"""Timing harness of the profiler: per-call seconds of tiny and large ops alike.

Phase: profile (used by :mod:`pipec.profiling`; :func:`progress_bar` also by
:mod:`pipec.runtime.calibrate`).

Input: thunks -- zero-argument calls -- built for one node. Output: seconds
per call, the median over ``repeats`` samples after ``warmup`` calls. Each
sample batches enough calls to last ~0.2 ms, so a 1 us view is not lost in
timer noise, and the harness's own per-call cost (the same thunk nesting
around an empty call) is subtracted, clamped at zero. For a backward, the
fixed cost of a ``torch.autograd.grad`` call is subtracted too (a
whole-model backward pays it once, a node measured alone on every call).
CPU: ``time.perf_counter``; CUDA: CUDA events after a synchronisation.
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pipec.costs.node_exec import NodeRun

_SAMPLE_TIME = 2e-4  # seconds one timing sample should last at least
_MAX_CALLS = 1000  # most calls batched into one sample


class Timer:
    """Seconds per call of a batch of thunks, net of the harness's overhead."""

    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.cuda = device.type == "cuda"
        self.repeats = repeats
        self.warmup = warmup
        self.overhead = 0.0
        # The harness's own cost: the same thunk nesting around an empty call.
        def body(a: tuple[Any, ...], k: dict[str, Any]) -> Any:
            return _noop(*a, **k)

        self.overhead = self.per_call(lambda n: [lambda: body((), {})] * n, warmup=20, repeats=9, reduce=min)
        self.grad_overhead, self.grad_node_time = self._grad_call_costs(device)

    def _grad_call_costs(self, device: torch.device) -> tuple[float, float]:
        """Fixed cost of one ``torch.autograd.grad`` call, and the cost of one graph node.

        A whole-model backward pays the fixed cost once; a node measured alone
        pays it on every call, so it is subtracted. With t(k) the time of a call
        over a chain of k cheap view nodes, a node costs (t(3) - t(1)) / 2 and
        the fixed part is t(1) minus that. Minimum over samples, median of three
        estimates: both are small differences of noisy times.
        """
        x = torch.zeros(1, device=device, requires_grad=True)
        chains = []
        with torch.enable_grad():
            for depth in (1, 3):
                y = x
                for _ in range(depth):
                    y = y.view(-1)
                chains.append(grad_thunks([y], [torch.ones_like(y)], (x,)))
        fixed, per_node = [], []
        for _ in range(3):
            one, three = (self.per_call(c, warmup=20, repeats=9, reduce=min) for c in chains)
            per_node.append(max(0.0, (three - one) / 2))
            fixed.append(one - per_node[-1])
        return max(0.0, statistics.median(fixed)), statistics.median(per_node)

    def grad_per_call(self, outs: list[torch.Tensor], grads: list[torch.Tensor], wrt: tuple[torch.Tensor, ...]) -> float:
        """Seconds of one node's backward w.r.t. ``wrt``, net of the fixed call cost.

        Never less than one graph node's cost: any backward step pays that.
        """
        raw = self.per_call(grad_thunks(outs, grads, wrt))
        return max(self.grad_node_time, raw - self.grad_overhead)

    def _sample(self, thunks: list[Callable[[], Any]]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            for f in thunks:
                f()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end)) / 1e3
        t0 = time.perf_counter()
        for f in thunks:
            f()
        return time.perf_counter() - t0

    def calls_per_sample(self, make: Callable[[int], list[Callable[[], Any]]]) -> int:
        """How many calls of ``make``'s thunk one sample batches (one call is timed to know)."""
        single = self._sample(make(1))
        return max(1, min(_MAX_CALLS, math.ceil(_SAMPLE_TIME / max(single, 1e-7))))

    def sample(self, make: Callable[[int], list[Callable[[], Any]]], calls: int) -> float:
        """One sample: seconds per call over ``calls`` calls, net of the harness, >= 0."""
        return max(0.0, self._sample(make(calls)) / calls - self.overhead)

    def per_call(
        self,
        make: Callable[[int], list[Callable[[], Any]]],
        *,
        warmup: int | None = None,
        repeats: int | None = None,
        reduce: Callable[[list[float]], float] = statistics.median,
    ) -> float:
        """Seconds per call: ``reduce`` (median) of samples, net of the harness, >= 0."""
        for f in make(self.warmup if warmup is None else warmup):
            f()
        n = self.calls_per_sample(make)
        samples = [self._sample(make(n)) / n for _ in range(self.repeats if repeats is None else repeats)]
        return max(0.0, reduce(samples) - self.overhead)


_SETTLE_BYTES = 24 << 20  # above the largest gradient temporaries that varied, below glibc's 32 MiB cap


def settle_host_allocator() -> None:
    """Allocate and free one 24 MiB host block before timing on a CPU.

    glibc hands blocks above its mmap threshold straight to the system and back,
    and raises that threshold (to at most 32 MiB; the trim threshold to twice it)
    when such a block is freed. A training process reaches that state within its
    first steps; a fresh one profiling a model has not, and then pays the page
    faults of every large temporary (a gradient, the logits) on every timed call:
    the whole-model backward of an LM head over 8000 tokens (4 MiB gradients)
    measured 8.9-10.4 ms in four fresh processes, 6.4-7.2 ms after this, and the
    runtime's stages 6.2-6.8 ms together. Harmless elsewhere: other allocators
    ignore it, and glibc would do the same after any large free.
    """
    block = torch.empty(_SETTLE_BYTES, dtype=torch.uint8)
    block.fill_(0)  # touched, so the block is really mapped before it is freed
    del block


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def node_thunks(run: NodeRun, body: Callable[[tuple[Any, ...], dict[str, Any]], Any]) -> Callable[[int], list[Callable[[], Any]]]:
    """n thunks calling ``body`` on the node's inputs (fresh clones if it mutates them)."""

    def make(n: int) -> list[Callable[[], Any]]:
        if not run.mutates:
            return [lambda: body(run.args, run.kwargs)] * n
        out: list[Callable[[], Any]] = []
        for _ in range(n):
            args, kwargs = run.fresh_args()
            out.append(functools.partial(body, args, kwargs))
        return out

    return make


def grad_thunks(outs: list[torch.Tensor], grads: list[torch.Tensor], wrt: tuple[torch.Tensor, ...]) -> Callable[[int], list[Callable[[], Any]]]:
    def f() -> Any:
        return torch.autograd.grad(outs, wrt, grads, retain_graph=True, allow_unused=True)

    return lambda n: [f] * n


@contextmanager
def progress_bar(description: str, *, total: int, enabled: bool | None) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()``; a transient rich bar on stderr appears after ~2 s.

    ``enabled``: True always shows it, False never, None only on a terminal.
    """
    show = sys.stderr.isatty() if enabled is None else enabled
    if not show:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    bar = Progress(console=Console(stderr=True), transient=True)
    task = bar.add_task(description, total=total)
    start = time.monotonic()
    started = False

    def advance() -> None:
        nonlocal started
        bar.advance(task)
        if not started and (enabled or time.monotonic() - start > 2.0):
            bar.start()
            started = True

    try:
        yield advance
    finally:
        if started:
            bar.stop()


__all__ = ["Timer", "grad_thunks", "node_thunks", "progress_bar", "settle_host_allocator"]
