"""plan.summary() says what its lower bound leaves out (issue #13): the bound counts compute only."""

from __future__ import annotations

from models import example

import pipec
from pipec.units import format_seconds


def test_summary_says_the_lower_bound_leaves_communication_out() -> None:
    model, inputs = example("mlp", 8)
    plan = pipec.partition(model, inputs, num_stages=2, num_microbatches=2, cost_model="h100-sxm")
    d = plan.data
    slowest = max(d.stages, key=lambda s: s.time)
    assert slowest.comm_time > 0  # a split whose stages exchange tensors

    # the bound as stated: compute only, on equal devices
    times = [d.node_costs[n].total_time for st in d.stages for n in st.nodes]
    assert d.lower_bound == max(sum(times) / d.num_stages, max(times))

    text = " ".join(plan.summary().split())
    assert f"lower bound {format_seconds(d.lower_bound)} = max(total compute / num_stages, largest node)" in text
    assert "compute only: communication (boundary transfers, tied all-reduces) is left out" in text
    compute = slowest.forward_time + slowest.backward_time
    assert (f"stage {slowest.index}, marked *: compute {format_seconds(compute)} + communication "
            f"{format_seconds(slowest.comm_time + slowest.tied_time)}") in text
