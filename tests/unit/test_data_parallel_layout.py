"""Issue #15, pure parts: the replicas' rank layout, old plans, where each stage's
gradient all-reduce starts, and the buckets it is cut into."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pipec
from pipec.microbatch import replica_share
from pipec.plan import PlanData
from pipec.runtime.data_parallel import _buckets, last_backward
from pipec.runtime.mesh import Mesh, position
from pipec.schedule.mesh import global_rank


def _data(data_parallel: int, mesh_order: tuple[str, str]) -> PlanData:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    plan = pipec.partition(model, torch.randn(8, 4), num_stages=2, num_microbatches=2, cost_model="cpu",
                           data_parallel=data_parallel)
    return plan.data.model_copy(update={"mesh_order": mesh_order})


@pytest.mark.parametrize(("order", "expected"), [
    (("dp", "pp"), {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1)}),  # a pipeline's ranks adjacent
    (("pp", "dp"), {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}),  # a stage's replicas adjacent
])
def test_mesh_orders_place_ranks(order: tuple[str, str], expected: dict[int, tuple[int, int]]) -> None:
    data = _data(2, order)
    assert data.world_size == 4
    for rank, (pp, dp) in expected.items():
        assert position(data, rank) == (pp, dp)
        assert global_rank(dp, pp, data_parallel=2, num_ranks=2, mesh_order=order) == rank
        mesh = Mesh(rank=rank, pp_rank=pp, dp_rank=dp, num_ranks=2, data_parallel=2, mesh_order=order)
        assert mesh.global_rank(pp) == rank and rank in mesh.pipeline_ranks() and rank in mesh.replica_ranks()


def test_plans_saved_before_load_with_one_replica() -> None:
    text = json.loads(_data(2, ("pp", "dp")).model_dump_json())
    assert text["data_parallel"] == 2 and text["mesh_order"] == ["pp", "dp"]
    del text["data_parallel"], text["mesh_order"]
    old = PlanData.model_validate(text)
    assert old.data_parallel == 1 and old.mesh_order == ("dp", "pp") and old.world_size == old.num_ranks
    with pytest.raises(ValueError, match="mesh_order"):
        PlanData.model_validate({**text, "mesh_order": ["dp", "dp"]})


def test_global_batch_recorded_and_split_per_replica() -> None:
    data = _data(2, ("dp", "pp"))
    assert data.batch_size == 8 and data.inputs[0].meta is not None and data.inputs[0].meta.shape[0] == 2
    x = torch.arange(8)
    assert replica_share(x, 2, 1).tolist() == [4, 5, 6, 7]
    share = replica_share({"x": x, "n": 3}, 2, 0)
    assert share["x"].tolist() == [0, 1, 2, 3] and share["n"] == 3  # non-tensors go to every replica
    with pytest.raises(pipec.PipecError, match="divisible by data_parallel=3"):
        replica_share(x, 3, 0)


def test_reduction_starts_after_each_stage_last_backward() -> None:
    """1F1B: each stage's last B; ZB-H1: the last of its I and W (W comes last)."""
    for name, kinds in (("1f1b", {"B"}), ("zb-h1", {"W"})):
        schedule = pipec.make_schedule(name, 2, 4)
        for rank, row in enumerate(schedule.actions):
            last = last_backward(row)
            assert set(last) == set(schedule.stages_of(rank))
            for stage, i in last.items():
                assert row[i].kind.value in kinds and row[i].microbatch == 3
                assert not any(a.stage == stage and a.kind.value in "BIW" for a in row[i + 1:])
    interleaved = pipec.make_schedule("interleaved-1f1b", 4, 4, stages_per_rank=2)
    last = last_backward(interleaved.actions[0])
    assert sorted(last) == [0, 2] and last[2] < last[0]  # the later stage's backward ends first


def test_buckets_hold_one_dtype_and_at_most_the_cap() -> None:
    params = [nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(10, dtype=torch.float64)),
              nn.Parameter(torch.zeros(30))]
    buckets = _buckets(params, bucket_bytes=80)  # 80 bytes: two float32 x 10
    sizes = [[p.numel() for p in b.params] for b in buckets]
    assert sizes == [[10, 10], [10], [30]]  # float64 alone; a parameter over the cap alone
    assert all(len({p.dtype for p in b.params}) == 1 for b in buckets)
