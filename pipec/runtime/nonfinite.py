"""Bad numbers: a non-finite loss or gradient found in the step, and where it first appeared.

Phase: stage runtime, inside :meth:`pipec.PipelineRuntime.step`. One NaN makes
every later update NaN; in a pipeline it travels to other ranks before anyone
looks. With ``PipelineRuntime(nonfinite="raise" | "skip")`` (default
``"raise"``; ``"off"`` checks nothing) the step finds it and names the first
stage, micro-batch and node where it appeared.

What counts: a NaN anywhere; an infinity anywhere a gradient flows -- the
loss, the gradients, and a forward's outputs that carry a gradient (an
overflow). A forward output that carries none (``carries_grad`` False: a
constant built inside the model) is checked for NaN only: an infinity there
can be meant -- an attention mask of ``float("-inf")``, as
``nn.Transformer.generate_square_subsequent_mask`` builds, crosses stages in a
causal model. Locating re-runs the stage with autograd on and names the first
operation with a NaN, or with an infinity in a tensor that requires grad.

What the normal path costs (:class:`NonfiniteWatch`):

- per micro-batch and local stage, one min/max reduction over each boundary
  output of the forward (the model's output and the loss on the last stage)
  and over each input gradient of the backward, kept as a device flag (no
  synchronisation);
- per step, one fused norm over this rank's gradients (``torch._foreach_norm``,
  a pass like ``clip_grad_norm_``'s) and ONE all-reduce of a single number over
  the process group (:func:`pipec.runtime.agree.any_rank`);
- memory: a reference to each micro-batch's stage inputs until the step ends
  (boundary activations only, not the saved activations), to re-run one.

Only when some rank found one, the ranks agree (one more all-reduce, MIN) on
the first place: the lowest stage whose forward output (or loss) was
non-finite, its lowest micro-batch; else the highest stage whose backward sent
a non-finite input gradient (the backward runs from the last stage down); else
the lowest stage whose weight gradients were. For a forward the rank holding
it re-runs that stage's forward on that micro-batch (same random draws) under
a ``TorchFunctionMode`` that checks every operation's output, and names the
first one that is bad by the rules above (a NaN, or an infinity where a
gradient flows): its line in ``stage_<k>.py``, whose assigned name is the fx
node's name. One broadcast gives every rank that text.

Policies: ``"raise"``: every rank raises :class:`~pipec.errors.NonfiniteError`
with the same message (the pipeline stops; a restart would meet the same
numbers). ``"skip"``: every rank drops its gradients (``p.grad = None``, so the
optimizer's ``step()`` updates nothing, on every rank alike), the step is
counted in ``pipe.skipped_steps`` and logged. Gradients accumulated over
earlier ``step()`` calls without ``zero_grad`` are dropped with it.

The fp16 loss scaler takes its "found inf" decision with the same kind of
all-reduce; under loss scaling an overflow is expected and handled by the
scaler (skip and back off), so the two should share one flag per step.
"""

from __future__ import annotations

import linecache
import logging
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode

from pipec.errors import ConfigError
from pipec.runtime.comm import ProcessGroupInfo
from pipec.runtime.waiting import Waiter
from pipec.split.randomness import random_scope

log = logging.getLogger(__name__)

POLICIES = ("raise", "skip", "off")
FORWARD, _BACKWARD, _WEIGHTS = 0, 1, 2
_TEXT_BYTES = 1024  # the place's description, broadcast as bytes (2 length bytes first)
_ASSIGNED = re.compile(r"^\s*(\w+)\s*=")


def check_policy(policy: object) -> str:
    if policy not in POLICIES:
        raise ConfigError(
            f"nonfinite: expected 'raise' (stop, naming where), 'skip' (no optimizer update on any rank) "
            f"or 'off' (no check), found {policy!r}"
        )
    return str(policy)


def _bad(tensors: Sequence[Any], *, nan_only: bool = False) -> torch.Tensor | None:
    """A 0-d bool tensor: any floating value of ``tensors`` non-finite -- NaN, with
    ``nan_only`` (None: nothing to check).

    Through each tensor's minimum and maximum (``torch.aminmax``, one read pass; a NaN
    anywhere makes both NaN, an infinity shows in one of them): ``isfinite(t).any()``
    writes a bool tensor the size of ``t`` and reads it again -- on the logits of an LM
    head over 8000 tokens (4 MiB, one CPU core) 1.44 ms against 0.15 ms, per micro-batch.
    """
    test = torch.isnan if nan_only else (lambda x: ~torch.isfinite(x))
    flags = [test(torch.stack(torch.aminmax(_readable(t.detach())))).any() for t in tensors
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not flags:
        return None
    return torch.stack(flags).any() if len(flags) > 1 else flags[0]


def _readable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a float32 copy of a one-byte float (float8: ``aminmax`` has no such kernel on
    a CPU; the copy keeps NaN and infinity)."""
    return t.float() if t.element_size() == 1 else t


@dataclass(frozen=True)
class Place:
    """Where a non-finite value first appeared."""

    kind: int  # FORWARD, _BACKWARD or _WEIGHTS
    stage: int
    microbatch: int | None
    node: str | None = None

    def describe(self) -> str:
        what = {FORWARD: "the forward", _BACKWARD: "the backward", _WEIGHTS: "the weight gradients"}[self.kind]
        mb = f", micro-batch {self.microbatch}" if self.microbatch is not None else " (after summing the micro-batches)"
        node = f", node {self.node}" if self.node else ""
        return f"{what} of stage {self.stage}{mb}{node}"


class NonfiniteWatch:
    """Device flags of one step's (stage, micro-batch) forwards and backwards on this rank,
    and the inputs to re-run a forward with. Filled by the executor; read once per step."""

    def __init__(self) -> None:
        self.forward_flags: dict[tuple[int, int], torch.Tensor] = {}
        self.backward_flags: dict[tuple[int, int], torch.Tensor] = {}
        self.inputs: dict[tuple[int, int], list[Any]] = {}

    def begin_step(self) -> None:
        self.forward_flags, self.backward_flags, self.inputs = {}, {}, {}

    def forward(self, stage: int, microbatch: int, inputs: list[Any], outputs: Sequence[Any],
                loss: torch.Tensor | None = None, *, constants: Sequence[Any] = ()) -> None:
        """A forward's flag: a non-finite value in its ``outputs`` (those carrying a gradient)
        or ``loss``, or a NaN in its ``constants`` (outputs carrying none; see the module doc)."""
        self.inputs[(stage, microbatch)] = inputs
        flags = [f for f in (_bad([*outputs, loss]), _bad(constants, nan_only=True)) if f is not None]
        if flags:
            self.forward_flags[(stage, microbatch)] = flags[0] if len(flags) == 1 else flags[0] | flags[1]

    def backward(self, stage: int, microbatch: int, input_grads: Sequence[Any]) -> None:
        flag = _bad(input_grads)
        if flag is not None:
            self.backward_flags[(stage, microbatch)] = flag

    def local_flag(self, grads: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """This rank's answer, on the device: any flag set, or any gradient non-finite."""
        flags = list(self.forward_flags.values()) + list(self.backward_flags.values())
        if grads:
            norms = torch._foreach_norm(list(grads))
            flags.append((~torch.isfinite(torch.stack(list(norms)))).any())
        if not flags:
            return torch.zeros((), dtype=torch.bool, device=device)
        return torch.stack([f.to(device) for f in flags]).any()

    def local_first(self, stage_grads: Mapping[int, Sequence[torch.Tensor]], num_stages: int,
                    num_microbatches: int) -> tuple[int, Place | None]:
        """This rank's first place as a score (lower: earlier; see the module doc), and it."""
        big = 3 * num_stages * num_microbatches + num_stages
        found: list[tuple[int, Place]] = []
        for (s, m), f in self.forward_flags.items():
            if bool(f):
                found.append((s * num_microbatches + m, Place(FORWARD, s, m)))
        for (s, m), f in self.backward_flags.items():
            if bool(f):
                found.append(((num_stages + num_stages - 1 - s) * num_microbatches + m, Place(_BACKWARD, s, m)))
        for s, grads in stage_grads.items():
            if grads and not bool(torch.isfinite(torch.stack(list(torch._foreach_norm(list(grads))))).all()):
                found.append((2 * num_stages * num_microbatches + s, Place(_WEIGHTS, s, None)))
        if not found:
            return big, None
        return min(found, key=lambda x: x[0])


class _FirstNonfinite(TorchFunctionMode):
    """Runs torch functions as usual; remembers the first whose output holds a NaN, or an
    infinity in a tensor that requires grad (an infinity elsewhere can be a mask, see the
    module doc), and the line of the ``forward`` (the stage's code) that called it."""

    def __init__(self) -> None:
        super().__init__()
        self.found: str | None = None

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        if self.found is None:
            values = result if isinstance(result, (tuple, list)) else (result,)
            tensors = [v for v in values if isinstance(v, torch.Tensor)]
            flags = [f for f in (_bad(tensors, nan_only=True), _bad([t for t in tensors if t.requires_grad]))
                     if f is not None]
            if any(bool(f) for f in flags):
                self.found = self._where(func)
        return result

    def _where(self, func: Callable[..., Any]) -> str:
        name = getattr(func, "__name__", None) or repr(func)
        frame: Any = sys._getframe(2)
        while frame is not None and frame.f_code.co_name != "forward":
            frame = frame.f_back
        if frame is None:
            return f"(an operation {name})"
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
        m = _ASSIGNED.match(line)
        node = m.group(1) if m else "?"
        file = frame.f_code.co_filename.rsplit("/", 1)[-1]
        where = f", {file} line {frame.f_lineno}" if file.endswith(".py") else ""  # a plan dir's stage_<k>.py
        return f"{node} ({name}{where})"


def locate_node(module: nn.Module, inputs: list[Any], *, seed: int, step: int, microbatch: int) -> str | None:
    """Re-run ``module``'s forward on ``inputs`` with the draws of ``(seed, step, microbatch)``
    and name the first operation whose output holds a NaN, or an infinity where it requires
    grad (None: none did; see the module doc)."""
    mode = _FirstNonfinite()
    values = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    with torch.enable_grad(), random_scope(seed, step, microbatch), mode:  # requires_grad marks what may not be inf
        module(*values)
    return mode.found


def agree_first(score: int, *, info: ProcessGroupInfo, waiter: Waiter, step: int) -> tuple[int, int]:
    """The lowest score over every rank, and the (lowest) rank holding it."""
    value = torch.tensor([score * max(info.world_size, 1) + info.rank], dtype=torch.int64)
    if info.distributed and info.world_size > 1:
        work = dist.all_reduce(value, op=dist.ReduceOp.MIN, async_op=True)
        if work is None:
            raise RuntimeError(f"all_reduce on rank {info.rank} returned no request")
        waiter.wait_collective(work, [r for r in range(info.world_size) if r != info.rank],
                               f"agreeing where step {step}'s non-finite value appeared")
    best = int(value.item())
    return best // max(info.world_size, 1), best % max(info.world_size, 1)


def share_text(text: str, *, owner: int, info: ProcessGroupInfo, waiter: Waiter, step: int) -> str:
    """``owner``'s ``text`` on every rank (one broadcast of a fixed-size byte tensor)."""
    data = text.encode()[:_TEXT_BYTES]
    buf = torch.zeros(_TEXT_BYTES + 2, dtype=torch.uint8)
    if info.rank == owner:
        buf[0], buf[1] = len(data) // 256, len(data) % 256
        if data:
            buf[2:2 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    if info.distributed and info.world_size > 1:
        work = dist.broadcast(buf, src=owner, async_op=True)
        if work is None:
            raise RuntimeError(f"broadcast on rank {info.rank} returned no request")
        waiter.wait_collective(work, [owner] if owner != info.rank else [],
                               f"receiving where step {step}'s non-finite value appeared")
    n = int(buf[0].item()) * 256 + int(buf[1].item())
    return bytes(buf[2:2 + n].tolist()).decode(errors="replace")


__all__ = ["FORWARD", "POLICIES", "NonfiniteWatch", "Place", "agree_first", "check_policy", "locate_node", "share_text"]
