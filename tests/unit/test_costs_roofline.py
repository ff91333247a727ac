"""Roofline arithmetic on hand-made cases with known FLOPs and bytes."""

from __future__ import annotations

import pytest
import torch

from pipec.costs.analytic import AnalyticCostModel
from pipec.costs.hardware import spec_from_dict

PEAK = 1e12
BANDWIDTH = 1e11
LAUNCH = 1e-6


def _model(dtype: str | None = None) -> AnalyticCostModel:
    spec = spec_from_dict({
        "name": "toy", "peak_flops": {"fp32": PEAK, "bf16": 4 * PEAK}, "memory_bandwidth": BANDWIDTH,
        "memory_capacity": 2**30, "gpus_per_node": 2, "intra_node_bandwidth": 1e10,
        "intra_node_latency": 1e-6, "inter_node_bandwidth": 1e9, "inter_node_latency": 1e-5,
        "kernel_launch_overhead": LAUNCH,
        "source": {"peak_flops": "made up", "memory_bandwidth": "made up", "memory_capacity": "made up"},
    })
    return AnalyticCostModel(spec, dtype=dtype)


@pytest.mark.parametrize(("m", "k", "n"), [(256, 512, 128), (8, 8, 8), (1024, 64, 1024)])
def test_matmul_flops_bytes_and_time(m: int, k: int, n: int) -> None:
    a, b = torch.randn(m, k), torch.randn(k, n)
    tally = _model().count_call(lambda: torch.mm(a, b))
    flops = 2 * m * k * n
    num_bytes = 4 * (m * k + k * n + m * n)
    assert tally.kernels == 1
    assert tally.flops == flops
    assert tally.num_bytes == num_bytes
    assert tally.time == pytest.approx(max(flops / PEAK, num_bytes / BANDWIDTH) + LAUNCH)


def test_compute_bound_and_memory_bound_sides() -> None:
    model = _model()
    assert model.kernel_time(1e9, 10) == pytest.approx(1e-3 + LAUNCH)  # compute bound
    assert model.kernel_time(10, 10**9) == pytest.approx(1e-2 + LAUNCH)  # memory bound


def test_dtype_picks_the_peak() -> None:
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a16, b16 = a.bfloat16(), b.bfloat16()
    own = _model().count_call(lambda: torch.mm(a16, b16))
    fp32 = _model().count_call(lambda: torch.mm(a, b))
    forced = _model(dtype="bf16").count_call(lambda: torch.mm(a, b))
    flops = 2 * 512**3
    assert fp32.time == pytest.approx(flops / PEAK + LAUNCH)
    assert forced.time == pytest.approx(flops / (4 * PEAK) + LAUNCH)
    assert own.time == pytest.approx(forced.time)


def test_views_are_free_and_gathers_read_their_rows() -> None:
    model = _model()
    x = torch.randn(64, 32)
    assert model.count_call(lambda: x.view(-1).t()).time == 0.0
    table, ids = torch.randn(10_000, 16), torch.tensor([1, 2, 3])
    tally = model.count_call(lambda: torch.nn.functional.embedding(ids, table))
    assert tally.num_bytes == 2 * 3 * 16 * 4 + ids.numel() * 8  # rows read + written, ids


def test_elementwise_is_memory_bound() -> None:
    x = torch.randn(1 << 16)
    tally = _model().count_call(lambda: torch.relu(x))
    assert tally.flops == 0 and tally.num_bytes == 2 * x.numel() * 4
    assert tally.time == pytest.approx(2 * x.numel() * 4 / BANDWIDTH + LAUNCH)
