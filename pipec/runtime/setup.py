"""Building one rank's pieces from a plan: the plan itself, its lowered schedule, the
stage modules' tensor names, and the runtime's timeouts.

Phase: stage runtime (pure setup; no communication). Used by
:class:`~pipec.runtime.runtime.PipelineRuntime`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from pipec.errors import ConfigError, PlanError
from pipec.facade import Plan, load
from pipec.schedule.ir import Schedule

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0  # seconds one wait for a peer may last
DEFAULT_HEARTBEAT_TIMEOUT = 30.0  # seconds of silence after which a peer is unreachable


def seconds(value: float | None, env: str, default: float) -> float:
    if value is None:
        text = os.environ.get(env, "")
        try:
            value = float(text) if text else default
        except ValueError:
            raise ConfigError(f"{env}: expected a number of seconds, found {text!r}") from None
    if not value > 0:
        raise ConfigError(f"{env.removeprefix('PIPEC_').lower()}: expected seconds > 0, found {value}")
    return float(value)


def resolve_seed(seed: int | None) -> int:
    """The seed of the stages' random operations: ``seed``, or ``torch.initial_seed()``."""
    if seed is None:
        return int(torch.initial_seed())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: expected an int >= 0 (or None for torch.initial_seed()), found {seed!r}")
    return seed


def as_plan(plan_or_dir: Plan | str | os.PathLike[str]) -> Plan:
    if isinstance(plan_or_dir, Plan):
        return plan_or_dir
    if isinstance(plan_or_dir, (str, os.PathLike)):
        return load(Path(plan_or_dir))
    raise ConfigError(
        f"PipelineRuntime: expected a pipec.Plan or a plan directory, found {type(plan_or_dir).__name__}"
    )


def tensor_names(module: nn.Module, stage: int, attr: str) -> tuple[str, ...]:
    value = getattr(module, attr, None)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise PlanError(
            f"stage module {stage} ({type(module).__name__}) has no {attr} (a tuple of tensor names); "
            "the runtime needs the stage modules pipec.split builds, re-create the plan"
        )
    return tuple(value)


def grad_flags(module: nn.Module) -> dict[str, bool] | None:
    flags = getattr(module, "requires_grad", None)
    if isinstance(flags, Mapping):
        return {str(k): bool(v) for k, v in flags.items()}
    return None


def lowered_schedule(plan: Plan, backend: str | None) -> Schedule:
    """The schedule this rank runs: the plan's lowering for ``backend``, stored when the
    plan was made -- the one validated, simulated, saved and drawn
    (:func:`pipec.schedule.backends.plan_lowered`)."""
    schedule = plan.schedule
    if schedule.num_ranks != plan.num_ranks or schedule.num_stages != plan.num_stages:
        raise PlanError(
            f"the plan has {plan.num_stages} stages on {plan.num_ranks} ranks but its schedule "
            f"{schedule.name!r} has {schedule.num_stages} stages on {schedule.num_ranks} ranks; re-create the plan"
        )
    from pipec.schedule.backends import backend_kind, plan_lowered

    return plan_lowered(plan.data, backend_kind(backend))
