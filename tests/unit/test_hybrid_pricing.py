"""Data x pipeline parallelism, priced: the mesh's rank rule, ring all-reduce over a
replica group (intra- vs inter-node), pipeline links on the mesh, and the simulator's
per-stage all-reduce overlapping the drain."""

from __future__ import annotations

from typing import Any

import pytest

from pipec.costs.analytic import AnalyticCostModel
from pipec.costs.hardware import spec_from_dict
from pipec.costs.mesh_links import MeshCostModel
from pipec.errors import ConfigError
from pipec.schedule.generators import make_schedule
from pipec.schedule.mesh import DP_PP, PP_DP, global_rank, mesh_coords, node_of, replica_group
from pipec.schedule.simulator import simulate

INTRA_BW, INTRA_LAT, INTER_BW, INTER_LAT = 400e9, 5e-6, 40e9, 20e-6


def hardware(**changes: Any) -> AnalyticCostModel:
    data = {
        "name": "test-node", "peak_flops": {"fp32": 1e14}, "memory_bandwidth": 1e12,
        "memory_capacity": 80 * 2**30, "gpus_per_node": 4, "intra_node_bandwidth": INTRA_BW,
        "intra_node_latency": INTRA_LAT, "inter_node_bandwidth": INTER_BW, "inter_node_latency": INTER_LAT,
        "kernel_launch_overhead": 0.0, "source": {"peak_flops": "test", "memory_bandwidth": "test",
                                                   "memory_capacity": "test"},
    }
    return AnalyticCostModel(spec_from_dict({**data, **changes}))


def ring(num_bytes: int, n: int, bandwidth: float, latency: float) -> float:
    """The ring all-reduce, written out: 2 (n - 1) steps of a 1/n chunk."""
    return 2 * (n - 1) * (latency + -(-num_bytes // n) / bandwidth)


@pytest.mark.parametrize("order", [DP_PP, PP_DP])
def test_global_rank_and_coords_are_inverse(order: tuple[str, str]) -> None:
    d, p = 3, 4
    ranks = [global_rank(dp, pp, data_parallel=d, num_ranks=p, mesh_order=order)
             for dp in range(d) for pp in range(p)]
    assert sorted(ranks) == list(range(d * p))
    for dp in range(d):
        for pp in range(p):
            g = global_rank(dp, pp, data_parallel=d, num_ranks=p, mesh_order=order)
            assert mesh_coords(g, data_parallel=d, num_ranks=p, mesh_order=order) == (dp, pp)


def test_mesh_orders_as_agreed() -> None:
    # ("dp", "pp"): a pipeline's ranks adjacent; ("pp", "dp"): a stage's replicas adjacent
    assert global_rank(1, 2, data_parallel=2, num_ranks=4, mesh_order=DP_PP) == 6
    assert global_rank(1, 2, data_parallel=2, num_ranks=4, mesh_order=PP_DP) == 5
    assert replica_group(1, data_parallel=4, num_ranks=2, mesh_order=DP_PP) == (1, 3, 5, 7)
    assert replica_group(1, data_parallel=4, num_ranks=2, mesh_order=PP_DP) == (4, 5, 6, 7)
    assert [node_of(r, 4) for r in (0, 3, 4, 7, 8)] == [0, 0, 1, 1, 2]


def test_ring_allreduce_formula_inside_a_node() -> None:
    # D=4 replicas of a 2-rank pipeline, replicas adjacent, 4 per node: each group is one node
    mesh = MeshCostModel(hardware(), data_parallel=4, num_ranks=2, mesh_order=PP_DP, devices_per_node=4)
    num_bytes = 10**9
    assert mesh.dp_allreduce_time(num_bytes, 0) == pytest.approx(ring(num_bytes, 4, INTRA_BW, INTRA_LAT))
    assert mesh.dp_allreduce_time(num_bytes, 1) == pytest.approx(ring(num_bytes, 4, INTRA_BW, INTRA_LAT))


def test_ring_allreduce_goes_inter_node_when_replicas_straddle_nodes() -> None:
    # pipeline ranks adjacent: stage 0's replicas are global 0, 2, 4, 6 -- two nodes of 4
    mesh = MeshCostModel(hardware(), data_parallel=4, num_ranks=2, mesh_order=DP_PP, devices_per_node=4)
    num_bytes = 10**9
    assert mesh.dp_allreduce_time(num_bytes, 0) == pytest.approx(ring(num_bytes, 4, INTER_BW, INTER_LAT))
    # the same mesh on nodes of 8 holds every group inside one node
    wide = MeshCostModel(hardware(gpus_per_node=8), data_parallel=4, num_ranks=2, mesh_order=DP_PP,
                         devices_per_node=8)
    assert wide.dp_allreduce_time(num_bytes, 0) == pytest.approx(ring(num_bytes, 4, INTRA_BW, INTRA_LAT))


def test_one_replica_has_no_allreduce() -> None:
    mesh = MeshCostModel(hardware(), data_parallel=1, num_ranks=4, devices_per_node=4)
    assert mesh.dp_allreduce_time(10**9, 2) == 0.0


def test_pipeline_links_follow_the_mesh() -> None:
    num_bytes = 10**8
    intra = INTRA_LAT + num_bytes / INTRA_BW
    inter = INTER_LAT + num_bytes / INTER_BW
    together = MeshCostModel(hardware(), data_parallel=2, num_ranks=4, mesh_order=DP_PP, devices_per_node=4)
    apart = MeshCostModel(hardware(), data_parallel=2, num_ranks=4, mesh_order=PP_DP, devices_per_node=4)
    assert together.comm_time(num_bytes, 0, 1) == pytest.approx(intra)  # global 0 -> 1, 4 -> 5
    assert apart.comm_time(num_bytes, 0, 1) == pytest.approx(intra)  # global 0 -> 2, 1 -> 3
    assert apart.comm_time(num_bytes, 1, 2) == pytest.approx(inter)  # global 2 -> 4: the node boundary
    # a pipeline of 3 ranks, adjacent: replica 1 holds global 3, 4, 5, so 0 -> 1 crosses (3 -> 4)
    straddle = MeshCostModel(hardware(), data_parallel=2, num_ranks=3, mesh_order=DP_PP, devices_per_node=4)
    assert straddle.comm_time(num_bytes, 0, 1) == pytest.approx(inter)
    assert straddle.comm_time(num_bytes, 1, 1) == 0.0


def test_mesh_order_must_be_known() -> None:
    with pytest.raises(ConfigError, match="mesh_order"):
        MeshCostModel(hardware(), data_parallel=2, num_ranks=2, mesh_order=("pp", "pp"),
                      devices_per_node=4)


def test_allreduce_starts_after_the_stages_last_backward() -> None:
    sched = make_schedule("1f1b", 2, 3)
    sim = simulate(sched, forward=1.0, input_grad=1.0, weight_grad=1.0, grad_allreduce=[5.0, 0.5])
    last_backward = {s: max(e.end for e in sim.timeline if e.action.stage == s and e.action.kind.value == "B")
                     for s in (0, 1)}
    spans = {int(c.name.rsplit(" ", 1)[1]): c for c in sim.collectives}
    for stage in (0, 1):
        assert spans[stage].start == pytest.approx(last_backward[stage])
        assert spans[stage].ranks == (stage,)
    assert spans[0].end == pytest.approx(last_backward[0] + 5.0)
    # stage 1's all-reduce runs during stage 0's drain: the step ends with stage 0's
    assert spans[1].end < last_backward[0]
    assert sim.step_time == pytest.approx(spans[0].end)
    plain = simulate(sched, forward=1.0, input_grad=1.0, weight_grad=1.0)
    assert sim.step_time == pytest.approx(plain.step_time + 5.0)


def test_allreduce_after_split_backward_waits_for_w() -> None:
    sched = make_schedule("zb-h1", 2, 2)
    sim = simulate(sched, forward=1.0, input_grad=1.0, weight_grad=1.0, grad_allreduce=1.0)
    for c in sim.collectives:
        stage = int(c.name.rsplit(" ", 1)[1])
        last_w = max(e.end for e in sim.timeline if e.action.stage == stage and e.action.kind.value == "W")
        assert c.start == pytest.approx(last_w)


def test_allreduces_of_one_rank_take_turns() -> None:
    # two stages per rank: their all-reduces share the rank's stream, one after the other
    sched = make_schedule("interleaved-1f1b", 4, 2, 2)
    sim = simulate(sched, forward=1.0, input_grad=1.0, weight_grad=0.0, grad_allreduce=10.0)
    for rank in (0, 1):
        spans = sorted((c for c in sim.collectives if c.ranks == (rank,)), key=lambda c: c.start)
        assert len(spans) == 2
        assert spans[1].start >= spans[0].end - 1e-12


def test_grad_allreduce_is_checked() -> None:
    with pytest.raises(ConfigError, match="grad_allreduce"):
        simulate(make_schedule("1f1b", 2, 2), forward=1.0, input_grad=1.0, weight_grad=1.0,
                 grad_allreduce=[1.0])
