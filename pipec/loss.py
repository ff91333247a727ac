"""What a ``loss_fn`` may return, read the same way by the profiler and the runtime.

Layer: basic values (imports only :mod:`pipec.errors` and torch). A loss
function returns either

- a scalar tensor, the mean loss of the micro-batch it was given (the step's
  loss is then the mean over micro-batches, exact when micro-batches are equal
  in size and the loss is a mean over them); or
- a pair ``(loss_sum, count)``: the loss summed over the micro-batch's items and
  how many items it summed (a scalar tensor or a number), as for a token-mean
  loss with padding (``ignore_index``) or Hugging Face's ``num_items_in_batch``.
  The step's loss is then ``sum(loss_sum) / sum(count)`` over the whole batch,
  and its gradients those of that quotient, however unevenly the items fall
  into micro-batches.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from pipec.errors import ConfigError


class LossParts(NamedTuple):
    """``loss`` (a 0-d tensor) and, for a ``(loss_sum, count)`` loss, ``num_items``, its count (a 0-d
    float64 tensor on the loss's device, detached); None for a mean loss."""

    loss: torch.Tensor
    num_items: torch.Tensor | None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(_describe(v) for v in value)})"
    return f"a {type(value).__name__}"


def loss_parts(value: Any) -> LossParts:
    """Read what a ``loss_fn`` returned (see the module doc).

    Raises :class:`ConfigError` for anything but a one-element tensor or a
    2-tuple ``(one-element tensor, count)`` with a one-element numeric count,
    naming what it found.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return LossParts(value.reshape(()), None)
    if isinstance(value, tuple) and len(value) == 2:
        total, count = value
        if isinstance(total, torch.Tensor) and total.numel() == 1:
            if isinstance(count, torch.Tensor) and count.numel() == 1 and not count.is_complex():
                return LossParts(total.reshape(()), count.detach().reshape(()).to(torch.float64))
            if isinstance(count, (int, float)) and not isinstance(count, bool):
                return LossParts(total.reshape(()), torch.tensor(float(count), dtype=torch.float64,
                                                                 device=total.device))
    raise ConfigError(
        f"loss_fn must return a scalar tensor (the micro-batch's mean loss) or a tuple "
        f"(loss_sum, count) of a scalar tensor and a number of items, found {_describe(value)}; "
        "reduce a per-item loss with .mean(), or return (loss.sum(), number_of_items)"
    )
