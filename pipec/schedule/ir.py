"""The schedule IR: actions per rank, with a compact text form that round-trips.

An :class:`Action` is ``(stage, kind, microbatch)``. Its text is
``<stage><kind><microbatch>``: ``2F0`` is stage 2's forward of micro-batch 0,
``0SEND_F1`` stage 0 sending the forward output of micro-batch 1. A
:class:`Schedule` holds one list of actions per rank and its *placement*:
``placement[s]`` is the rank that runs stage ``s`` -- by default round-robin,
``s % num_ranks`` (interleaved placement, Narayanan et al. 2021); a V-shaped
placement (:func:`v_placement`) puts the first and last stages on rank 0.
:meth:`Schedule.rank_of` is the one place every phase asks.

Text form, one line per rank::

    0: 0F0 0F1 0B0 0B1
    1: 1F0 1B0 1F1 1B1
"""

from __future__ import annotations

import re
from enum import Enum
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, field_serializer, field_validator, model_validator

from pipec.errors import ConfigError, ScheduleError


class ActionKind(str, Enum):
    F = "F"  # forward
    B = "B"  # full backward (input grad + weight grad)
    I = "I"  # noqa: E741  input-gradient backward
    W = "W"  # weight-gradient backward
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_compute(self) -> bool:
        return self in _COMPUTE

    @property
    def is_comm(self) -> bool:
        return not self.is_compute

    def __str__(self) -> str:
        return self.value


_COMPUTE = frozenset({ActionKind.F, ActionKind.B, ActionKind.I, ActionKind.W})

_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")


class Action(NamedTuple):
    stage: int
    kind: ActionKind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        m = _ACTION_RE.match(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise ScheduleError(
                f"cannot read action {text!r}: expected <stage><kind><microbatch> "
                "such as 2F0, 0B3, 1W2 or 0SEND_F1; fix or remove it"
            )
        return cls(int(m.group(1)), ActionKind(m.group(2)), int(m.group(3)))


def F(stage: int, microbatch: int) -> Action:
    return Action(stage, ActionKind.F, microbatch)


def B(stage: int, microbatch: int) -> Action:
    return Action(stage, ActionKind.B, microbatch)


def I(stage: int, microbatch: int) -> Action:  # noqa: E743
    return Action(stage, ActionKind.I, microbatch)


def W(stage: int, microbatch: int) -> Action:
    return Action(stage, ActionKind.W, microbatch)


def round_robin_placement(num_stages: int, num_ranks: int) -> tuple[int, ...]:
    """Stage ``s`` on rank ``s % num_ranks`` (the default placement)."""
    return tuple(s % max(1, num_ranks) for s in range(num_stages))


def v_placement(num_stages: int, num_ranks: int) -> tuple[int, ...]:
    """A V: down the ranks and back up, stage ``s`` on rank ``s`` for ``s < p`` and on
    ``2p - 1 - s`` after (``p = num_ranks``; ``num_stages = 2p``), as ZB-V and
    DualPipe-V place their two chunks per rank."""
    if num_stages != 2 * num_ranks:
        raise ScheduleError(
            f"a V-shaped placement needs num_stages = 2 x num_ranks, found num_stages={num_stages} "
            f"and num_ranks={num_ranks}; use two stages per rank"
        )
    return tuple(s if s < num_ranks else 2 * num_ranks - 1 - s for s in range(num_stages))


class Schedule(BaseModel):
    """A micro-batch schedule: ``actions[rank]`` is what that rank does, in order;
    ``placement[stage]`` is the rank that runs ``stage`` (default round-robin,
    filled in when absent, so plans saved before the field existed still load)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    num_stages: int
    num_microbatches: int
    stages_per_rank: int = 1
    actions: tuple[tuple[Action, ...], ...]
    placement: tuple[int, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _default_placement(cls, value: object) -> object:
        # A schedule without a placement (older plan.json, schedule text) is round-robin.
        if isinstance(value, dict) and not value.get("placement"):
            actions, n = value.get("actions"), value.get("num_stages")
            if isinstance(actions, (list, tuple)) and isinstance(n, int):
                value = {**value, "placement": round_robin_placement(n, len(actions))}
        return value

    @field_validator("actions", mode="before")
    @classmethod
    def _coerce_actions(cls, value: object) -> object:
        # Accept text actions ("2F0") and [stage, kind, mb] lists as saved in JSON.
        if isinstance(value, (list, tuple)):
            out = []
            for rank_actions in value:
                row = []
                for a in rank_actions:
                    if isinstance(a, str):
                        row.append(Action.parse(a))
                    elif isinstance(a, (list, tuple)) and len(a) == 3:
                        row.append(Action(int(a[0]), ActionKind(a[1]), int(a[2])))
                    else:
                        row.append(a)
                out.append(tuple(row))
            return tuple(out)
        return value

    @field_serializer("actions")
    def _serialize_actions(self, actions: tuple[tuple[Action, ...], ...]) -> list[list[str]]:
        return [[str(a) for a in row] for row in actions]

    @property
    def num_ranks(self) -> int:
        return len(self.actions)

    def rank_of(self, stage: int) -> int:
        """The rank that runs ``stage`` (``placement[stage]``)."""
        return self.placement[stage]

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages ``rank`` runs, ascending."""
        return tuple(s for s, r in enumerate(self.placement) if r == rank)

    @property
    def is_lowered(self) -> bool:
        return any(a.kind.is_comm for row in self.actions for a in row)

    def compute_only(self) -> Schedule:
        """The same schedule with communication actions removed."""
        return self.model_copy(
            update={"actions": tuple(tuple(a for a in row if a.kind.is_compute) for row in self.actions)}
        )

    def to_text(self) -> str:
        return "\n".join(
            f"{rank}: " + " ".join(str(a) for a in row) if row else f"{rank}:"
            for rank, row in enumerate(self.actions)
        ) + "\n"

    @classmethod
    def from_text(
        cls,
        text: str,
        *,
        name: str = "custom",
        num_stages: int | None = None,
        num_microbatches: int | None = None,
        stages_per_rank: int | None = None,
        placement: tuple[int, ...] | None = None,
    ) -> Schedule:
        """Parse the text form. Blank lines and ``#`` comments are ignored.

        Sizes not given are inferred: ``num_stages`` from the largest stage,
        ``num_microbatches`` from the largest micro-batch, ``stages_per_rank``
        as ``num_stages // num_ranks``; ``placement`` defaults to round-robin.
        """
        if not isinstance(text, str):
            raise ScheduleError(
                f"schedule text: expected a str with one '<rank>: <action> ...' line per rank, "
                f"found {type(text).__name__}; pass the text itself (decode bytes, read files first)"
            )
        for size_name, size in (("num_stages", num_stages), ("num_microbatches", num_microbatches),
                                ("stages_per_rank", stages_per_rank)):
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ScheduleError(
                    f"schedule text: {size_name} must be an integer >= 1, found {size!r}; "
                    "pass a positive whole number, or None to infer it from the actions"
                )
        rows: dict[int, tuple[Action, ...]] = {}
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            head, sep, body = line.partition(":")
            if not sep or not head.strip().isdigit():
                raise ScheduleError(
                    f"schedule text line {lineno}: expected '<rank>: <action> ...', found {raw!r}; "
                    "start each line with the rank number and a colon, e.g. '0: 0F0 0B0'"
                )
            rank = int(head)
            if rank in rows:
                raise ScheduleError(
                    f"schedule text line {lineno}: rank {rank} appears twice; "
                    "put all of a rank's actions on its one line"
                )
            try:
                rows[rank] = tuple(Action.parse(tok) for tok in body.split())
            except ScheduleError as exc:
                raise ScheduleError(f"schedule text line {lineno}: {exc}") from None
        if not rows:
            raise ScheduleError(
                "schedule text is empty: expected one '<rank>: ...' line per rank, "
                "found no such line; write e.g. '0: 0F0 0B0'"
            )
        if sorted(rows) != list(range(len(rows))):
            raise ScheduleError(
                f"schedule text: ranks must be 0..{len(rows) - 1} each once, found {sorted(rows)}; "
                "number the rank lines from 0 without gaps"
            )
        actions = tuple(rows[r] for r in range(len(rows)))
        all_actions = [a for row in actions for a in row]
        if num_stages is None:
            num_stages = max((a.stage for a in all_actions), default=len(rows) - 1) + 1
        if num_microbatches is None:
            num_microbatches = max((a.microbatch for a in all_actions), default=0) + 1
        if stages_per_rank is None:
            stages_per_rank = max(1, num_stages // len(rows))
        return cls(
            name=name,
            num_stages=num_stages,
            num_microbatches=num_microbatches,
            stages_per_rank=stages_per_rank,
            actions=actions,
            placement=tuple(placement) if placement else round_robin_placement(num_stages, len(actions)),
        )

    def __str__(self) -> str:
        return self.to_text()


def check_schedule(schedule: object, where: str) -> None:
    """A :class:`ConfigError` unless ``schedule`` is a :class:`Schedule` (the API boundary)."""
    if not isinstance(schedule, Schedule):
        hint = (
            "parse text with pipec.Schedule.from_text(text) first"
            if isinstance(schedule, str)
            else "build one with pipec.make_schedule(name, num_stages, num_microbatches)"
        )
        raise ConfigError(
            f"{where}: expected a pipec.Schedule, found {type(schedule).__name__}; {hint}"
        )
