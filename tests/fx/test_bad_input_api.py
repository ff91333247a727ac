"""Bad input to the Python API gets the right PipecError with a message that says
what was expected, what was found and what to do (issue #8).

Every partition here uses the analytic ``h100-sxm`` cost model (deterministic,
no profiling). Plan-directory errors of ``pipec.load`` live in
test_codegen_roundtrip.py; their CLI versions in test_bad_input_cli.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from models import example
from torch import nn

import pipec
from pipec.costs.hardware import list_cost_models
from pipec.errors import (
    ConfigError,
    CostModelError,
    PartitionError,
    PipecError,
    PlanError,
    ScheduleError,
    TraceError,
)


def says(exc: pytest.ExceptionInfo[PipecError], *fragments: str) -> str:
    """The message, after checking it holds every fragment (case-insensitive)."""
    message = str(exc.value)
    missing = [f for f in fragments if f.lower() not in message.lower()]
    assert not missing, f"{missing} not in {message!r}"
    assert "Traceback" not in message
    return message


def mlp_partition(model: Any = ..., inputs: Any = ..., **kwargs: Any) -> pipec.Plan:
    m, x = example("mlp", 8)
    args: dict[str, Any] = {"num_stages": 2, "cost_model": "h100-sxm", **kwargs}
    return pipec.partition(m if model is ... else model, x if inputs is ... else inputs, **args)


class Branchy(nn.Module):
    """Control flow on a tensor value: neither fx nor export can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.lin(x)
        return self.lin(x) * 2


# -- the model and its inputs ----------------------------------------------------------


@pytest.mark.parametrize("model", [lambda x: x, None, {"layers.0.weight": torch.zeros(2, 2)}])
def test_a_non_module_model(model: Any) -> None:
    with pytest.raises(ConfigError) as info:
        mlp_partition(model=model)
    says(info, "model: expected a torch.nn.Module", f"found {type(model).__name__}", "wrap")


def test_inputs_of_the_wrong_count() -> None:
    with pytest.raises(TraceError) as info:
        mlp_partition(inputs=(torch.randn(8, 16), torch.randn(8, 16)))
    says(info, "do not match MLP.forward(x", "found 2 positional input(s)", "pass example_inputs as a tuple")
    with pytest.raises(TraceError) as info:
        mlp_partition(inputs=())
    says(info, "missing a required argument: 'x'", "found 0 positional", "pass example_inputs")


def test_inputs_of_the_wrong_shape_name_the_shape_that_was_given() -> None:
    with pytest.raises(TraceError) as info:
        mlp_partition(inputs=(torch.randn(8, 7),), num_microbatches=4)
    message = says(info, "MLP fails on the example inputs", "x: float32[2, 7]", "check that example_inputs")
    assert "one micro-batch" in message  # explains why dim 0 is 2, not 8


def test_keyword_inputs_must_be_a_mapping() -> None:
    m, x = example("mlp", 8)
    with pytest.raises(ConfigError) as info:
        pipec.trace(m, x, [("x", x[0])])  # type: ignore[arg-type]
    says(info, "example_kwargs: expected a dict", "found list", "pass e.g.")


def test_an_untraceable_model_explains_both_attempts(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TraceError) as info:
        mlp_partition(model=Branchy(), inputs=(torch.randn(8, 4).abs(),))
    says(info, "could not trace Branchy", "fx:", "export:", "to fix", "torch.cond")
    assert "def forward" not in capfd.readouterr().err  # torch's partial graph dump is kept quiet


# -- counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "fragments"),
    [
        ({"num_stages": 0}, ConfigError, ["num_stages: expected >= 1", "found 0", "pass a whole number"]),
        ({"num_stages": -2}, ConfigError, ["num_stages: expected >= 1", "found -2", "pass a whole number"]),
        ({"num_stages": 2.5}, ConfigError, ["num_stages: expected an int", "found 2.5 (float)", "pass a whole number"]),
        ({"num_stages": "2"}, ConfigError, ["num_stages: expected an int", "found '2' (str)", "pass"]),
        ({"num_stages": 500}, PartitionError, ["num_stages: expected 1..", "found 500", "use fewer stages"]),
        ({"num_microbatches": 0}, ConfigError, ["num_microbatches: expected 1..8", "found 0", "pass a whole number in 1..8"]),
        ({"num_microbatches": 16}, ConfigError, ["expected 1..8", "found 16", "the batch has 8 samples", "pass"]),
        ({"num_microbatches": 3}, ConfigError, ["3 does not divide the batch", "dim 0 = 8", "use one of [1, 2, 4, 8]"]),
        ({"stages_per_rank": 0}, ConfigError, ["stages_per_rank: expected >= 1", "found 0", "pass a whole number"]),
        ({"num_stages": 4, "stages_per_rank": 3}, ConfigError, ["expected a divisor of num_stages=4", "found 3", "use one of [1, 2, 4]"]),
        ({"num_stages": 4, "stages_per_rank": 2}, ScheduleError, ["'1f1b' runs one stage per rank", "found stages_per_rank=2", "use 'interleaved-1f1b'"]),
        ({"schedule": "interleaved-1f1b"}, ScheduleError, ["needs stages_per_rank >= 2", "found 1", "use '1f1b'"]),
    ],
)
def test_bad_counts(kwargs: dict[str, Any], error: type[PipecError], fragments: list[str]) -> None:
    with pytest.raises(error) as info:
        mlp_partition(**kwargs)
    says(info, *fragments)


# -- names: schedule, strategy, method, cost model ----------------------------------------------


def test_an_unknown_schedule_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        mlp_partition(schedule="pipedream")
    says(info, "schedule: expected one of", "gpipe, 1f1b, interleaved-1f1b, zb-h1", "found 'pipedream'")


def test_an_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(PartitionError) as info:
        mlp_partition(strategy="fastest")
    says(info, "strategy: expected one of optimal", "greedy", "found 'fastest'")


def test_an_unknown_trace_method() -> None:
    with pytest.raises(ConfigError) as info:
        mlp_partition(method="jit")
    says(info, "method: expected one of auto, fx, export", "found 'jit'")


def test_an_unknown_cost_model_lists_the_known_ones() -> None:
    with pytest.raises(CostModelError) as info:
        mlp_partition(cost_model="tpu-v9")
    says(info, "unknown cost model 'tpu-v9'", *list_cost_models(), "pass a path to a JSON file", "pipec calibrate")


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("{\"name\": \"box\",", ["is not valid JSON", "line 1", "fix the syntax there"]),
        ("[1, 2]", ["must hold a JSON object", "found list"]),
        (json.dumps({"name": "box", "memory_bandwidth": -1}), ["invalid hardware description", "field 'peak_flops'", "field 'memory_bandwidth'", "found -1", "fix these fields"]),
    ],
)
def test_a_broken_cost_model_file(tmp_path: Path, content: str, fragments: list[str]) -> None:
    path = tmp_path / "box.json"
    path.write_text(content)
    with pytest.raises(CostModelError) as info:
        mlp_partition(cost_model=path)
    says(info, str(path), *fragments)


@pytest.mark.parametrize("where", ["missing.json", "."])
def test_a_cost_model_path_that_is_not_a_file(tmp_path: Path, where: str) -> None:
    path = tmp_path / where
    with pytest.raises(CostModelError) as info:
        pipec.load_cost_model(path)
    says(info, "hardware file", "does not exist" if where != "." else "is a directory", "pass", "h100-sxm")


def test_a_cost_model_that_is_neither_name_nor_path() -> None:
    with pytest.raises(CostModelError) as info:
        pipec.load_cost_model(None)  # type: ignore[arg-type]
    says(info, "expected a shipped name such as 'h100-sxm'", "found None", "pass one of")


# -- memory limit and device speeds ---------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "fragments"),
    [
        ("80 gigs", ["memory_limit: cannot read '80 gigs' as a size", "expected a number with a unit", "write e.g. '80GiB'"]),
        (-1, ["memory_limit: expected a positive size", "found -1", "pass e.g."]),
        ("-80GiB", ["cannot read '-80GiB'", "cannot be negative", "write e.g."]),
        (["80GiB", "lots"], ["memory_limit[1]: cannot read 'lots'", "write e.g."]),
        (["80GiB"] * 3, ["one size or one per rank (2)", "found 3 values", "pass e.g. '80GiB'"]),
    ],
)
def test_unreadable_memory_limits(limit: Any, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        mlp_partition(memory_limit=limit)
    says(info, *fragments)


def test_an_impossible_memory_limit_names_the_smallest_that_fits() -> None:
    with pytest.raises(PartitionError) as info:
        mlp_partition(memory_limit="1KiB")
    message = says(info, "fits the memory limit", "1.0 KiB per rank", "smallest per-rank limit that fits is",
                   "raise memory_limit")
    found = re.search(r"smallest per-rank limit that fits is ([0-9.]+) KiB", message)
    assert found is not None
    plan = mlp_partition(memory_limit=f"{float(found.group(1)) * 1.01:.2f}KiB")  # and it does fit
    assert plan.num_stages == 2


@pytest.mark.parametrize(
    ("speeds", "fragments"),
    [
        ([1.0], ["device_speeds: expected 2 values", "found 1", "pass one relative speed per rank, e.g. [1.0, 1.0]"]),
        ([1.0, 1.0, 1.0], ["expected 2 values", "found 3", "pass one relative speed per rank"]),
        ([1.0, 0.0], ["device_speeds[1]: expected a finite number > 0", "found 0.0", "pass each rank's speed"]),
        ([-1.0, 1.0], ["device_speeds[0]", "found -1.0", "e.g. 1.0 for a full device"]),
        ([1.0, float("nan")], ["device_speeds[1]", "found nan", "pass"]),
        ("1,1", ["device_speeds: expected one number per rank", "found '1,1'", "pass a list such as [1.0, 1.0]"]),
    ],
)
def test_bad_device_speeds(speeds: Any, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        mlp_partition(device_speeds=speeds)
    says(info, *fragments)


# -- other entry points ----------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "fragments"), [
    ({"repeats": 0}, ["repeats: expected a whole number >= 1", "found 0", "pass e.g. repeats=5"]),
    ({"repeats": "5"}, ["repeats: expected a whole number >= 1", "found '5'", "pass"]),
    ({"warmup": -1}, ["warmup: expected a whole number >= 0", "found -1", "pass e.g. warmup=2"]),
])
def test_profile_rejects_bad_repeats(kwargs: dict[str, Any], fragments: list[str]) -> None:
    m, x = example("mlp", 2)
    traced = pipec.trace(m, x, method="fx")
    with pytest.raises(ConfigError) as info:
        pipec.profile(traced, **kwargs)
    says(info, *fragments)


def test_profile_needs_a_traced_graph() -> None:
    m, _ = example("mlp", 2)
    with pytest.raises(ConfigError) as info:
        pipec.profile(m)  # type: ignore[arg-type]
    says(info, "expected a pipec.TracedGraph", "found MLP", "pipec.trace")


def test_load_needs_a_path() -> None:
    with pytest.raises(PlanError) as info:
        pipec.load(None)  # type: ignore[arg-type]
    says(info, "expected the path of a plan directory", "found NoneType", "pass the directory")


def test_example_kwargs_must_be_a_mapping() -> None:
    model, inputs = example("mlp", batch=8)
    with pytest.raises(ConfigError, match="example_kwargs: expected a dict"):
        pipec.partition(model, inputs, num_stages=2, cost_model="h100-sxm", example_kwargs=[1, 2])  # type: ignore[arg-type]


def test_loss_fn_must_be_callable() -> None:
    model, inputs = example("mlp", batch=8)
    with pytest.raises(ConfigError, match="loss_fn: expected a callable"):
        pipec.partition(model, inputs, num_stages=2, cost_model="h100-sxm", loss_fn=3)  # type: ignore[arg-type]
