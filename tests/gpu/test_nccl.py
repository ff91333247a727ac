"""The runtime on CUDA: NCCL process groups and the CUDA-event timeline.

Skipped without CUDA. With one GPU, a one-rank NCCL group runs two stages
interleaved on that rank (local hand-off, no P2P); with two or more GPUs, two
ranks exchange boundary tensors over NCCL, whose messages match by issue order.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))

from _handmade import Chain, chain_plan  # noqa: E402
from _workers import run_ranks  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BATCH = 8


def _reference(model: Chain, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ref = copy.deepcopy(model)
    loss = ((ref(x) - y) ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in ref.named_parameters()}


def _train_on_gpu(rank: int, world_size: int, cases: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    from pipec.runtime.runtime import PipelineRuntime

    out: dict[str, Any] = {}
    for key, (model, sched, bounds, tied, x, y) in cases.items():
        pipe = PipelineRuntime(chain_plan(model, sched, batch=BATCH, bounds=bounds, tied=tied))
        assert pipe.device.type == "cuda" and pipe.info.backend == "nccl"
        loss = pipe.step(x, target=y)
        out[key] = {
            "loss": None if loss is None else loss.cpu(),
            "grads": {n: p.grad.cpu() for n, p in pipe.named_parameters()},
            "devices": {str(p.device) for p in pipe.parameters()},
            "timeline": pipe.timeline(),
        }
    dist.destroy_process_group()
    return out


def _cases(num_ranks: int) -> dict[str, Any]:
    from pipec.schedule.generators import make_schedule

    cases = {}
    for name, spr in (("interleaved-1f1b", 2), ("1f1b", 1), ("zb-h1", 1)):
        if num_ranks == 1 and spr == 1:
            continue
        torch.manual_seed(0)
        stages = num_ranks * spr
        bounds = list(range(stages + 1))
        model = Chain(stages, tied=True)
        cases[name] = (model, make_schedule(name, stages, 4, spr), bounds, True,
                       torch.randn(BATCH, 8), torch.randn(BATCH, 8))
    if num_ranks == 1:  # the I/W split (graph reuse in W) on CUDA, two stages on one rank
        from pipec.schedule.ir import Schedule

        text = " ".join([f"{s}F{m}" for m in range(4) for s in (0, 1)]
                        + [f"{s}I{m}" for m in range(4) for s in (1, 0)]
                        + [f"{s}W{m}" for m in range(4) for s in (1, 0)])
        torch.manual_seed(1)
        cases["zb-local"] = (Chain(2, tied=True), Schedule.from_text(f"0: {text}", name="zb-local"),
                             [0, 1, 2], True, torch.randn(BATCH, 8), torch.randn(BATCH, 8))
    return cases


def _check(cases: dict[str, Any], per_rank: list[dict[str, Any]]) -> None:
    for key, (model, _, _, _, x, y) in cases.items():
        ref_loss, ref_grads = _reference(model, x, y)
        losses = [r[key]["loss"] for r in per_rank if r[key]["loss"] is not None]
        assert len(losses) == 1
        torch.testing.assert_close(losses[0], ref_loss, rtol=1e-4, atol=1e-5)
        for r in per_rank:
            assert all(d.startswith("cuda") for d in r[key]["devices"])
            for n, g in r[key]["grads"].items():
                torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-5, msg=lambda m, k=key, n=n: f"{k} {n}: {m}")
            tl = r[key]["timeline"]  # CUDA events: non-negative, ordered, one per action
            assert tl and all(0.0 <= s <= e for s, e, _, _ in tl)
            assert all(a[1] <= b[0] + 1e-4 for a, b in zip(tl, tl[1:]))


@pytest.mark.timeout(300)
def test_nccl_one_gpu_interleaved_on_one_rank() -> None:
    cases = _cases(1)
    per_rank = run_ranks(_train_on_gpu, 1, cases, backend="nccl", start_method="spawn", timeout=240)
    _check(cases, per_rank)


@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for a 2-rank NCCL run")
def test_nccl_two_ranks_every_schedule() -> None:
    cases = _cases(2)
    per_rank = run_ranks(_train_on_gpu, 2, cases, backend="nccl", start_method="spawn", timeout=240)
    _check(cases, per_rank)


def test_cuda_device_without_a_process_group() -> None:
    from pipec.runtime.runtime import PipelineRuntime
    from pipec.schedule.generators import make_schedule

    torch.manual_seed(0)
    model = Chain(2)
    pipe = PipelineRuntime(
        chain_plan(model, make_schedule("interleaved-1f1b", 2, 2, 2), batch=4, bounds=[0, 1, 2]), device="cuda"
    )
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    loss = pipe.step(x, target=y)
    ref_loss, _ = _reference(model, x, y)
    assert loss is not None and loss.device.type == "cuda"
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-4, atol=1e-5)
    assert pipe.forward(x).device.type == "cuda"
