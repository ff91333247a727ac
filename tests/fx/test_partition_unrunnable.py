"""What ``partition`` says about an interleaved split whose tensors skip stages.

Regression (issue #13): a model whose first stage feeds its last one directly
(a long residual; HF DistilBERT and CLIP text, whose attention mask is made
once) partitioned with ``interleaved-1f1b`` and then failed in ``save``,
``simulate`` and every rank; later, ``partition`` refused it. Now such a plan
is lowered for Gloo, whose tagged receives take messages in any order, and
partitions with a warning naming the backend that can run it. NCCL, which
matches a pair of ranks' messages in issue order, still cannot: the runtime
refuses it for NCCL with a message naming Gloo, and ``partition`` refuses a
plan no backend can run. (Gradients and a 2-rank run: tests/dist/test_interleaved_skips.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.errors import PartitionError, PlanError
from pipec.partitioner.api import check_runnable
from pipec.schedule.backends import plan_lowered


class LongSkip(nn.Module):
    """``stem``'s output is read again by the last stage, whatever the split."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Linear(8, dim)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(6)])
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(self.blocks(h) + h)


def _partition(schedule: str, num_stages: int, stages_per_rank: int) -> pipec.Plan:
    torch.manual_seed(0)
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    return pipec.partition(LongSkip(), (x,), num_stages=num_stages, schedule=schedule,
                           stages_per_rank=stages_per_rank, loss_fn=F.cross_entropy, target=y,
                           cost_model="h100-sxm")


def test_interleaved_split_with_a_long_skip_partitions_for_gloo_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"skip stages \('stem'\).*runs on Gloo only \(pipec run --backend gloo"):
        plan = _partition("interleaved-1f1b", 4, 2)
    assert set(plan.data.lowered) == {"gloo"}
    plan.simulate()
    plan.save(str(tmp_path))
    assert pipec.load(str(tmp_path)).data.lowered == plan.data.lowered


def test_nccl_is_still_refused_for_it_naming_gloo() -> None:
    with pytest.warns(UserWarning, match="Gloo only"):
        plan = _partition("interleaved-1f1b", 4, 2)
    with pytest.raises(PlanError, match=r"cannot run on nccl.*--backend gloo"):
        plan_lowered(plan.data, "nccl")


def test_a_plan_no_backend_can_run_is_refused_at_partition_naming_the_fix() -> None:
    with pytest.warns(UserWarning, match="Gloo only"):
        plan = _partition("interleaved-1f1b", 4, 2)
    unrunnable = plan.data.model_copy(update={"lowered": {}})
    with pytest.raises(PartitionError, match=r"skip stages \('stem'\).*no backend can run.*schedule='1f1b' or 'zb-h1'"):
        check_runnable(unrunnable)


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_one_stage_per_rank_runs_the_long_skip_on_every_backend(schedule: str, tmp_path: Path) -> None:
    plan = _partition(schedule, 4, 1)
    assert set(plan.data.lowered) == {"gloo", "nccl"}
    plan.simulate()
    plan.save(str(tmp_path))
