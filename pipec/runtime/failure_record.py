"""What a failed pipeline says: the :class:`FailureRecord` every rank agrees on, and
:class:`PeerFailure`, the error a rank raises when another rank (or the c10d store) failed.

Phase: stage runtime. Plain values, no communication: the monitor
(:mod:`pipec.runtime.failure`) publishes records through the c10d store, the
launcher (``pipec run``) reads them from each rank's last line on stderr.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from pipec.errors import RuntimeFailure

FAILURE_LINE_PREFIX = "PIPEC_FAILURE "


@dataclass(frozen=True)
class FailureRecord:
    """The failure that stops the pipeline. ``rank`` is the rank that failed or
    cannot be reached (None: the c10d store); ``reported_by`` the rank that wrote it."""

    rank: int | None
    action: str | None
    step: int | None
    message: str
    reported_by: int

    def describe(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "the c10d store"
        return f"{who} failed{_where(self.action, self.step)}: {self.message}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> FailureRecord | None:
        """The record in ``text``, or None when it is not one."""
        try:
            raw = json.loads(text)
            rank, action, step = raw["rank"], raw["action"], raw["step"]
            if not (rank is None or isinstance(rank, int)) or not (step is None or isinstance(step, int)):
                return None
            return cls(rank, None if action is None else str(action), step, str(raw["message"]),
                       int(raw["reported_by"]))
        except (ValueError, KeyError, TypeError):
            return None


def _where(action: str | None, step: int | None) -> str:
    if action is not None:
        return f" at action {action}" + (f" of step {step}" if step is not None else "")
    return f" in step {step}" if step is not None else ""


def failure_line(record: FailureRecord) -> str:
    """The one line a rank writes to stderr for ``pipec run`` to pick up."""
    return FAILURE_LINE_PREFIX + record.to_json()


def parse_failure_line(line: str) -> FailureRecord | None:
    head, sep, body = line.partition(FAILURE_LINE_PREFIX)
    if not sep or head.strip():
        return None
    return FailureRecord.from_json(body)


def one_line(text: str) -> str:
    return " ".join(text.split())


def record_of(exc: BaseException, *, rank: int, step: int | None, action: str | None = None) -> FailureRecord:
    """The record ``exc`` raised on ``rank`` stands for: the first failure a
    :class:`PeerFailure` saw, else ``exc`` itself (its cause, when it wraps one)."""
    if isinstance(exc, PeerFailure):
        return exc.record
    if isinstance(exc, RuntimeFailure):
        cause = exc.__cause__
        message = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        return FailureRecord(
            exc.rank if exc.rank is not None else rank,
            exc.action if exc.action is not None else action,
            exc.step if exc.step is not None else step,
            one_line(message),
            rank,
        )
    return FailureRecord(rank, action, step, one_line(f"{type(exc).__name__}: {exc}"), rank)


class PeerFailure(RuntimeFailure):
    """This rank stopped because another rank failed or could not be reached.

    ``rank``/``action``/``step`` say where *this* rank stopped, like any
    :class:`RuntimeFailure`; ``record`` (and ``failed_rank``, ``failed_action``,
    ``failed_step``) is the first failure, the one that stopped the pipeline.
    """

    def __init__(self, record: FailureRecord, *, rank: int, action: str | None = None,
                 step: int | None = None) -> None:
        super().__init__(f"{record.describe()}; rank {rank} stopped{_where(action, step)}",
                         rank=rank, action=action, step=step)
        self.record = record
        self.failed_rank = record.rank
        self.failed_action = record.action
        self.failed_step = record.step

    def located(self, *, action: str | None, step: int | None) -> PeerFailure:
        """The same failure, stopped at ``action`` of ``step`` on this rank. A record this
        rank made itself (a silent or lost peer) gets ``step``: the peer failed in it too."""
        rank = self.rank if self.rank is not None else -1
        record = self.record
        if record.step is None and record.reported_by == rank:
            record = replace(record, step=step)
        return PeerFailure(record, rank=rank, action=action, step=step)
