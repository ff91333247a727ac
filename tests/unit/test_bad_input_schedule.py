"""Bad input to the schedule phase and to ``parse_bytes`` gets a clear PipecError.

Each case checks the error class and that the message says what was expected,
what was found and what to do (issue #8).
"""

from __future__ import annotations

from typing import Any

import pytest

import pipec
from pipec.errors import ConfigError, PipecError, ScheduleError
from pipec.schedule.ir import Action, Schedule
from pipec.units import parse_bytes


def says(exc: pytest.ExceptionInfo[PipecError], *fragments: str) -> str:
    """The message, after checking it holds every fragment (case-insensitive)."""
    message = str(exc.value)
    missing = [f for f in fragments if f.lower() not in message.lower()]
    assert not missing, f"{missing} not in {message!r}"
    assert "Traceback" not in message
    return message


# -- make_schedule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("pipedream", 4, 8), ["unknown schedule 'pipedream'", "expected one of", "1f1b", "pass one of"]),
        (("ZB_H1", 4, 8), ["unknown schedule 'ZB_H1'", "expected one of", "did you mean 'zb-h1'"]),
        ((None, 4, 8), ["unknown schedule None", "expected one of", "gpipe"]),
        ((["1f1b"], 4, 8), ["unknown schedule ['1f1b']", "expected one of"]),
        (("1f1b", 0, 8), ["num_stages must be an integer >= 1", "found 0", "pass a positive whole number"]),
        (("1f1b", -3, 8), ["num_stages", "found -3", "pass"]),
        (("1f1b", 2.0, 8), ["num_stages", "found 2.0", "pass"]),
        (("gpipe", "4", 8), ["num_stages", "found '4'", "pass"]),
        (("gpipe", 4, 0), ["num_microbatches must be an integer >= 1", "found 0", "pass"]),
        (("1f1b", 4, 8, 0), ["stages_per_rank must be an integer >= 1", "found 0", "pass"]),
        (("interleaved-1f1b", 6, 8, 4), ["num_stages=6 is not divisible by stages_per_rank=4", "choose num_stages as a multiple"]),
        (("gpipe", 4, 8, 2), ["runs one stage per rank", "found stages_per_rank=2", "use 'interleaved-1f1b'"]),
        (("zb-h1", 4, 8, 2), ["runs one stage per rank", "found stages_per_rank=2", "or stages_per_rank=1"]),
        (("interleaved-1f1b", 4, 8, 1), ["needs stages_per_rank >= 2", "found 1", "use '1f1b'"]),
    ],
)
def test_make_schedule_rejects_bad_names_and_counts(args: tuple[Any, ...], fragments: list[str]) -> None:
    with pytest.raises(ScheduleError) as info:
        pipec.make_schedule(*args)
    says(info, *fragments)


# -- Schedule.from_text -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("hello", ["line 1", "expected '<rank>: <action> ...'", "found 'hello'", "start each line with the rank"]),
        ("0: 0F0 0B0\n1: 1F0 junk", ["line 2", "cannot read action 'junk'", "such as 2F0", "fix or remove it"]),
        ("0: 0X0", ["cannot read action '0X0'", "expected <stage><kind><microbatch>", "fix or remove"]),
        ("0: -1F0", ["cannot read action '-1F0'", "expected", "fix or remove"]),
        ("0: 0F0\n0: 0B0", ["line 2", "rank 0 appears twice", "put all of a rank's actions on its one line"]),
        ("0: 0F0 0B0\n2: 2F0 2B0", ["ranks must be 0..1", "found [0, 2]", "number the rank lines from 0"]),
        ("  \n# only a comment\n", ["empty", "expected one '<rank>: ...' line per rank", "found no such line", "write e.g."]),
    ],
)
def test_from_text_garbage_says_which_line_and_how_to_fix_it(text: str, fragments: list[str]) -> None:
    with pytest.raises(ScheduleError) as info:
        Schedule.from_text(text)
    says(info, *fragments)


@pytest.mark.parametrize("text", [None, b"0: 0F0 0B0", ["0: 0F0 0B0"]])
def test_from_text_needs_a_str(text: object) -> None:
    with pytest.raises(ScheduleError) as info:
        Schedule.from_text(text)  # type: ignore[arg-type]
    says(info, "expected a str", f"found {type(text).__name__}", "pass the text itself")


@pytest.mark.parametrize(("size", "value"), [("num_stages", 0), ("num_microbatches", -1), ("stages_per_rank", "2")])
def test_from_text_rejects_bad_sizes(size: str, value: object) -> None:
    with pytest.raises(ScheduleError) as info:
        Schedule.from_text("0: 0F0 0B0\n", **{size: value})  # type: ignore[arg-type]
    says(info, f"{size} must be an integer >= 1", f"found {value!r}", "pass a positive whole number")


def test_action_parse_of_a_non_string() -> None:
    with pytest.raises(ScheduleError) as info:
        Action.parse(7)  # type: ignore[arg-type]
    says(info, "cannot read action 7", "such as 2F0", "fix or remove it")


# -- simulate / validate / lower ----------------------------------------------------------


def _simulate(**costs: object) -> None:
    args: dict[str, Any] = {"forward": 1.0, "input_grad": 1.0, "weight_grad": 1.0, **costs}
    pipec.simulate(pipec.make_schedule("1f1b", 3, 4), **args)


@pytest.mark.parametrize(
    ("costs", "fragments"),
    [
        ({"weight_grad": [1.0, 1.0, 1.0, 1.0]}, ["weight_grad: expected one number or 3 (one per stage)", "found 4", "pass a float"]),
        ({"comm": []}, ["comm: expected one number or 3", "found 0", "sequence of length num_stages"]),
        ({"forward": "1.0"}, ["forward: expected a number or 3 numbers", "found str '1.0'", "pass a float"]),
        ({"input_grad": None}, ["input_grad: expected a number", "found NoneType", "pass"]),
        ({"forward": True}, ["forward: expected a number", "found bool True", "pass"]),
        ({"forward": [1.0, "fast", 1.0]}, ["forward[1]: expected a number", "found str 'fast'", "pass"]),
        ({"forward": [1.0, -2.0, 1.0]}, ["forward: expected finite numbers >= 0", "-2.0", "fix the costs"]),
    ],
)
def test_simulate_rejects_bad_costs(costs: dict[str, object], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        _simulate(**costs)
    says(info, *fragments)


@pytest.mark.parametrize("entry", [pipec.simulate, pipec.validate, pipec.lower])
def test_phase_entries_need_a_schedule_object(entry: Any) -> None:
    text = "0: 0F0 0B0\n1: 1F0 1B0\n"
    kwargs = {"forward": 1.0, "input_grad": 1.0, "weight_grad": 1.0} if entry is pipec.simulate else {}
    with pytest.raises(ConfigError) as info:
        entry(text, **kwargs)
    says(info, "expected a pipec.Schedule", "found str", "pipec.Schedule.from_text(text)")


# -- parse_bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        ("80 gigs", ["cannot read '80 gigs' as a size", "expected a number with a unit", "write e.g. '80GiB'"]),
        ("", ["cannot read '' as a size", "expected", "write e.g."]),
        ("-5GiB", ["cannot read '-5GiB'", "a size cannot be negative", "write e.g."]),
        ("12 PB", ["cannot read '12 PB'", "kib, mib, gib, tib", "write e.g."]),
        ("1e999GB", ["expected a size of at least one byte", "'1e999GB'", "pass e.g."]),
        ("0.1", ["at least one byte", "found '0.1'", "pass e.g."]),
        (-5, ["expected a positive size in bytes", "found -5", "pass e.g. 80e9"]),
        (float("nan"), ["expected a positive size", "found nan", "pass e.g."]),
        (True, ["expected a size such as 80GiB", "found True", "pass e.g."]),
        (None, ["expected a size such as '80GiB'", "found NoneType", "pass e.g."]),
    ],
)
def test_parse_bytes_garbage(value: object, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_bytes(value, what="memory_limit")  # type: ignore[arg-type]
    says(info, "memory_limit", *fragments)


def test_parse_bytes_still_reads_good_sizes() -> None:
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes(" 1.5 gb ") == 1_500_000_000
    assert parse_bytes(1e9) == 10**9
