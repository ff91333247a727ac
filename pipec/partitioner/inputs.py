"""Phase partition: the example batch and the arguments of :func:`pipec.partition`.

Input: the user's ``example_inputs`` / ``example_kwargs`` / ``target`` and the
pipeline's shape arguments. Output: positional and keyword inputs, the batch
size, micro-batch 0 (what is traced and costed) and ConfigErrors for
arguments that cannot work. Shared by the single-configuration path
(:mod:`pipec.partitioner.api`) and the automatic search
(:mod:`pipec.partitioner.auto`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from pipec.errors import ConfigError
from pipec.microbatch import chunk, split_target
from pipec.schedule.generators import SCHEDULE_NAMES
from pipec.schedule.ir import Schedule

#: the value of ``schedule`` / ``num_microbatches`` / ``stages_per_rank`` that asks for a search
AUTO = "auto"


def check_auto_arguments(num_microbatches: object, schedule: object, stages_per_rank: object) -> None:
    """ConfigError for a string other than ``"auto"`` where a count or a schedule name goes."""
    for name, value in (("num_microbatches", num_microbatches), ("stages_per_rank", stages_per_rank)):
        if isinstance(value, str) and value != AUTO:
            raise ConfigError(f"{name}: expected a whole number or 'auto', found {value!r}; "
                              f"pass e.g. {name}=4, or 'auto' to search it")
    if isinstance(schedule, Schedule):
        if AUTO in (num_microbatches, stages_per_rank):
            raise ConfigError(f"schedule {schedule.name!r} is a Schedule of your own: it fixes num_microbatches "
                              f"({schedule.num_microbatches}) and stages_per_rank ({schedule.stages_per_rank}); "
                              "pass those numbers instead of 'auto'")
        return
    if schedule != AUTO and schedule not in SCHEDULE_NAMES:
        raise ConfigError(f"schedule: expected one of {', '.join(SCHEDULE_NAMES)} or 'auto', "
                          f"found {schedule!r}; pass one of these names")


def check_loss_fn(loss_fn: object) -> None:
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn: expected a callable loss_fn(output, target) -> scalar tensor, "
                          f"found {type(loss_fn).__name__}; pass e.g. torch.nn.functional.cross_entropy")


def split_inputs(example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``example_inputs`` as a tuple of positional arguments (a list, or one value, is
    wrapped), and ``example_kwargs`` as a dict."""
    args = example_inputs if isinstance(example_inputs, tuple) else (
        tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,))
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise ConfigError(
            f"example_kwargs: expected a dict of keyword arguments for forward, found "
            f"{type(example_kwargs).__name__}; pass e.g. example_kwargs={{'attention_mask': mask}}, "
            "or put positional inputs in example_inputs"
        )
    return args, dict(example_kwargs or {})


def _tensor_leaves(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    leaves, _ = pytree.tree_flatten_with_path((args, dict(kwargs)))
    return [(pytree.keystr(path), x) for path, x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0]


def batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    """Dim 0 of the first tensor input (None without tensor inputs)."""
    tensors = _tensor_leaves(args, kwargs)
    return int(tensors[0][1].shape[0]) if tensors else None


def default_microbatches(batch: int | None, num_ranks: int) -> int:
    """The largest divisor of ``batch`` that is at most ``2 * num_ranks`` (1 without a batch)."""
    if batch is None:
        return 1
    return max(d for d in range(1, min(batch, 2 * num_ranks) + 1) if batch % d == 0)


def first_target(target: Any, num_microbatches: int) -> Any:
    """Micro-batch 0 of ``target`` (None stays None), split as the runtime splits it."""
    if target is None:
        return None
    return split_target(target, num_microbatches, torch.device("cpu"))[0]


def first_microbatch(args: tuple[Any, ...], kwargs: Mapping[str, Any], num_microbatches: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Micro-batch 0: every tensor input with a dim 0 cut into ``num_microbatches`` equal parts."""
    for where, tensor in _tensor_leaves(args, kwargs):
        size = int(tensor.shape[0])
        if size % num_microbatches:
            divisors = [d for d in range(1, size + 1) if size % d == 0]
            raise ConfigError(
                f"num_microbatches: {num_microbatches} does not divide the batch of input {where} "
                f"(dim 0 = {size}); use one of {divisors}, or a batch that {num_microbatches} divides"
            )
    leaves, spec = pytree.tree_flatten((args, dict(kwargs)))
    parts = [chunk(x, num_microbatches)[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else x
             for x in leaves]
    mb_args, mb_kwargs = pytree.tree_unflatten(parts, spec)
    return tuple(mb_args), dict(mb_kwargs)


__all__ = ["AUTO", "batch_size", "check_auto_arguments", "check_loss_fn", "default_microbatches",
           "first_microbatch", "first_target", "split_inputs"]
