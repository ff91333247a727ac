"""Leave the user's model as it was: :func:`preserved` undoes what planning runs change.

Phase: none (a basic helper under tracing and profiling). Planning runs the
model -- eagerly, as a graph, node by node, many times over while timing --
in whatever mode the user left it. In train mode that updates batch-norm
running statistics (``running_var``, ``num_batches_tracked``) and draws from
the RNG (dropout); the fx graph and the plan's stage modules share their
parameters and buffers with the model, so the plan would save the changed
values too. :func:`preserved` takes a snapshot on entry and puts it back on
exit, error or not.

What it restores, in place (tensor identity is kept, so the plan and the
model still share their tensors):

- every buffer's value (a clone is kept: buffers are small next to weights),
  and the tensor object a module holds under each buffer and parameter name;
- every parameter's ``requires_grad`` and ``.grad`` (the object; the profiler's
  whole-model backward accumulates into ``.grad`` after clearing it, nothing
  else in pipec writes it);
- every submodule's ``training`` flag;
- the CPU RNG state, each initialised CUDA device's, and Python's ``random``.

Parameters are not cloned (that would double the model's memory). Nothing
pipec runs writes them; a model whose forward writes its own parameters in
place is reported with a warning naming them, since their first values are gone.
Lazy (uninitialised) parameters and buffers are left out: the first forward
materialises them on purpose.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy


@dataclass
class _ModuleState:
    module: nn.Module
    training: bool
    parameters: dict[str, nn.Parameter | None]
    buffers: dict[str, torch.Tensor | None]


@dataclass
class _Snapshot:
    modules: list[_ModuleState]
    buffer_values: dict[int, tuple[torch.Tensor, torch.Tensor]]  # id -> (buffer, its value's clone)
    param_state: dict[int, tuple[nn.Parameter, int, bool, torch.Tensor | None]]  # version, requires_grad, grad
    param_names: dict[int, str]
    cpu_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    python_rng: Any


def _take(root: nn.Module) -> _Snapshot:
    modules: list[_ModuleState] = []
    buffer_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    param_state: dict[int, tuple[nn.Parameter, int, bool, torch.Tensor | None]] = {}
    param_names: dict[int, str] = {}
    for prefix, module in root.named_modules(remove_duplicate=True):
        params = {k: p for k, p in module._parameters.items() if p is None or not is_lazy(p)}
        bufs = {k: b for k, b in module._buffers.items() if b is None or not is_lazy(b)}
        modules.append(_ModuleState(module, module.training, params, bufs))
        for name, p in params.items():
            if p is not None and id(p) not in param_state:
                param_state[id(p)] = (p, p._version, p.requires_grad, p.grad)
                param_names[id(p)] = f"{prefix}.{name}" if prefix else name
        for b in bufs.values():
            if b is not None and id(b) not in buffer_values:
                buffer_values[id(b)] = (b, b.detach().clone())
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]
    return _Snapshot(modules, buffer_values, param_state, param_names, torch.get_rng_state(), cuda_rng,
                     random.getstate())


def _restore(snap: _Snapshot) -> None:
    for state in snap.modules:
        state.module.training = state.training
        for name, p in state.parameters.items():
            if state.module._parameters.get(name) is not p:
                state.module._parameters[name] = p
        for name, b in state.buffers.items():
            if state.module._buffers.get(name) is not b:
                state.module._buffers[name] = b
    with torch.no_grad():
        for buf, value in snap.buffer_values.values():
            # compared by value, not by version counter: aten.batch_norm writes the
            # running statistics without bumping it
            if (buf.shape, buf.dtype, buf.device) != (value.shape, value.dtype, value.device):
                buf.data = value
            elif not buf.is_meta and not torch.equal(buf, value):
                buf.copy_(value)
    written = []
    for key, (p, version, requires_grad, grad) in snap.param_state.items():
        if p._version != version:
            written.append(snap.param_names[key])
        p.requires_grad_(requires_grad)
        p.grad = grad
    torch.set_rng_state(snap.cpu_rng)
    if snap.cuda_rng is not None:
        torch.cuda.set_rng_state_all(snap.cuda_rng)
    random.setstate(snap.python_rng)
    if written:
        shown = ", ".join(written[:5]) + (f" and {len(written) - 5} more" if len(written) > 5 else "")
        warnings.warn(
            f"the model's forward wrote its own parameters in place while pipec ran it ({shown}); "
            "their values now differ from before partition/trace/profile. Reload the weights "
            "(model.load_state_dict) before training, or make forward leave its parameters alone",
            stacklevel=3,
        )


@contextmanager
def preserved(*modules: nn.Module) -> Iterator[None]:
    """Restore ``modules`` (and the RNG state) to what they were on entry, on exit."""
    snaps = [_take(m) for m in modules]
    try:
        yield
    finally:
        for snap in reversed(snaps):
            _restore(snap)


__all__ = ["preserved"]
