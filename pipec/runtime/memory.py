"""Measured memory per rank over a training step: ``pipe.memory_stats()``.

Phase: stage runtime. On a CUDA device the allocator says it: the peak of
``torch.cuda.max_memory_allocated`` over the step (reset at its start). On a
CPU the runtime counts for itself (``PipelineRuntime(..., track_memory=True)``):
a ``TorchDispatchMode`` sees every tensor an ATen op returns during the step --
forward, recompute, backward, the loss -- and adds the bytes of each new
storage, which a ``weakref.finalize`` on the storage takes off when it is
freed. Storages of the parameters, buffers, gradients, optimizer state and
point-to-point receive buffers alive before the step are not counted there; they
are the model state, added whole (a receive buffer would otherwise count only
once an op happened to return it, and a gradient buffer never). The peak of that
running sum (activations, boundary buffers, gradients made in the step,
temporaries) plus the model state is what a CPU allocator would have peaked at
for tensors, comparable with the plan's prediction
(:attr:`pipec.plan.StageInfo.memory_bytes`, summed per rank).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class MemoryStats:
    """One rank's memory over its last training step, measured, beside the plan's prediction.

    ``peak_bytes`` = ``model_state_bytes`` (parameters, buffers, gradients, optimizer
    state and receive buffers held before the step) + ``step_peak_bytes`` (the peak of what the step
    allocated: activations, boundary buffers, new gradients, temporaries). On CUDA
    ``peak_bytes`` is ``max_memory_allocated`` itself. ``recompute``: the policy of each
    of the rank's stages."""

    rank: int
    source: str  # "cuda" (allocator) or "cpu" (the runtime's own count)
    peak_bytes: int
    model_state_bytes: int
    step_peak_bytes: int
    predicted_bytes: int
    recompute: dict[int, str]


def _storage_key(t: torch.Tensor) -> int:
    return int(t.untyped_storage().data_ptr())


class _Counting(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self, meter: MemoryMeter) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.meter = meter

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.meter.allocated(t)
        return out


class MemoryMeter:
    """Counts the bytes of tensor storages alive during a step (see the module docstring)."""

    def __init__(self, device: torch.device, *, track_cpu: bool) -> None:
        self.device = device
        self.track_cpu = track_cpu and device.type != "cuda"
        self._live: dict[int, int] = {}
        self._excluded: set[int] = set()
        self._current = 0
        self.step_peak = 0
        self.model_state = 0
        self.measured = False

    @property
    def enabled(self) -> bool:
        return self.device.type == "cuda" or self.track_cpu

    def allocated(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = int(storage.data_ptr())
        if not key or key in self._live or key in self._excluded:
            return
        size = int(storage.nbytes())
        self._live[key] = size
        self._current += size
        self.step_peak = max(self.step_peak, self._current)
        weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        self._current -= self._live.pop(key, 0)

    @contextmanager
    def step(self, state: Iterable[torch.Tensor]) -> Iterator[None]:
        """Measure the step run inside; ``state``: the tensors held before it (parameters,
        buffers, gradients, optimizer state), each storage counted once."""
        if not self.enabled:
            yield
            return
        seen: dict[int, int] = {}
        for t in state:
            if t.device.type != "meta":
                seen.setdefault(_storage_key(t), int(t.untyped_storage().nbytes()))
        self.model_state = sum(seen.values())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.step_peak = int(torch.cuda.max_memory_allocated(self.device)) - self.model_state
            self.measured = True
            return
        self._excluded = set(seen)
        self._live, self._current, self.step_peak = {}, 0, 0
        try:
            with _Counting(self):
                yield
        finally:
            self._live, self._excluded = {}, set()
            self.measured = True


__all__ = ["MemoryMeter", "MemoryStats"]
