"""What ``partition`` says about an interleaved split whose tensors skip stages.

Regression (issue #13): a model whose first stage feeds its last one directly
(a long residual; HF DistilBERT and CLIP text, whose attention mask is made
once) partitioned with ``interleaved-1f1b`` and then failed in ``save``,
``simulate`` and every rank; later, ``partition`` refused it. Now such a plan
is lowered for every backend (the runtime keeps each pair's message order per
message) and partitions without a word. ``partition`` still refuses a plan no
backend can run, and warns, naming the backends that can, when some cannot.
(Gradients and 2-rank runs: tests/dist/test_interleaved_skips.py.)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from models import LongSkip
from torch.nn import functional as F

import pipec
from pipec.errors import PartitionError
from pipec.partitioner.api import check_runnable


def _partition(schedule: str, num_stages: int, stages_per_rank: int) -> pipec.Plan:
    torch.manual_seed(0)
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    return pipec.partition(LongSkip(), (x,), num_stages=num_stages, schedule=schedule,
                           stages_per_rank=stages_per_rank, loss_fn=F.cross_entropy, target=y,
                           cost_model="h100-sxm")


@pytest.mark.parametrize("schedule,stages_per_rank", [("interleaved-1f1b", 2), ("1f1b", 1), ("zb-h1", 1)])
def test_the_long_skip_partitions_for_every_backend(schedule: str, stages_per_rank: int, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        plan = _partition(schedule, 4, stages_per_rank)
    assert set(plan.data.lowered) == {"gloo", "nccl"}
    plan.simulate()
    plan.save(str(tmp_path))
    assert pipec.load(str(tmp_path)).data.lowered == plan.data.lowered


def test_a_plan_only_some_backends_can_run_partitions_with_a_warning_naming_them() -> None:
    data = _partition("interleaved-1f1b", 4, 2).data
    gloo_only = data.model_copy(update={"lowered": {"gloo": data.lowered["gloo"]}})
    with pytest.warns(UserWarning, match=r"cannot run on nccl: this plan runs on gloo only \(pipec run --backend gloo\)"):
        check_runnable(gloo_only)


def test_a_plan_no_backend_can_run_is_refused_at_partition_naming_the_fix() -> None:
    data = _partition("interleaved-1f1b", 4, 2).data
    with pytest.raises(PartitionError, match=r"cannot run on gloo, nccl: no backend can run.*schedule='1f1b' or 'zb-h1'"):
        check_runnable(data.model_copy(update={"lowered": {}}))
