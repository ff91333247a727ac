"""Mixed precision on the planner side: the precision names, the plan's boundaries and
communication in the compute dtype, the analytic model's per-dtype peaks, the profiler
under autocast, the summary and report, the loss-scale rule, and bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn

import pipec
from pipec.costs.analytic import AnalyticCostModel, load_cost_model
from pipec.costs.precision import check_device_precision, upcast_floats
from pipec.errors import ConfigError, PrecisionError
from pipec.partitioner.assemble import plan_from_split
from pipec.plan import PlanData
from pipec.runtime.amp import LossScaler, LossScaling
from pipec.types import TensorMeta, boundary_meta


class _MLP(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.a = nn.Linear(16, width)
        self.b = nn.Linear(width, width)
        self.c = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _plan(precision: str, cost_model: Any = "h100-sxm") -> pipec.Plan:
    torch.manual_seed(0)
    return pipec.partition(_MLP(), (torch.randn(8, 16),), num_stages=2, num_microbatches=2,
                           cost_model=cost_model, precision=precision)


def test_boundaries_cross_in_the_compute_dtype_at_half_the_bytes() -> None:
    fp32, bf16, fp16 = _plan("fp32"), _plan("bf16"), _plan("fp16")
    assert (fp32.data.precision, bf16.data.precision, fp16.data.precision) == ("fp32", "bf16", "fp16")
    for plan, dtype in ((fp32, "float32"), (bf16, "bfloat16"), (fp16, "float16")):
        assert plan.boundaries and all(b.dtype == dtype for b in plan.boundaries)
        itemsize = 4 if dtype == "float32" else 2
        assert all(b.num_bytes == itemsize * b.shape[0] * b.shape[1] for b in plan.boundaries)
    # the same cut in both precisions: half the bytes, and the link time the partitioner
    # and the simulator charge follows them
    traced = pipec.trace(_MLP(), (torch.randn(4, 16),))
    costs = load_cost_model("h100-sxm").node_costs(traced)
    full, half = (plan_from_split(traced, costs, [2], num_microbatches=2, cost_model=load_cost_model("h100-sxm"),
                                  precision=p) for p in ("fp32", "bf16"))
    (b32,), (b16,) = full.boundaries, half.boundaries
    assert (b32.name, b32.dtype, b16.dtype) == (b16.name, "float32", "bfloat16")
    assert b16.num_bytes * 2 == b32.num_bytes
    assert b16.transfer_times[0] < b32.transfer_times[0]
    assert half.stages[0].comm_time < full.stages[0].comm_time


def test_boundary_meta_casts_only_float32_and_half_floats() -> None:
    f32 = TensorMeta(shape=(2, 3), dtype="float32", num_bytes=24)
    assert boundary_meta(f32, "bf16") == TensorMeta(shape=(2, 3), dtype="bfloat16", num_bytes=12)
    assert boundary_meta(f32, "fp32") == f32
    for other in (TensorMeta(shape=(2, 3), dtype="int64", num_bytes=48),
                  TensorMeta(shape=(2, 3), dtype="float64", num_bytes=48)):  # autocast leaves fp64 alone
        assert boundary_meta(other, "fp16") == other


def test_unknown_precision_is_refused_before_tracing() -> None:
    with pytest.raises(PrecisionError, match=r"'fp32', 'bf16', 'fp16'.*found 'fp8'"):
        pipec.partition(_MLP(), (torch.randn(8, 16),), num_stages=2, cost_model="h100-sxm", precision="fp8")
    assert issubclass(PrecisionError, ConfigError) and issubclass(PrecisionError, pipec.PipecError)


def test_a_device_without_autocast_is_a_precision_error() -> None:
    for precision in ("bf16", "fp16"):
        with pytest.raises(PrecisionError, match="no autocast for device type 'meta'"):
            check_device_precision("meta", precision)
        check_device_precision("cpu", precision)  # torch >= 2.3 autocasts both on the CPU
    check_device_precision("meta", "fp32")  # fp32 needs no autocast


def test_plans_saved_before_precision_load_as_fp32(tmp_path: Path) -> None:
    plan = _plan("bf16")
    raw = plan.data.model_dump(mode="json")
    assert raw["precision"] == "bf16"
    del raw["precision"]
    assert PlanData.model_validate(raw).precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        PlanData.model_validate({**raw, "precision": "int4"})
    loaded = pipec.load(plan.save(tmp_path / "plan"))
    assert loaded.data.precision == "bf16" and loaded.boundaries == plan.boundaries


def test_summary_and_report_show_the_precision(tmp_path: Path) -> None:
    assert "precision fp32" in _plan("fp32").summary()
    plan = _plan("bf16")
    assert "precision bf16: stage forwards under autocast in bfloat16" in plan.summary()
    assert "loss scaling" in _plan("fp16").summary()
    report = (plan.save(tmp_path / "plan") / "report.html").read_text(encoding="utf-8")
    assert "precision bf16" in report


# -- the analytic cost model ------------------------------------------------------------------------


def _big_linear_costs(precision: str) -> tuple[AnalyticCostModel, Any, float]:
    """One 4096x4096 linear on 512 rows: compute-bound on an H100 in fp32 and bf16."""
    model = nn.Sequential(nn.Linear(4096, 4096))
    traced = pipec.trace(model, (torch.randn(512, 4096),))
    cost_model = load_cost_model("h100-sxm", precision=precision)
    costs = cost_model.node_costs(traced)
    node = next(n.name for n in traced.nodes if n.op not in ("placeholder", "output"))
    return cost_model, costs[node], 2.0 * 512 * 4096 * 4096


def test_analytic_model_prices_matmuls_at_the_compute_dtypes_peak() -> None:
    fp32_model, fp32, flops = _big_linear_costs("fp32")
    bf16_model, bf16, _ = _big_linear_costs("bf16")
    spec = fp32_model.spec
    assert fp32_model.name == "analytic:h100-sxm" and bf16_model.name == "analytic:h100-sxm[bf16]"
    # fp32 unchanged: the fp32 peak (67 TFLOP/s), as before precision existed
    at_fp32 = flops / (spec.peak_flops["fp32"] * spec.compute_efficiency)
    assert at_fp32 <= fp32.forward_time < 1.05 * at_fp32
    # bf16: the matmul at the bf16 peak (989 TFLOP/s), plus the casts autocast adds (memory-bound)
    at_bf16 = flops / (spec.peak_flops["bf16"] * spec.compute_efficiency)
    assert at_bf16 <= bf16.forward_time < at_fp32 / 5
    # the weight's cast and its gradient's cast back to float32 are memory-bound: still far faster
    assert bf16.total_time < fp32.total_time / 3


def test_analytic_fp32_costs_are_unchanged_by_the_precision_argument() -> None:
    model = _MLP()
    traced = pipec.trace(model, (torch.randn(8, 16),))
    spec = load_cost_model("h100-sxm").spec
    assert AnalyticCostModel(spec).node_costs(traced) == AnalyticCostModel(spec, precision="fp32").node_costs(traced)
    assert AnalyticCostModel(spec).node_costs(traced) != AnalyticCostModel(spec, precision="bf16").node_costs(traced)


def test_profiler_measures_under_the_precisions_autocast() -> None:
    traced = pipec.trace(_MLP(), (torch.randn(8, 16),))
    prof = pipec.profile(traced, repeats=1, warmup=0, progress=False, precision="bf16")
    assert prof.precision == "bf16"
    assert pipec.ProfiledCostModel(prof).name.endswith("[bf16]")
    assert pipec.profile(traced, repeats=1, warmup=0, progress=False).precision == "fp32"
    # autocast ran: the backward keeps bfloat16 copies (of the weights too), other bytes than fp32's
    fp32 = pipec.profile(traced, repeats=1, warmup=0, progress=False)
    assert [c.saved_bytes for c in prof.nodes.values()] != [c.saved_bytes for c in fp32.nodes.values()]


def test_a_profile_of_another_precision_warns() -> None:
    traced = pipec.trace(_MLP(), (torch.randn(4, 16),))
    measured = pipec.ProfiledCostModel(pipec.profile(traced, repeats=1, warmup=0, progress=False))
    with pytest.warns(UserWarning, match="profiled in fp32 but the plan is bf16"):
        pipec.partition(_MLP(), (torch.randn(8, 16),), num_stages=2, num_microbatches=2, cost_model=measured,
                        precision="bf16")


def test_loss_sees_float32_outputs() -> None:
    out = {"logits": torch.ones(2, dtype=torch.bfloat16), "ids": torch.ones(2, dtype=torch.int64),
           "pair": (torch.ones(1, dtype=torch.float16), 3)}
    up = upcast_floats(out)
    assert up["logits"].dtype == torch.float32 and up["ids"].dtype == torch.int64
    assert up["pair"][0].dtype == torch.float32 and up["pair"][1] == 3


# -- the loss-scale rule ----------------------------------------------------------------------------


def _scaler(**config: Any) -> LossScaler:
    return LossScaler(LossScaling(**config), precision="fp16", info=cast(Any, None), waiter=cast(Any, None),
                      params=list)


def test_loss_scale_halves_on_overflow_and_grows_after_the_interval() -> None:
    scaler = _scaler(init_scale=8.0, growth_interval=3, growth_factor=4.0, backoff_factor=0.25)
    calls: list[int] = []
    scales = []
    for overflow in (False, False, True, False, False, False, False):
        scaler.found_inf = overflow
        scaler.step(lambda: calls.append(1))
        scales.append(scaler.scale)
    assert scales == [8.0, 8.0, 2.0, 2.0, 2.0, 8.0, 8.0]
    assert len(calls) == 6  # the overflowed step was skipped
    assert scaler.state_dict() == {"scale": 8.0, "growth_tracker": 1}


def test_bf16_and_fp32_do_not_scale_unless_asked() -> None:
    for precision in ("fp32", "bf16"):
        off = LossScaler(LossScaling(), precision=precision, info=cast(Any, None), waiter=cast(Any, None),
                         params=list)
        assert not off.enabled and off.scale == 1.0
    assert LossScaler(LossScaling(enabled=True), precision="bf16", info=cast(Any, None),
                      waiter=cast(Any, None), params=list).scale == 2.0**16


@pytest.mark.parametrize("bad", [{"init_scale": 0.0}, {"growth_factor": 1.0}, {"backoff_factor": 1.5},
                                 {"growth_interval": 0}])
def test_bad_loss_scaling_is_a_config_error(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=f"LossScaling.{next(iter(bad))}"):
        LossScaling(**bad)


def test_the_auto_planner_plans_in_the_precision_too() -> None:
    torch.manual_seed(0)
    plan = pipec.partition(_MLP(), (torch.randn(8, 16),), num_stages=2, num_microbatches="auto",
                           schedule="auto", cost_model="h100-sxm", precision="bf16")
    assert plan.data.precision == "bf16" and plan.data.cost_model == "analytic:h100-sxm[bf16]"
    assert plan.boundaries and all(b.dtype == "bfloat16" for b in plan.boundaries)
    assert plan.simulate().step_time > 0
