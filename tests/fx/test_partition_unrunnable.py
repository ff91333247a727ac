"""``partition`` with several stages per rank refuses a split its runtime cannot run.

Regression: a model whose first stage feeds its last one directly (a long
residual; HF DistilBERT and CLIP text, whose attention mask is made once)
partitioned with ``interleaved-1f1b`` without complaint, and only
``plan.save()``, ``plan.simulate()`` and the ranks then failed, on a lowering
message about receive order that named no fix a user can apply.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.errors import PartitionError


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


def test_interleaved_split_with_a_long_skip_is_refused_at_partition_naming_the_fix() -> None:
    with pytest.raises(PartitionError, match=r"skip stages \('stem'\).*schedule='1f1b' or 'zb-h1'"):
        _partition("interleaved-1f1b", 4, 2)


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_one_stage_per_rank_runs_the_long_skip(schedule: str, tmp_path: object) -> None:
    plan = _partition(schedule, 4, 1)
    plan.simulate()
    plan.save(str(tmp_path))
