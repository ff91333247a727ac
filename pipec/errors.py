"""The one error hierarchy of pipec.

Every error a user can cause is a :class:`PipecError`, and each is also a
``ValueError`` (bad input) or a ``RuntimeError`` (something failed while
running), so callers that already catch those keep working. A message says
what was expected, what was found, and what to do.
"""

from __future__ import annotations


class PipecError(Exception):
    """Base class of every error pipec raises on purpose."""


class ConfigError(PipecError, ValueError):
    """An argument to a public function is out of range or inconsistent."""


class PrecisionError(ConfigError):
    """An unknown ``precision``, or one the device cannot compute in (:mod:`pipec.precision`)."""


class TraceError(PipecError, ValueError):
    """The model could not be captured as a graph."""


class ProfileError(PipecError, RuntimeError):
    """Measuring the per-node costs failed."""


class CostModelError(PipecError, ValueError):
    """A cost model (hardware file or object) is unknown or invalid."""


class PartitionError(PipecError, ValueError):
    """No split into stages satisfies the constraints, or the request is invalid."""


class ScheduleError(PipecError, ValueError):
    """A schedule is invalid, cannot be generated, or would deadlock."""


class PlanError(PipecError, ValueError):
    """A saved plan directory is missing, corrupt, or from another format version."""


class RuntimeFailure(PipecError, RuntimeError):
    """A pipeline rank failed while executing a schedule.

    ``rank`` is the rank that failed (or could not be reached), ``action`` the
    action it was executing (text form, e.g. ``"1B3"``) and ``step`` the
    training step, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int | None = None,
        action: str | None = None,
        step: int | None = None,
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.action = action
        self.step = step


class NonfiniteError(RuntimeFailure):
    """A training step produced a non-finite loss or gradient (``PipelineRuntime(nonfinite="raise")``);
    the message names the first stage, micro-batch and node where it appeared."""


class CheckpointError(PipecError, RuntimeError):
    """A checkpoint could not be written or read."""


__all__ = [
    "NonfiniteError",
    "CheckpointError",
    "ConfigError",
    "CostModelError",
    "PartitionError",
    "PipecError",
    "PlanError",
    "PrecisionError",
    "ProfileError",
    "RuntimeFailure",
    "ScheduleError",
    "TraceError",
]
