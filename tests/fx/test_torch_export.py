"""The torch export (``pipec.export_torch``, ``pipec export DIR --format torch``) in one process.

What it writes (torch's CSV of the plan's lowered schedule, the stage modules,
torch_export.json), that the stage modules chained as torch chains them
compute the model, what it refuses (with the limitation named) and that a
failed export leaves nothing behind. The run on torch's runtime is
tests/dist/test_torch_interop.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import LongSkip, TiedLM, TwoInput
from torch import nn
from torch.nn import functional as F

import pipec
from pipec.cli import main
from pipec.facade import Plan
from pipec.partitioner.assemble import plan_from_split
from pipec.schedule.backends import plan_lowered
from pipec.schedule.torch_csv import from_torch_csv
from pipec.split.torch_export import load_torch_stage
from pipec.types import NodeCost


def _plan(model: nn.Module, inputs: tuple[torch.Tensor, ...], split: list[str], **kwargs: object) -> Plan:
    traced = pipec.trace(model, inputs)
    costs = {n.name: NodeCost(forward_time=1e-4, input_grad_time=1e-4, weight_grad_time=1e-4) for n in traced.nodes}
    return Plan(plan_from_split(traced, costs, split, **kwargs), traced=traced)  # type: ignore[arg-type]


def _two_input() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], Plan]:
    torch.manual_seed(0)
    model = TwoInput()
    inputs = (torch.randn(2, 8), torch.randn(2, 4))
    # stage 1 starts at the concatenation: two tensors cross the boundary
    return model, inputs, _plan(model, inputs, ["cat"], schedule="zb-h1", num_microbatches=4)


def test_export_writes_torch_csv_stage_modules_and_its_description(tmp_path: Path) -> None:
    _, _, plan = _two_input()
    out = pipec.export_torch(plan, tmp_path / "torch")
    assert sorted(p.name for p in out.iterdir()) == [
        "pipeline_order.csv", "pipeline_order_compute.csv", "plan", "torch_export.json"]
    lowered = plan_lowered(plan.data, "nccl")
    assert from_torch_csv(out / "pipeline_order.csv").actions == lowered.actions
    assert from_torch_csv(out / "pipeline_order_compute.csv").actions == plan.schedule.actions
    assert "1REDUCE_GRAD" in (out / "pipeline_order.csv").read_text()
    info = json.loads((out / "torch_export.json").read_text())
    assert (info["num_stages"], info["num_ranks"], info["num_microbatches"], info["placement"]) == (2, 2, 4, [0, 1])
    assert info["stage_arguments"][0] == ["a", "b"] and len(info["stage_arguments"][1]) == 2
    assert pipec.load(out / "plan").num_stages == 2  # a verified pipec plan


def test_stage_modules_chained_as_torch_chains_them_compute_the_model(tmp_path: Path) -> None:
    model, (a, b), plan = _two_input()
    out = pipec.export_torch(plan.save(tmp_path / "plan"), tmp_path / "torch")  # from a plan directory
    first, last = load_torch_stage(out, 0), pipec.load_torch_stage(out, 1)
    boundary = first(a, b)
    assert isinstance(boundary, tuple) and len(boundary) == 2  # two tensors, passed on positionally
    torch.testing.assert_close(last(*boundary), model(a, b))
    assert dict(last.stage.named_parameters()).keys() == {"mix.weight", "mix.bias", "out.weight", "out.bias"}
    with pytest.raises(pipec.PlanError, match="expected the 2 outputs of stage 0"):
        last(boundary[0])
    with pytest.raises(pipec.PlanError, match="stage_index must be 0..1"):
        load_torch_stage(out, 2)


def test_plans_torch_cannot_run_are_refused_naming_the_limitation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    skip = _plan(LongSkip(), (torch.randn(2, 8),), ["blocks_0_0", "add"], num_microbatches=2)
    with pytest.raises(pipec.PlanError, match=r"stage s to stage s \+ 1 \(no skip connections\)"):
        pipec.export_torch(skip, tmp_path / "skip")
    tied = _plan(TiedLM(), (torch.randint(0, 64, (2, 6)),), ["layers_1_0"], num_microbatches=2)
    with pytest.raises(pipec.PlanError, match=r"shared by several stages.*does not all-reduce"):
        pipec.export_torch(tied, tmp_path / "tied")
    # TwoInput split inside enc_b: stage 1 reads the model input b
    two = _plan(TwoInput(), (torch.randn(2, 8), torch.randn(2, 4)), ["enc_a_2"], num_microbatches=2)
    problems = pipec.PlanError
    with pytest.raises(problems, match=r"stage 1 reads \['b'\].*first stage only"):
        pipec.export_torch(two, tmp_path / "two")
    _, _, plain = _two_input()
    for update, pattern in (({"data_parallel": 2}, r"2 data-parallel replicas"),
                            ({"precision": "bf16"}, r"precision is bf16.*without pipec's autocast")):
        changed = Plan(plain.data.model_copy(update=update), traced=plain.traced)
        with pytest.raises(pipec.PlanError, match=pattern):
            pipec.export_torch(changed, tmp_path / "changed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_a_failed_export_leaves_the_old_one_and_no_half_written_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, plan = _two_input()
    out = pipec.export_torch(plan, tmp_path / "torch")
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}

    def broken(*args: object, **kwargs: object) -> str:
        raise OSError("disk full")

    monkeypatch.setattr("pipec.split.torch_export.to_torch_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        pipec.export_torch(plan, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(OSError, match="disk full"):
        pipec.export_torch(plan, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torch"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(pipec.PlanError, match="not a torch export of a pipec plan"):
        pipec.export_torch(plan, tmp_path / "other")


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, plan = _two_input()
    plan_dir = plan.save(tmp_path / "mlp")
    assert main(["export", str(plan_dir), "--format", "torch"]) == 0
    assert "pipeline_order.csv" in capsys.readouterr().out
    assert (tmp_path / "mlp-torch" / "torch_export.json").is_file()
    assert main(["export", str(plan_dir), "--format", "torch"]) == 2  # exists: --force to replace
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(plan_dir), "--format", "torch", "--force", "-o", str(tmp_path / "x")]) == 0
    assert main(["export", str(tmp_path / "nowhere"), "--format", "torch"]) == 2
    assert "no plan directory" in capsys.readouterr().err


def test_loss_grads_of_the_exported_stages_match_the_model(tmp_path: Path) -> None:
    # the modules torch wraps carry the plan's weights: a backward through the chain
    # gives the model's gradients, by original FQN
    model, (a, b), plan = _two_input()
    out = pipec.export_torch(plan, tmp_path / "torch")
    first, last = load_torch_stage(out, 0), load_torch_stage(out, 1)
    target = torch.randn(2, 2)
    F.mse_loss(last(*first(a, b)), target).backward()
    F.mse_loss(model(a, b), target).backward()
    got = {**dict(first.stage.named_parameters()), **dict(last.stage.named_parameters())}
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, msg=name)


def test_random_operations_are_said_to_draw_otherwise_on_torch(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 4))
    plan = _plan(model, (torch.randn(2, 4),), ["_2"], num_microbatches=2)
    with pytest.warns(UserWarning, match=r"stages \[0\] have random operations.*draws from the global generator"):
        pipec.export_torch(plan, tmp_path / "torch")


def test_load_torch_pipeline_needs_a_process_group_and_a_known_form(tmp_path: Path) -> None:
    _, _, plan = _two_input()
    out = pipec.export_torch(plan, tmp_path / "torch")
    with pytest.raises(pipec.ConfigError, match="inside a process group"):
        pipec.load_torch_pipeline(out, loss_fn=F.mse_loss)
    with pytest.raises(pipec.ConfigError, match="form: expected 'compute_comms' or 'compute_only'"):
        pipec.load_torch_pipeline(out, form="lowered")
    with pytest.raises(pipec.PlanError, match="holds no torch_export.json"):
        load_torch_stage(tmp_path, 0)
