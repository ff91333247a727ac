"""Transfer times: alpha-beta over the intra- or inter-node link; profiled defaults."""

from __future__ import annotations

import pytest

from pipec.costs.analytic import load_cost_model
from pipec.costs.hardware import load_hardware
from pipec.costs.profiled import ProfiledCostModel, corrected_to_whole
from pipec.errors import CostModelError
from pipec.profiling import Profile
from pipec.types import NodeCost


def _profile(device: str = "cpu", device_name: str = "x86_64", memory: int | None = 2**34) -> Profile:
    cost = NodeCost(forward_time=1e-3, input_grad_time=1e-3, weight_grad_time=2e-3)
    return Profile(
        model_name="M", device=device, device_name=device_name, torch_version="2.x", num_threads=1,
        repeats=3, warmup=1, memory_capacity=memory, forward_time=1e-3, forward_backward_time=4e-3,
        nodes={"a": cost},
    )


def test_analytic_comm_uses_the_node_topology() -> None:
    model = load_cost_model("h100-sxm")
    spec = model.spec
    num_bytes = 64 * 2**20
    intra = model.comm_time(num_bytes, 0, 1)
    inter = model.comm_time(num_bytes, 7, 8)
    assert intra == pytest.approx(spec.intra_node_latency + num_bytes / spec.intra_node_bandwidth)
    assert inter == pytest.approx(spec.inter_node_latency + num_bytes / spec.inter_node_bandwidth)
    assert inter > 5 * intra
    assert model.comm_time(num_bytes, 3, 3) == 0.0
    assert model.comm_time(num_bytes, 8, 15) == pytest.approx(intra)  # both on node 1
    with pytest.raises(CostModelError, match="num_bytes"):
        model.comm_time(-1, 0, 1)


def test_comm_is_monotone_in_bytes() -> None:
    model = load_cost_model("a100-sxm-80gb", gpus_per_node=2)
    times = [model.comm_time(n, 0, 2) for n in (0, 1, 10**6, 10**9)]
    assert times == sorted(times) and times[0] == model.spec.inter_node_latency


def test_profiled_defaults_to_the_cpu_file_on_cpu() -> None:
    cpu = load_hardware("cpu")
    model = ProfiledCostModel(_profile())
    assert model.comm_time(10**6, 0, 1) == pytest.approx(cpu.intra_node_latency + 10**6 / cpu.intra_node_bandwidth)
    assert model.comm_time(10**6, 1, 1) == 0.0
    assert model.memory_capacity is None  # CPU ranks share the host: no default limit


def test_profiled_overrides_take_precedence() -> None:
    model = ProfiledCostModel(_profile(), link_bandwidth=1e9, link_latency=1e-5, memory_capacity="1GiB")
    assert model.comm_time(10**9, 0, 5) == pytest.approx(1e-5 + 1.0)
    assert model.memory_capacity == 2**30
    with_spec = ProfiledCostModel(_profile(), spec=load_hardware("h100-sxm"))
    assert with_spec.memory_capacity == load_hardware("h100-sxm").memory_capacity
    assert with_spec.comm_time(10**6, 0, 8) > with_spec.comm_time(10**6, 0, 7)
    with pytest.raises(CostModelError, match="link_bandwidth"):
        ProfiledCostModel(_profile(), link_bandwidth=0)


def test_profiled_matches_a_gpu_by_name() -> None:
    model = ProfiledCostModel(_profile("cuda:0", "NVIDIA H100 80GB HBM3"))
    assert model.spec.name == "h100-sxm"
    assert model.name == "profile:NVIDIA H100 80GB HBM3"


def test_profile_round_trips_through_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    prof = _profile()
    prof.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == prof
    (tmp_path / "bad.json").write_text("{}")
    from pipec.errors import ProfileError

    with pytest.raises(ProfileError, match="re-run"):
        Profile.load(tmp_path / "bad.json")


def _cost(f: float, i: float, w: float) -> NodeCost:
    return NodeCost(forward_time=f, input_grad_time=i, weight_grad_time=w)


def test_whole_model_forward_gap_is_a_fixed_cost_per_op_backward_gap_scales() -> None:
    # one big node timed right, three small ones; the whole model took 0.9 s more
    # forward than the nodes' sum, and its backward 16.9 s against their 16.3 s
    costs = {"big": _cost(10.0, 8.0, 8.0), "a": _cost(0.1, 0.1, 0.0), "b": _cost(0.1, 0.0, 0.0),
             "c": _cost(0.1, 0.05, 0.15), "x": _cost(0.0, 0.0, 0.0)}
    out = corrected_to_whole(costs, ["big", "a", "b", "c"], whole_forward=11.2, whole_forward_backward=11.2 + 16.9)
    assert out["x"] == costs["x"]  # not a compute node: unchanged
    for n in ("big", "a", "b", "c"):
        assert out[n].forward_time == pytest.approx(costs[n].forward_time + 0.225)
        assert out[n].input_grad_time == pytest.approx(costs[n].input_grad_time * 16.9 / 16.3)
        assert out[n].weight_grad_time == pytest.approx(costs[n].weight_grad_time * 16.9 / 16.3)
    assert out["b"].backward_time == 0.0
    assert sum(c.total_time for c in out.values()) == pytest.approx(11.2 + 16.9)


def test_whole_model_faster_than_its_nodes_scales_them() -> None:
    costs = {"a": _cost(2.0, 1.0, 1.0), "b": _cost(2.0, 2.0, 0.0)}
    out = corrected_to_whole(costs, ["a", "b"], whole_forward=2.0, whole_forward_backward=4.0)
    assert out["a"].forward_time == pytest.approx(1.0) and out["b"].forward_time == pytest.approx(1.0)
    assert out["a"].input_grad_time == pytest.approx(0.5) and out["b"].input_grad_time == pytest.approx(1.0)
    assert all(c.forward_time >= 0 and c.backward_time >= 0 for c in out.values())


# -- all-reduce (the tied-gradient exchange) --------------------------------------


def test_allreduce_is_a_ring_at_the_files_allreduce_bandwidth() -> None:
    cpu = load_hardware("cpu")
    assert cpu.allreduce_bandwidth is not None
    assert cpu.allreduce_efficiency == pytest.approx(cpu.allreduce_bandwidth / cpu.intra_node_bandwidth)
    n_bytes = 24_576_000
    # two ranks: two steps of half the bytes at the bus bandwidth, two latencies
    assert cpu.allreduce_time(n_bytes, [0, 1]) == pytest.approx(
        2 * cpu.intra_node_latency + n_bytes / cpu.allreduce_bandwidth)
    # slower than one transfer of the same bytes: Gloo copies and sums on the CPU
    assert cpu.allreduce_time(n_bytes, [1, 0]) > load_cost_model("cpu").comm_time(n_bytes, 0, 1)
    assert cpu.allreduce_time(n_bytes, [0]) == 0.0 and cpu.allreduce_time(n_bytes, [1, 1]) == 0.0
    with pytest.raises(CostModelError, match="num_bytes"):
        cpu.allreduce_time(-1, [0, 1])


def test_allreduce_across_nodes_runs_at_the_slowest_link() -> None:
    h100 = load_hardware("h100-sxm")
    assert h100.allreduce_bandwidth is None and h100.allreduce_efficiency == 1.0  # an ideal ring
    n_bytes = 2**30
    eight = h100.allreduce_time(n_bytes, range(8))
    assert eight == pytest.approx(14 * h100.intra_node_latency + 2 * 7 / 8 * n_bytes / h100.intra_node_bandwidth)
    two_nodes = h100.allreduce_time(n_bytes, [0, 8])
    assert two_nodes == pytest.approx(2 * h100.inter_node_latency + n_bytes / h100.inter_node_bandwidth)
    assert two_nodes > eight


def test_profiled_allreduce_takes_the_link_overrides() -> None:
    default = ProfiledCostModel(_profile())
    spec = default.spec
    n_bytes = 10**7
    assert default.allreduce_time(n_bytes, [0, 1]) == pytest.approx(spec.allreduce_time(n_bytes, [0, 1]))
    fast = ProfiledCostModel(_profile(), link_bandwidth=1e11, link_latency=0.0)
    # the override is the point-to-point link; the all-reduce keeps the file's efficiency
    assert fast.allreduce_time(n_bytes, [0, 1]) == pytest.approx(n_bytes / (1e11 * spec.allreduce_efficiency))


def test_a_cost_model_without_allreduce_gets_a_ring_of_its_transfers() -> None:
    from pipec.costs.ring import ring_allreduce_time
    from pipec.partitioner import config
    from pipec.partitioner.problem import ChainProblem

    def comm(num_bytes: int, src: int, dst: int) -> float:
        return 0.0 if src == dst else 1e-3 + num_bytes / 1e9

    class PointToPointOnly:
        comm_time = staticmethod(comm)

    assert config.allreduce_time(PointToPointOnly()) is None  # type: ignore[arg-type]
    assert config.allreduce_time(load_cost_model("cpu")) is not None
    assert config.allreduce_time(None) is None
    # 4 ranks: 6 steps of a quarter of the bytes each
    assert ring_allreduce_time(comm, 4 * 10**6, [3, 0, 1, 2]) == pytest.approx(6 * (1e-3 + 1e6 / 1e9))
    assert ring_allreduce_time(comm, 10**6, [2, 2]) == 0.0
    p = ChainProblem(compute_time=(1.0, 1.0), num_stages=2, comm_time=comm)
    assert p.exchange_time(2 * 10**6, (0, 1)) == pytest.approx(2 * (1e-3 + 1e6 / 1e9))
    q = ChainProblem(compute_time=(1.0, 1.0), num_stages=2, comm_time=comm, allreduce_time=lambda b, r: 0.5)
    assert q.exchange_time(2 * 10**6, (1, 0)) == 0.5 and q.exchange_time(10, (1,)) == 0.0
    free = ChainProblem(compute_time=(1.0, 1.0), num_stages=2)  # no comm model: transfers are free
    assert free.exchange_time(10**6, (0, 1)) == 0.0
