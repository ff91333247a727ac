"""Running a stage, or costing it, in a plan's precision: autocast and its device check.

Layer: tracing, costs (the profiler, the analytic cost model and the stage
runtime all use it). Input: a precision name (:data:`pipec.types.PRECISIONS`)
and a device. Output: the ``torch.autocast`` context a stage's forward runs in
-- parameters stay float32 (master weights) and autocast casts them per op --
and the checks that make an unusable precision a
:class:`~pipec.errors.PrecisionError` instead of a silent float32 run.

Where autocast does not reach, on purpose:

- the backward: autograd replays each op in the dtype its forward ran in, so
  gradients of float32 parameters arrive in float32 (and accumulate there);
- the loss: ``loss_fn`` runs outside autocast on the model output with its
  bfloat16/float16 tensors cast to float32 (:func:`upcast_floats`), so the
  loss and its reduction are float32 as on a float32 model;
- ops autocast keeps in float32 (softmax, norms, losses on CUDA) and float64
  ops: they run as they are.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from pipec.errors import PrecisionError
from pipec.types import check_precision, compute_dtype_name

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The ``torch.dtype`` stages of ``precision`` compute in (float32 for ``"fp32"``)."""
    return _DTYPES[compute_dtype_name(precision)]


def check_device_precision(device: torch.device | str, precision: str) -> None:
    """Raise :class:`PrecisionError` when ``device`` cannot run ``precision`` under autocast.

    Checked by entering autocast once: torch only warns, and runs float32, for a
    dtype its autocast does not support on a device (float64 on the CPU), so a
    plan would silently train in float32. bfloat16 on a CUDA device without it
    (before Ampere) is refused too. float16 and bfloat16 both run on the CPU
    (torch >= 2.3 autocasts both there)."""
    precision = check_precision(precision)
    if precision == "fp32":
        return
    device_type = torch.device(device).type
    dtype = compute_dtype(precision)
    advice = "pass precision='fp32', or run on a device that has it"
    if not torch.amp.is_autocast_available(device_type):
        raise PrecisionError(
            f"precision={precision!r}: torch has no autocast for device type {device_type!r}, so "
            f"it cannot compute in {dtype}; {advice}"
        )
    if device_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise PrecisionError(
            f"precision='bf16': {torch.cuda.get_device_name(torch.device(device))} has no bfloat16; "
            "pass precision='fp16' (with loss scaling) or 'fp32'"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast(device_type, dtype=dtype):
            enabled = torch.is_autocast_enabled(device_type)
    if not enabled:
        said = f" (torch said: {caught[0].message})" if caught else ""
        raise PrecisionError(
            f"precision={precision!r}: autocast on {device_type!r} does not support {dtype}{said}; {advice}"
        )


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context a stage's forward runs in: ``torch.autocast`` of ``device``'s type in the
    compute dtype; nothing for ``"fp32"``. Check the device first (:func:`check_device_precision`)."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=compute_dtype(precision))


def cast_boundary(value: Any, dtype: torch.dtype, precision: str) -> Any:
    """A stage output as it crosses to other stages under ``precision``: a float tensor in
    ``dtype`` (the plan's boundary dtype, :func:`pipec.types.boundary_meta`) whatever
    dtype autocast left it in; differentiable, so its gradient comes back in ``dtype``.
    Under "fp32" (and for anything else) the value as the stage made it."""
    if precision == "fp32" or not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    return value if value.dtype == dtype or not dtype.is_floating_point else value.to(dtype)


def upcast_floats(value: Any) -> Any:
    """``value`` with every bfloat16/float16 tensor in it (tuples, lists, dicts) cast to
    float32: what ``loss_fn`` sees under mixed precision, so the loss is float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(upcast_floats(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(upcast_floats(v) for v in value)
    if isinstance(value, Mapping):
        items = {k: upcast_floats(v) for k, v in value.items()}
        kind: Any = type(value)
        try:
            return kind(items)  # a dict subclass such as a Hugging Face ModelOutput keeps its type
        except TypeError:
            return items
    return value


__all__ = ["autocast", "cast_boundary", "check_device_precision", "compute_dtype", "upcast_floats"]
