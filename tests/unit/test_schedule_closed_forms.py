"""The simulator reproduces each schedule's closed form under uniform costs.

Cost assumption: every stage costs the same; F, I, W vary per test (B = I + W).
For ZB-H1 the paper's closed form assumes F = I = W (Qi et al. 2023, section 3.1).
"""

from __future__ import annotations

import pytest

from pipec.schedule.generators import make_schedule
from pipec.schedule.simulator import simulate

SIZES = [(p, m) for p in (1, 2, 3, 4, 8) for m in (1, 2, 3, 4, 7, 8, 16) if p * m <= 64]


@pytest.mark.parametrize(("p", "m"), SIZES)
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_step_time(name: str, p: int, m: int) -> None:
    forward, input_grad, weight_grad = 1.5, 1.25, 0.75
    sim = simulate(
        make_schedule(name, p, m), forward=forward, input_grad=input_grad, weight_grad=weight_grad
    )
    chunk = forward + input_grad + weight_grad
    assert sim.step_time == pytest.approx((m + p - 1) * chunk)
    assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert sim.busy_time == pytest.approx([m * chunk] * p)


@pytest.mark.parametrize(("p", "m"), SIZES)
def test_inflight_peaks(p: int, m: int) -> None:
    costs = {"forward": 1.0, "input_grad": 1.0, "weight_grad": 1.0}
    gpipe = simulate(make_schedule("gpipe", p, m), **costs)
    one_f_one_b = simulate(make_schedule("1f1b", p, m), **costs)
    assert gpipe.peak_inflight == (m,) * p
    assert one_f_one_b.peak_inflight == tuple(min(p - k, m) for k in range(p))


@pytest.mark.parametrize(
    ("p", "v", "m"),
    [(p, v, m) for p in (2, 3, 4) for v in (2, 3, 4) for m in (p, p + 1, 2 * p, 3 * p + 1, 4 * p)],
)
def test_interleaved_no_slower_than_its_closed_form(p: int, v: int, m: int) -> None:
    forward, input_grad, weight_grad = 0.5, 0.75, 0.25  # per stage (one chunk of a rank)
    sim = simulate(
        make_schedule("interleaved-1f1b", p * v, m, v),
        forward=forward,
        input_grad=input_grad,
        weight_grad=weight_grad,
    )
    chunk = forward + input_grad + weight_grad
    assert sim.step_time <= (m * v + p - 1) * chunk + 1e-9
    # and it is an interleaved schedule: faster than 1F1B over the same model
    plain = (m + p - 1) * chunk * v
    assert sim.step_time < plain


@pytest.mark.parametrize(
    ("p", "m"), [(p, m) for p in (2, 3, 4, 8) for m in (p, p + 1, 2 * p, 4 * p)]
)
def test_zb_h1_step_time_and_memory(p: int, m: int) -> None:
    t = 0.5  # F = I = W, the paper's assumption
    sim = simulate(make_schedule("zb-h1", p, m), forward=t, input_grad=t, weight_grad=t)
    assert sim.step_time == pytest.approx(m * 3 * t + (p - 1) * (t + t - t))
    one_f_one_b = simulate(make_schedule("1f1b", p, m), forward=t, input_grad=t, weight_grad=t)
    assert max(sim.peak_inflight) <= max(one_f_one_b.peak_inflight)
    assert sim.step_time < one_f_one_b.step_time


@pytest.mark.parametrize("m", [1, 2, 3])
def test_zb_h1_with_fewer_microbatches_than_ranks(m: int) -> None:
    sim = simulate(make_schedule("zb-h1", 4, m), forward=1.0, input_grad=1.0, weight_grad=1.0)
    one_f_one_b = simulate(
        make_schedule("1f1b", 4, m), forward=1.0, input_grad=1.0, weight_grad=1.0
    )
    assert sim.step_time <= one_f_one_b.step_time
