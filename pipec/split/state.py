"""State dicts of a split model: merge the stages' into one, or split one for a stage.

Phase: split. A tied parameter lives once per stage under its canonical FQN;
merging checks the copies agree and adds the other names the original
model's ``state_dict()`` has, so the result loads with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from pipec.errors import PlanError
from pipec.split.files import read_stage_aliases
from pipec.split.stage import StageModule

if TYPE_CHECKING:
    from pipec.plan import PlanLike


def merge_state_dicts(
    state_dicts: Iterable[Mapping[str, torch.Tensor]], *, plan: PlanLike | None = None
) -> dict[str, torch.Tensor]:
    """One full state dict from per-stage (or per-rank) state dicts.

    A tied parameter is stored once per stage under its canonical FQN; every
    copy must be equal (else :class:`PlanError`). With ``plan``, the other
    names of tied tensors (``lm_head.weight``) are added so the result loads
    into the original model with ``strict=True``.
    """
    merged: dict[str, torch.Tensor] = {}
    source: dict[str, int] = {}
    for k, sd in enumerate(state_dicts):
        for key, value in sd.items():
            if key in merged:
                _check_same(key, merged[key], value, source[key], k)
                continue
            merged[key] = value
            source[key] = k
    if plan is not None:
        for fqn, names in _plan_aliases(plan).items():
            if fqn in merged:
                for alias in names:
                    if alias in merged:
                        _check_same(alias, merged[alias], merged[fqn], source.get(alias, -1), source[fqn])
                    merged.setdefault(alias, merged[fqn])
    return merged


def split_state_dict(
    full_state_dict: Mapping[str, torch.Tensor], plan: PlanLike, index: int
) -> dict[str, torch.Tensor]:
    """The part of a full state dict that stage ``index`` of ``plan`` holds.

    The inverse of :func:`merge_state_dicts`: load a checkpoint saved from a
    plan with another number of stages (or from the plain model). A tied
    tensor saved only under another of its names is found by that name.
    """
    stage = plan.stage_module(index)
    if not isinstance(stage, StageModule):
        raise PlanError(f"stage {index} is a {type(stage).__name__}, not a pipec StageModule")
    wanted = stage.state_dict()
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for key, ref in wanted.items():
        names = (key, *stage.aliases.get(key, ()))
        found = next((full_state_dict[n] for n in names if n in full_state_dict), None)
        if found is None:
            missing.append(key)
            continue
        if tuple(found.shape) != tuple(ref.shape):
            raise PlanError(
                f"tensor {key!r} for stage {index}: expected shape {tuple(ref.shape)}, "
                f"found {tuple(found.shape)}; the checkpoint is from another model"
            )
        out[key] = found
    if missing:
        raise PlanError(
            f"stage {index} needs {len(missing)} tensor(s) the state dict lacks, e.g. "
            f"{missing[:5]}; pass a full state dict of the model this plan was made from"
        )
    return out


def _check_same(key: str, a: torch.Tensor, b: torch.Tensor, first: int, second: int) -> None:
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.detach().cpu(), b.detach().cpu()):
        raise PlanError(
            f"state dicts {first} and {second} hold different values for {key!r} "
            f"(shapes {tuple(a.shape)} and {tuple(b.shape)}); a tied parameter must be equal on "
            "every stage -- sum its gradients across stages before the optimizer step"
        )


def _plan_aliases(plan: PlanLike) -> dict[str, tuple[str, ...]]:
    aliases: dict[str, tuple[str, ...]] = {}
    for group in plan.data.tied_groups:
        aliases[group.fqn] = tuple(group.aliases)
    if plan.traced is not None:
        for fqn, info in plan.traced.params.items():
            if info.aliases:
                aliases[fqn] = tuple(dict.fromkeys((*aliases.get(fqn, ()), *info.aliases)))
    elif plan.directory is not None:
        for index in range(plan.data.num_stages):
            for fqn, names in read_stage_aliases(plan.directory, index).items():
                aliases[fqn] = tuple(dict.fromkeys((*aliases.get(fqn, ()), *names)))
    return aliases
