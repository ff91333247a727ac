"""The runtime-overhead cost terms (issue #18): hardware file, plan, simulator, calibration maths, error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipec.costs.hardware import load_hardware, spec_from_dict
from pipec.errors import CostModelError
from pipec.schedule.generators import make_schedule
from pipec.schedule.lowering import lower
from pipec.schedule.simulator import simulate, simulate_plan
from pipec.types import RuntimeOverhead
from pipec.viz.report_compare import error_line, timelines_prediction

OVERHEAD = RuntimeOverhead(forward=0.1, backward=0.2, input_grad=0.3, weight_grad=0.4, send=0.05, recv=0.25,
                           step=0.5)


def test_of_kind_maps_every_action_kind() -> None:
    got = {k: OVERHEAD.of_kind(k) for k in ("F", "B", "I", "W", "SEND_F", "SEND_B", "RECV_F", "RECV_B", "ALLREDUCE")}
    assert got == {"F": 0.1, "B": 0.2, "I": 0.3, "W": 0.4, "SEND_F": 0.05, "SEND_B": 0.05,
                   "RECV_F": 0.25, "RECV_B": 0.25, "ALLREDUCE": 0.0}


def test_simulator_adds_overhead_per_action_and_step() -> None:
    # GPipe, 2 stages on 2 ranks, 2 micro-batches; F = 1, B = I + W = 2, messages 0.5 s
    lowered = lower(make_schedule("gpipe", 2, 2))
    sim = simulate(lowered, forward=1.0, input_grad=1.0, weight_grad=1.0, comm=0.5, overhead=OVERHEAD)
    events = {(e.rank, str(e.action)): (round(e.start, 6), round(e.end, 6)) for e in sim.timeline}
    assert events[(0, "0F0")] == (0.0, 1.1)  # 1 + forward overhead
    assert events[(0, "0SEND_F0")] == (1.1, 1.15)  # a send takes its overhead ...
    assert events[(1, "1RECV_F0")] == (0.0, 1.9)  # ... the message arrives 0.5 later, + recv overhead
    assert events[(1, "1RECV_F1")] == (3.0, 3.25)  # arrived at 2.8, while 1F0 ran: recv overhead only
    assert events[(1, "1B0")] == (4.35, 6.55)  # 2 + backward overhead
    assert events[(0, "0RECV_B0")] == (2.3, 7.35)  # 1SEND_B0 ends 6.6, + 0.5 + 0.25
    assert events[(0, "0B1")] == (9.8, 12.0)
    assert sim.step_time == pytest.approx(12.5)  # + the step's overhead


def test_simulator_without_overhead_is_unchanged() -> None:
    lowered = lower(make_schedule("zb-h1", 2, 4))
    plain = simulate(lowered, forward=1.0, input_grad=1.0, weight_grad=1.0, comm=0.5)
    zero = simulate(lowered, forward=1.0, input_grad=1.0, weight_grad=1.0, comm=0.5, overhead=RuntimeOverhead())
    assert zero.step_time == plain.step_time and zero.timeline == plain.timeline


def test_split_backward_pays_input_and_weight_overheads() -> None:
    # one rank, one stage: F I W per micro-batch back to back (zb-h1 on a single stage is F I W)
    sched = make_schedule("zb-h1", 1, 2)
    sim = simulate(sched, forward=1.0, input_grad=1.0, weight_grad=1.0, overhead=OVERHEAD)
    assert sim.step_time == pytest.approx(2 * (1.1 + 1.3 + 1.4) + 0.5)


def test_split_costs_per_node_on_stages_that_send_a_gradient_back() -> None:
    from test_schedule_simulator import _plan

    from pipec.schedule.simulator import split_costs

    plan = _plan("zb-h1")  # stage 0: nodes a, b; stage 1: node c; I/W split
    data = plan.data.model_copy(update={"runtime_overhead": RuntimeOverhead(split_per_param_node=0.25)})
    assert split_costs(data) == (0.0, 0.25)  # stage 0's W is a plain backward
    durations = {str(e.action): e.end - e.start for e in simulate_plan(data).timeline}
    assert durations["1W0"] == pytest.approx(1.0 + 0.25)
    assert durations["1I0"] == pytest.approx(1.0)
    one_f_one_b = _plan("1f1b").data.model_copy(update={"runtime_overhead": RuntimeOverhead(split_per_param_node=0.25)})
    durations = {str(e.action): e.end - e.start for e in simulate_plan(one_f_one_b).timeline}
    assert durations["1B0"] == pytest.approx(2.0)  # a full backward pays no split


def test_hardware_file_carries_and_checks_overhead() -> None:
    cpu = load_hardware("cpu")
    assert cpu.runtime_overhead is not None and cpu.runtime_overhead.forward > 0
    assert "runtime_overhead" in cpu.source
    data = json.loads(cpu.model_dump_json())
    data["runtime_overhead"] = {"forward": -1.0}
    with pytest.raises(CostModelError, match="runtime_overhead"):
        spec_from_dict(data)
    del data["runtime_overhead"]
    assert spec_from_dict(data).runtime_overhead is None  # files written before: nothing added


def test_plan_carries_the_cost_models_overhead_and_simulates_with_it() -> None:
    import torch
    from torch import nn

    import pipec
    from pipec.costs.analytic import AnalyticCostModel

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    cost_model = AnalyticCostModel(load_hardware("cpu"))
    plan = pipec.partition(model, (torch.randn(4, 8),), num_stages=2, num_microbatches=2, schedule="1f1b",
                           cost_model=cost_model)
    assert plan.data.runtime_overhead == cost_model.runtime_overhead
    base = simulate_plan(plan.data.model_copy(update={"runtime_overhead": None}))
    o = plan.data.runtime_overhead
    assert o is not None
    # 1F1B, 2 ranks, 2 micro-batches: the critical path runs every F and B of both
    # stages, both forward and both backward messages, and the step's end -- at least
    assert plan.simulate().step_time >= base.step_time + 2 * o.forward + o.step
    loaded = type(plan.data).model_validate_json(plan.data.model_dump_json())
    assert loaded.runtime_overhead == o  # saved in plan.json


def test_overhead_from_timelines_literal() -> None:
    from pipec.runtime.overhead_bench import overhead_from_timelines

    # stage times (forward, backward, input_grad, weight_grad, nodes): 1 ms F, 2 ms B, 1 ms I and W, 4 nodes
    own = [(1e-3, 2e-3, 1e-3, 1e-3, 4)] * 2
    rank0 = [(0.012, [(0.0001, 0.0012, 0, "0F0"), (0.0012, 0.0013, 0, "0SEND_F0"),
                      (0.0015, 0.0085, 0, "0RECV_B0"), (0.0085, 0.0106, 0, "0B0")])]
    rank1 = [(0.011, [(0.0002, 0.0016, 1, "1RECV_F0"), (0.0016, 0.0027, 1, "1F0"),
                      (0.0027, 0.0049, 1, "1B0"), (0.0049, 0.0050, 1, "1SEND_B0")])]
    zb0 = [(0.010, [(0.0, 0.0011, 0, "0F0"), (0.0011, 0.0012, 0, "0SEND_F0"), (0.0012, 0.0050, 0, "0RECV_B0"),
                    (0.0050, 0.0063, 0, "0I0"), (0.0063, 0.0077, 0, "0W0")])]
    zb1 = [(0.008, [(0.0, 0.0014, 1, "1RECV_F0"), (0.0014, 0.0025, 1, "1F0"), (0.0025, 0.0038, 1, "1I0"),
                    (0.0038, 0.0039, 1, "1SEND_B0"), (0.0039, 0.0053, 1, "1W0")])]
    got = overhead_from_timelines([{"1f1b": rank0, "zb-h1": zb0}, {"1f1b": rank1, "zb-h1": zb1}],
                                  {"1f1b": own, "zb-h1": own})
    assert got.forward == pytest.approx(0.1e-3)  # F spans 1.1, 1.1, 1.1, 1.1 ms
    assert got.backward == pytest.approx(0.15e-3)  # B spans 2.1 and 2.2 ms
    assert got.input_grad == pytest.approx(0.3e-3)  # I spans 1.3, 1.3 ms
    # stage 1 (it sends a gradient back): I + W over B = 0.3 + 0.4 - 0.2 ms, per node of its 4
    assert got.split_per_param_node == pytest.approx(0.5e-3 / 4)
    # W spans 1.4, 1.4 ms: 0.4 ms over, less the split's 4 x 0.125 ms (clamped at 0)
    assert got.weight_grad == 0.0
    assert got.send == pytest.approx(0.1e-3)
    # RECV spans sorted 1.4, 1.4, 3.8, 7.0 ms: the lower quartile 1.4 ms, plus the time between
    # actions (0.2 ms, on rank 0's first step) over the 4 receives
    assert got.recv == pytest.approx(1.4e-3 + 0.2e-3 / 4)
    # after the last action: 1.4, 6.1, 2.3, 2.7 ms (median 2.5); before the first: 0.1, 0.2, 0, 0 (median 0.05)
    assert got.step == pytest.approx(2.5e-3 + 0.05e-3)


def test_error_line_and_the_timelines_share_of_the_prediction() -> None:
    assert error_line(0.25, 0.2) == "measured step 250 ms vs predicted 200 ms (+25.0%)"
    assert error_line(0.0018, 0.002) == "measured step 1.8 ms vs predicted 2 ms (-10.0%)"
    assert error_line(0.1, 0.0) == "measured step 100 ms vs predicted 0 ms"


def test_report_and_show_print_the_error_of_the_last_run(tmp_path: Path) -> None:
    from test_report_render import handmade_plan, write_timelines

    from pipec.cli import _last_run_error
    from pipec.facade import Plan
    from pipec.viz.report import write_report

    plan = handmade_plan()
    plan = Plan(plan.data.model_copy(update={"runtime_overhead": RuntimeOverhead(forward=1e-4, step=2e-3)}))
    sim = plan.simulate()
    assert timelines_prediction(plan.data, sim) == pytest.approx(sim.step_time - 2e-3)
    assert _last_run_error(plan, str(tmp_path)) is None  # no run yet
    write_timelines(plan, tmp_path, scale=1.25)  # every action 1.25x its prediction
    line = _last_run_error(plan, str(tmp_path))
    assert line is not None and line.startswith("last run: measured step ") and "(+25.0%)" in line
    html = write_report(plan.data, tmp_path, traced=plan.traced).read_text(encoding="utf-8")
    assert "(+25.0%)</b>" in html and 'class="error-line"' in html
