"""Whether the model itself draws random numbers in eval mode.

Phase: partition (a check on the example micro-batch, after tracing). A graph
traced in training mode can hold random nodes with no mode argument
(:func:`pipec.mode_ops.mode_blind_random`): the stages draw them in eval too.
That is wrong when the model's Python skips them in eval (stochastic depth),
and right when the model samples in both modes (a VAE's reparameterisation,
noise injection). :func:`draws_in_eval` tells the two apart by running the
model in eval mode twice under different seeds, the model left as it was
(:func:`pipec._preserve.preserved`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from pipec._preserve import preserved

log = logging.getLogger(__name__)


def draws_in_eval(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether ``model.eval()``'s output on ``(args, kwargs)`` changes with the seed;
    False when it cannot be run (then the stages' random nodes are reported)."""
    outputs = []
    try:
        with preserved(model), torch.no_grad():
            model.eval()
            for seed in (0, 1):
                torch.manual_seed(seed)
                outputs.append(pytree.tree_leaves(model(*args, **kwargs)))
    except Exception as exc:  # the check is advisory: the nodes are then reported
        log.info("could not run the model in eval mode to see whether it draws random numbers: %s", exc)
        return False
    first, second = outputs
    return len(first) != len(second) or any(
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        and (a.shape != b.shape or not torch.equal(a, b))
        for a, b in zip(first, second)
    )


__all__ = ["draws_in_eval"]
