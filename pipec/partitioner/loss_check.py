"""Whether the user's loss survives being averaged over micro-batches.

Phase: partition (a check on the example batch, after tracing). A loss_fn
that returns a scalar is read as the mean loss of the micro-batch it is given,
and the step's loss is the mean over micro-batches (:mod:`pipec.loss`). That
equals the full batch's loss only when the loss is a mean over equal
micro-batches: a token mean with padding or ``ignore_index`` averages each
micro-batch over its own count, a summed loss is divided by the number of
micro-batches. :func:`check_loss_reduction` computes both on the first two
micro-batches of the example (a fixed cost of four micro-batch forwards however
many micro-batches there are: planning a large model on a laptop runs no more)
-- the model in eval mode (no dropout; batch norm on running statistics, which
does not change how the loss reduces) under ``torch.no_grad``, the model left
as it was (:func:`pipec._preserve.preserved`) -- and warns when they differ.
A ``(loss_sum, count)`` loss is exact by construction and not checked.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from pipec._preserve import preserved
from pipec.errors import ConfigError, PipecError
from pipec.loss import loss_parts
from pipec.microbatch import split_target

log = logging.getLogger(__name__)

#: relative and absolute tolerance of "the same loss" (float32 sums in another order)
_RTOL, _ATOL = 1e-4, 1e-6


def _joined(parts: list[Any]) -> Any:
    """Micro-batches ``parts`` as one batch again (tensors concatenated along dim 0)."""
    leaves, spec = zip(*(pytree.tree_flatten(p) for p in parts))
    joined = [torch.cat(list(xs), dim=0) if isinstance(xs[0], torch.Tensor) and xs[0].dim() > 0 else xs[0]
              for xs in zip(*leaves)]
    return pytree.tree_unflatten(joined, spec[0])


def _loss(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any],
          loss_fn: Callable[..., Any], target: Any) -> tuple[torch.Tensor, bool]:
    """The loss of one batch and whether it came as ``(loss_sum, count)``."""
    output = model(*args, **kwargs)
    parts = loss_parts(loss_fn(output) if target is None else loss_fn(output, target))
    return parts.loss.detach().double().cpu(), parts.num_items is not None


def check_loss_reduction(
    model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], *,
    loss_fn: Callable[..., Any] | None, target: Any, num_microbatches: int,
) -> None:
    """Warn when ``loss_fn``'s loss of the example's first two micro-batches taken as
    one batch differs from the mean of their two losses (what the pipeline computes).

    Runs the model three times (no gradients): on the two micro-batches joined and
    on each. A padding pattern that leaves the first two micro-batches with equal
    counts is not seen.
    A failure of the check itself is logged and skipped: partition has run the
    model already, and the runtime reports a loss_fn that fails.
    """
    if loss_fn is None or num_microbatches < 2:
        return
    try:  # each micro-batch as the runtime splits it; a batch that does not split is partition's to refuse
        batches = split_target((args, dict(kwargs)), num_microbatches, None)
        targets = [None] * num_microbatches if target is None else split_target(target, num_microbatches, None)
    except ConfigError:
        return
    batches, targets = batches[:2], targets[:2]
    (pair_args, pair_kwargs), pair_target = _joined(batches), _joined(targets)
    try:
        with preserved(model), torch.no_grad():
            model.eval()
            full, counted = _loss(model, pair_args, pair_kwargs, loss_fn, pair_target)
            if counted:
                return
            losses = [_loss(model, a, k, loss_fn, t)[0] for (a, k), t in zip(batches, targets)]
    except (PipecError, RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        log.info("could not compare the full batch's loss with the micro-batches' mean: %s", exc)
        return
    mean = torch.stack(losses).mean()
    if bool(torch.isclose(full, mean, rtol=_RTOL, atol=_ATOL)) or not bool(torch.isfinite(full)):
        return
    shown = ", ".join(f"{float(x):.6g}" for x in losses[:8]) + (", ..." if len(losses) > 8 else "")
    warnings.warn(
        f"loss_fn is not a mean over equal micro-batches: on the example's first two micro-batches "
        f"(model in eval mode) the loss of the two as one batch is {float(full):.6g}, but the "
        f"pipeline's loss -- the mean of the micro-batch losses ({shown}) -- is {float(mean):.6g}, "
        "and its gradients "
        "differ in the same way. A token mean with padding or ignore_index averages each micro-batch "
        "over its own count; a summed loss is divided by the number of micro-batches. Return "
        "(loss_sum, count) from loss_fn and the pipeline divides by the whole batch's count, e.g. "
        "(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction='sum'), "
        "(labels != -100).sum()).",
        UserWarning, stacklevel=4,
    )


__all__ = ["check_loss_reduction"]
