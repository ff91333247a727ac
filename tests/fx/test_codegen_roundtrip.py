"""Phase codegen: plan.save writes plain files atomically; pipec.load checks and reads them."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_split_models import assert_same_output, run_chain, traced_plan

import pipec
import pipec.codegen
from pipec.errors import PlanError
from pipec.facade import Plan
from pipec.plan import FORMAT_VERSION
from pipec.split import StageModule, merge_state_dicts


@pytest.fixture(scope="module")
def saved_tied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, Path]:
    _, _, plan = traced_plan("tied", 3)
    return plan, plan.save(tmp_path_factory.mktemp("tied") / "plan")


@pytest.mark.parametrize(("name", "method"), [("tied", "fx"), ("gpt2", "auto"), ("unet", "export"), ("two_input", "fx")])
def test_save_load_round_trip(tmp_path: Path, name: str, method: str) -> None:
    model, inputs, plan = traced_plan(name, 3, method=method)
    assert plan.traced is not None
    flat = plan.traced.flatten_inputs(inputs)
    expected, _ = run_chain(plan, flat)
    directory = plan.save(tmp_path / "plan")
    names = {p.name for p in directory.iterdir()}
    assert {"plan.json", "schedule.txt", "run.py"} <= names
    assert {f"stage_{k}.{ext}" for k in range(3) for ext in ("py", "safetensors")} <= names
    ast.parse((directory / "run.py").read_text())

    loaded = pipec.load(directory)
    assert loaded.traced is None and loaded.directory == directory
    assert loaded.data == plan.data
    got, _ = run_chain(loaded, flat)
    assert_same_output(got, expected)
    if name == "gpt2":
        assert "logits" in got.keys()  # noqa: SIM118
        on_meta = copy.deepcopy(loaded.stage_module(0)).to("meta")(flat[0].to("meta"))
        assert all(o.device.type == "meta" for o in on_meta)
    for k in range(3):
        fresh, mem = loaded.stage_module(k), plan.stage_module(k)
        assert isinstance(fresh, StageModule) and type(fresh).__name__ == f"Stage{k}"
        assert (fresh.input_names, fresh.output_names, fresh.is_last) == (mem.input_names, mem.output_names, mem.is_last)
        assert dict(fresh.requires_grad) == dict(mem.requires_grad)
        assert fresh.state_dict().keys() == mem.state_dict().keys()
    merged = merge_state_dicts((loaded.stage_module(k).state_dict() for k in range(3)), plan=loaded)
    model.load_state_dict(merged, strict=True)


def test_generated_stage_file_is_readable_python(saved_tied: tuple[Plan, Path]) -> None:
    plan, directory = saved_tied
    text = (directory / "stage_2.py").read_text()
    assert "class Stage2(StageModule):" in text and "def forward(self" in text
    assert "'embed.weight'" in text and "'head.weight': " not in text
    weights = load_file(str(directory / "stage_2.safetensors"))
    assert "embed.weight" in weights and "head.weight" not in weights
    torch.testing.assert_close(weights["embed.weight"], plan.stage_module(2).state_dict()["embed.weight"])
    schedule = (directory / "schedule.txt").read_text()
    assert schedule.startswith("0:") and "SEND_F" in schedule  # lowered
    assert (directory / "schedule.svg").read_text().lstrip().startswith("<")


def test_resaving_a_loaded_plan_keeps_it_loadable(saved_tied: tuple[Plan, Path], tmp_path: Path) -> None:
    plan, directory = saved_tied
    again = pipec.load(directory).save(tmp_path / "copy")
    assert (again / "stage_1.py").read_text() == (directory / "stage_1.py").read_text()
    for k in range(3):
        for key, value in pipec.load(again).stage_module(k).state_dict().items():
            torch.testing.assert_close(value, plan.stage_module(k).state_dict()[key])


def test_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, plan = traced_plan("mlp", 2)
    calls = []

    def failing_save_file(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipec.codegen, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        plan.save(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    target = plan.save(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls.clear()
    monkeypatch.setattr(pipec.codegen, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        plan.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_save_refuses_to_overwrite_what_is_not_a_plan(tmp_path: Path) -> None:
    _, _, plan = traced_plan("mlp", 2)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PlanError, match="not a pipec plan"):
        plan.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _copy(directory: Path, tmp_path: Path) -> Path:
    out = tmp_path / "plan"
    out.mkdir()
    for p in directory.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


def test_load_errors(saved_tied: tuple[Plan, Path], tmp_path: Path) -> None:
    _, directory = saved_tied
    with pytest.raises(PlanError, match="no plan directory"):
        pipec.load(tmp_path / "missing")
    plan_dir = _copy(directory, tmp_path)
    text = (plan_dir / "plan.json").read_text()

    (plan_dir / "plan.json").write_text(text[: len(text) // 2])
    with pytest.raises(PlanError, match="truncated"):
        pipec.load(plan_dir)
    raw = json.loads(text)
    raw["format_version"] = FORMAT_VERSION + 1
    (plan_dir / "plan.json").write_text(json.dumps(raw))
    with pytest.raises(PlanError, match="format_version"):
        pipec.load(plan_dir)
    raw["format_version"] = FORMAT_VERSION
    del raw["stages"]
    (plan_dir / "plan.json").write_text(json.dumps(raw))
    with pytest.raises(PlanError, match="stages"):
        pipec.load(plan_dir)
    (plan_dir / "plan.json").unlink()
    with pytest.raises(PlanError, match="plan.json"):
        pipec.load(plan_dir)


@pytest.mark.parametrize("damage", ["no_py", "no_weights", "wrong_shape", "truncated_weights", "extra_tensor"])
def test_load_refuses_damaged_stage_files(saved_tied: tuple[Plan, Path], tmp_path: Path, damage: str) -> None:
    _, directory = saved_tied
    plan_dir = _copy(directory, tmp_path)
    weights = plan_dir / "stage_1.safetensors"
    if damage == "no_py":
        (plan_dir / "stage_1.py").unlink()
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "truncated_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 100])
    else:
        tensors = load_file(str(weights))
        key = next(iter(tensors))
        if damage == "wrong_shape":
            tensors[key] = torch.zeros(tensors[key].numel() + 1)
        else:
            tensors["surprise.weight"] = torch.zeros(2)
        save_file(tensors, str(weights))
    with pytest.raises(PlanError, match="stage_1"):
        pipec.load(plan_dir)


def test_a_loaded_plan_is_the_same_class_and_answers_the_same(saved_tied: tuple[Plan, Path]) -> None:
    """#14: one Plan class for a plan made in memory and one read back (by pipec.load,
    and by the runtime's own loading of a directory)."""
    from pipec.runtime.setup import as_plan

    plan, directory = saved_tied
    loaded, opened = pipec.load(directory), as_plan(directory)
    assert type(plan) is type(loaded) is type(opened) is pipec.Plan is Plan
    assert loaded.simulate() == plan.simulate()
    assert loaded.summary() == plan.summary()
    assert repr(loaded) == repr(plan)
