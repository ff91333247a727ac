"""Dynamic loss scaling for float16 across a pipeline: one scale, one skip decision, every rank.

Phase: stage runtime, around :meth:`pipec.PipelineRuntime.step` and the
optimizer step. float16 has 5 exponent bits: small gradients underflow to 0.
The loss is multiplied by a scale ``S`` on the last stage, so every gradient
of the backward -- the boundary gradients that cross ranks included -- is ``S``
times larger; after the schedule each rank divides *this step's* gradients
by ``S`` (gradients of earlier steps, accumulated without ``zero_grad``, are
set aside first and added back: they are unscaled already), so between steps
``.grad`` always holds true, unscaled gradients (what
:meth:`~pipec.PipelineRuntime.clip_grad_norm_` clips and an optimizer reads).

An overflow anywhere makes the step wrong everywhere: a rank whose own
gradients are finite may have received them from one that overflowed, or
not. So each rank checks its gradients for inf/NaN and one all-reduce (MAX of
a 0/1 flag over the pipeline's process group) gives every rank the same
answer. The answer sticks until the optimizer step (gradient accumulation
over several steps skips the whole window). At the optimizer step
(:meth:`LossScaler.step`, called by the optimizer that
``pipe.optimizer(...)`` returns, or by ``pipe.optimizer_step(opt)``) every
rank then skips the update and multiplies ``S`` by ``backoff_factor``; after
``growth_interval`` clean updates in a row ``S`` grows by ``growth_factor``.
Every rank takes the same decisions from the same flags, so the scale stays
the same on every rank without being sent. This is ``torch.amp.GradScaler``'s
rule (Micikevicius et al. 2018, "Mixed Precision Training", section 3.2),
with the check made global.

bfloat16 has float32's exponent range and needs no scaling: the scaler is off
for "bf16" and "fp32" unless :class:`LossScaling` says ``enabled=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipec.errors import ConfigError
from pipec.runtime.comm import ProcessGroupInfo
from pipec.runtime.waiting import Waiter


@dataclass(frozen=True)
class LossScaling:
    """How float16 training scales its loss (the defaults of ``torch.amp.GradScaler``).

    ``enabled``: None (default) scales under ``precision="fp16"`` only; True
    scales under any precision; False never (an fp16 run may then underflow).
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    enabled: bool | None = None

    def __post_init__(self) -> None:
        checks = (
            ("init_scale", self.init_scale, self.init_scale > 0 and math.isfinite(self.init_scale), "> 0"),
            ("growth_factor", self.growth_factor, self.growth_factor > 1, "> 1"),
            ("backoff_factor", self.backoff_factor, 0 < self.backoff_factor < 1, "in (0, 1)"),
            ("growth_interval", self.growth_interval,
             isinstance(self.growth_interval, int) and self.growth_interval >= 1, "a whole number >= 1"),
        )
        for name, value, ok, want in checks:
            if not ok:
                raise ConfigError(
                    f"LossScaling.{name}: expected {want}, found {value!r}; the defaults are "
                    "init_scale=2**16, growth_factor=2, backoff_factor=0.5, growth_interval=2000"
                )


class LossScaler:
    """The loss scale of one rank (the same on every rank) and the overflow flag.

    Call :meth:`begin_step` before the schedule runs, :meth:`unscale` after it
    (collective), :meth:`restore` after the step's other gradient work, and
    :meth:`step` instead of ``optimizer.step()``.
    """

    def __init__(self, config: LossScaling, *, precision: str, info: ProcessGroupInfo, waiter: Waiter,
                 params: Callable[[], list[nn.Parameter]]) -> None:
        self.config = config
        self.enabled = config.enabled if config.enabled is not None else precision == "fp16"
        self.scale = float(config.init_scale) if self.enabled else 1.0
        self.growth_tracker = 0  # clean optimizer steps in a row since the scale last changed
        self.found_inf = False  # an overflow since the last optimizer step, on any rank
        self._info = info
        self._waiter = waiter
        self._params = params
        self._saved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    # -- around pipe.step ------------------------------------------------------
    def begin_step(self) -> None:
        """Set aside the gradients of earlier steps: they are unscaled already."""
        self._saved = {}
        if not self.enabled:
            return
        for p in self._params():
            if p.grad is not None:
                self._saved[id(p)] = (p, p.grad)
                p.grad = None

    def unscale(self, step: int) -> bool:
        """Divide this step's gradients by the scale, and agree with every rank whether any
        is inf/NaN (one all-reduce; collective when enabled). Returns that answer."""
        if not self.enabled:
            return False
        grads = [p.grad for p in self._params() if p.grad is not None]
        inv = 1.0 / self.scale
        bad = torch.zeros((), dtype=torch.float32, device=self._info.device)
        for g in grads:
            g.mul_(inv)
            bad = torch.maximum(bad, (~torch.isfinite(g)).any().to(bad.dtype))
        if self._info.distributed and self._info.world_size > 1:
            work = dist.all_reduce(bad, op=dist.ReduceOp.MAX, async_op=True)
            if work is None:
                raise RuntimeError(f"all_reduce on rank {self._info.rank} returned no request")
            peers = [r for r in range(self._info.world_size) if r != self._info.rank]
            self._waiter.wait_collective(work, peers, f"the all-reduce of the fp16 overflow flag of step {step}")
        overflow = bool(bad.item())
        self.found_inf = self.found_inf or overflow
        return overflow

    def restore(self) -> None:
        """Add the set-aside gradients of earlier steps back."""
        for p, before in self._saved.values():
            p.grad = before if p.grad is None else before.add_(p.grad)
        self._saved = {}

    # -- the optimizer step ----------------------------------------------------
    def step(self, optimizer_step: Callable[[], Any]) -> bool:
        """Run ``optimizer_step()`` unless an overflow was found since the last call, then
        update the scale (halve it after an overflow; grow it after ``growth_interval``
        clean steps). Returns whether the optimizer stepped. The same on every rank."""
        skipped = self.found_inf
        if not skipped:
            optimizer_step()
        self.update()
        return not skipped

    def update(self) -> None:
        """The scale rule of ``torch.amp.GradScaler.update``, from the agreed flag."""
        if not self.enabled:
            self.found_inf = False
            return
        if self.found_inf:
            self.scale *= self.config.backoff_factor
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker >= self.config.growth_interval:
                self.scale *= self.config.growth_factor
                self.growth_tracker = 0
        self.found_inf = False

    # -- checkpoints -----------------------------------------------------------
    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.found_inf = False


def wrap_optimizer_step(optimizer: torch.optim.Optimizer, scaler: LossScaler) -> None:
    """Make ``optimizer.step()`` go through ``scaler.step`` (skip on overflow, update the
    scale). A bound method, so LR schedulers that wrap ``optimizer.step`` keep working."""
    original = optimizer.step

    def step(self: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
        if closure is not None:
            raise ConfigError(
                "optimizer.step(closure): under loss scaling the pipeline cannot re-run a closure's "
                "forward; call pipe.step(...) and then optimizer.step() without a closure"
            )
        result: list[Any] = [None]

        def run() -> None:
            result[0] = original()

        scaler.step(run)
        return result[0]

    optimizer.step = step.__get__(optimizer, type(optimizer))  # type: ignore[method-assign]
    optimizer._pipec_scaler = scaler  # type: ignore[attr-defined]


def is_wrapped(optimizer: torch.optim.Optimizer, scaler: LossScaler) -> bool:
    """Whether ``optimizer.step()`` goes through ``scaler`` (:func:`wrap_optimizer_step`)."""
    return getattr(optimizer, "_pipec_scaler", None) is scaler


__all__ = ["LossScaler", "LossScaling", "is_wrapped", "wrap_optimizer_step"]
