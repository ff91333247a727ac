"""Loading checks a plan directory before trusting it: the manifest's checksums, the plan's
invariants and its schedule (issue #13: a plan.json with one action deleted trained rank 1
with wrong gradients and exited 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from models import example
from test_bad_input_cli import error_line, says, snapshot

import pipec
from pipec._files import sha256_file
from pipec.errors import PlanError
from pipec.manifest import MANIFEST_FILE

MARKER = "PIPEC_TEST_IMPORT_MARKER"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, inputs = example("mlp", 8)
    plan = pipec.partition(model, inputs, num_stages=2, num_microbatches=4, cost_model="h100-sxm")
    return plan.save(tmp_path_factory.mktemp("saved") / "plan")


@pytest.fixture
def plan_dir(saved: Path, tmp_path: Path) -> Path:
    out = tmp_path / "plan"
    out.mkdir()
    for p in saved.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipec.runtime.launch

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pipec run started processes for a plan it should have refused")

    monkeypatch.setattr(pipec.runtime.launch.subprocess, "Popen", refuse)


def edit_plan_json(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    raw = json.loads((directory / "plan.json").read_text())
    change(raw)
    (directory / "plan.json").write_text(json.dumps(raw, indent=2))


def delete_action(raw: dict[str, Any], text: str = "1B2") -> None:
    row = raw["schedule"]["actions"][1]
    row.remove(text)


def edit_stage_file(directory: Path) -> None:
    # an edit that would show if the file were imported: load must refuse it first
    with (directory / "stage_0.py").open("a") as f:
        f.write(f"\nimport os\nos.environ[{MARKER!r}] = 'imported'\n")


def flip_weight_byte(directory: Path) -> None:
    # inside the tensor data, past the header: the file still parses, every shape still
    # matches; only the checksum can tell
    file = directory / "stage_1.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))


# -- the manifest ---------------------------------------------------------------------------------


def test_save_writes_the_sha256_of_every_file(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    written = {p.name for p in saved.iterdir()} - {MANIFEST_FILE}
    assert set(manifest["checked"]) | set(manifest["recorded"]) == written
    assert set(manifest["checked"]) == {"plan.json", "schedule.txt", "stage_0.py", "stage_0.safetensors",
                                        "stage_1.py", "stage_1.safetensors"}
    for table in ("checked", "recorded"):
        for name, digest in manifest[table].items():
            assert digest == sha256_file(saved / name), name
    assert pipec.load(saved).data.num_stages == 2


def test_a_loaded_plan_saved_again_loads_verified(plan_dir: Path, tmp_path: Path) -> None:
    again = pipec.load(plan_dir).save(tmp_path / "again")
    assert pipec.load(again).data == pipec.load(plan_dir).data


# -- issue #13: a schedule with an action deleted ------------------------------------------------


@pytest.mark.parametrize("verify", [True, False])
def test_deleting_one_action_is_refused_at_load(plan_dir: Path, verify: bool) -> None:
    edit_plan_json(plan_dir, delete_action)
    with pytest.raises(PlanError) as info:
        pipec.load(plan_dir, verify=verify)
    says(str(info.value), "plan.json", "stage 1 micro-batch 2 on rank 1", "1B2", "re-run `pipec partition`")


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (lambda raw: raw.update(num_microbatches=5), ["num_microbatches is 5", "num_microbatches 4"]),
        (lambda raw: (raw.update(num_microbatches=5), raw["schedule"].update(num_microbatches=5)),
         ["lacks 0F4"]),
        (lambda raw: raw["stages"][1].update(rank=7), ["stage 1 is on rank 7", "runs it on rank 1"]),
        (lambda raw: raw["boundaries"][0].update(name="no_such_node"), ["boundary 'no_such_node'", "in no stage"]),
        (lambda raw: raw["boundaries"][0].update(consumer_stages=[5]), ["read by stages [5]"]),
        (lambda raw: raw["stages"].pop(), ["expected stages 0..1", "found stages [0]"]),
        (lambda raw: raw["schedule"]["actions"][0].append("0W1"), ["expected either 0B1 or both 0I1 and 0W1"]),
    ],
    ids=["num_microbatches", "num_microbatches_everywhere", "unknown_rank", "missing_node",
         "missing_consumer", "missing_stage", "extra_action"],
)
def test_hand_edits_that_break_invariants_are_refused(
    plan_dir: Path, change: Callable[[dict[str, Any]], None], fragments: list[str]
) -> None:
    edit_plan_json(plan_dir, change)
    for verify in (True, False):  # caught by the plan check itself, not only by the checksum
        with pytest.raises(PlanError) as info:
            pipec.load(plan_dir, verify=verify)
        says(str(info.value), "plan.json is not a consistent plan", *fragments, "re-run `pipec partition`")


def test_schedule_txt_must_lower_the_plans_schedule(plan_dir: Path) -> None:
    text = (plan_dir / "schedule.txt").read_text()
    (plan_dir / "schedule.txt").write_text(text.replace("0F1", "0F9", 1).replace("0F2", "0F1", 1)
                                           .replace("0F9", "0F2", 1))
    with pytest.raises(PlanError) as info:
        pipec.load(plan_dir, verify=False)
    says(str(info.value), "schedule.txt does not lower the schedule in plan.json", "rank 0", "0F2", "0F1")
    with pytest.raises(PlanError, match="schedule.txt"):
        pipec.load(plan_dir)


# -- files changed, missing, stray --------------------------------------------------------------


def test_an_edited_stage_file_is_refused_before_it_is_imported(
    plan_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MARKER, raising=False)
    edit_stage_file(plan_dir)
    with pytest.raises(PlanError) as info:
        pipec.load(plan_dir)
    says(str(info.value), str(plan_dir), "changed since pipec wrote it: stage_0.py", "A plan directory is code",
         "re-run `pipec partition`", "pipec.load(DIR, verify=False).save(NEW_DIR)")
    with pytest.raises(PlanError, match="stage_0.py"):
        pipec.PipelineRuntime(plan_dir)  # the runtime loads through the same check, before any rank works
    assert MARKER not in os.environ

    # the documented way to keep an edit made on purpose
    edited = pipec.load(plan_dir, verify=False)
    edited.stage_module(0)
    assert os.environ.pop(MARKER) == "imported"


def test_an_edited_stage_file_saved_again_loads(plan_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MARKER, raising=False)
    edit_stage_file(plan_dir)
    copy = pipec.load(plan_dir, verify=False).save(tmp_path / "kept")
    assert (copy / "stage_0.py").read_text() == (plan_dir / "stage_0.py").read_text()
    pipec.load(copy).stage_module(0)
    monkeypatch.delenv(MARKER, raising=False)


def test_corrupt_weights_are_refused(plan_dir: Path) -> None:
    flip_weight_byte(plan_dir)
    with pytest.raises(PlanError) as info:
        pipec.load(plan_dir)
    says(str(info.value), "changed since pipec wrote it: stage_1.safetensors")


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        ("no_manifest", ["has no manifest.json", "cannot be checked"]),
        ("bad_manifest", ["manifest.json is damaged"]),
        ("no_schedule_txt", ["missing: schedule.txt"]),
        ("stray_stage", ["not written by pipec with this plan", "stage_2.py"]),
        ("stray_weights", ["not written by pipec with this plan", "old.safetensors"]),
    ],
)
def test_missing_or_stray_files_are_refused(plan_dir: Path, damage: str, fragments: list[str]) -> None:
    if damage == "no_manifest":
        (plan_dir / MANIFEST_FILE).unlink()
    elif damage == "bad_manifest":
        (plan_dir / MANIFEST_FILE).write_text("{")
    elif damage == "no_schedule_txt":
        (plan_dir / "schedule.txt").unlink()
    elif damage == "stray_stage":
        (plan_dir / "stage_2.py").write_text((plan_dir / "stage_1.py").read_text())
    else:
        (plan_dir / "old.safetensors").write_bytes((plan_dir / "stage_1.safetensors").read_bytes())
    with pytest.raises(PlanError) as info:
        pipec.load(plan_dir)
    says(str(info.value), "refusing the plan in", *fragments)
    pipec.load(plan_dir, verify=False)  # every other check passes: only the manifest could tell


def test_what_running_and_editing_leave_behind_is_accepted(plan_dir: Path) -> None:
    (plan_dir / "timeline_rank0.json").write_text("{}")
    (plan_dir / "checkpoint").mkdir()
    (plan_dir / "checkpoint" / "stage_0.safetensors").write_bytes(b"not checked")
    (plan_dir / "notes.txt").write_text("mine")
    with (plan_dir / "run.py").open("a") as f:
        f.write("\n# my change to the training loop\n")
    (plan_dir / "report.html").write_text("<html>redrawn</html>")
    assert pipec.load(plan_dir).data.num_stages == 2


def test_verify_must_be_a_bool(saved: Path) -> None:
    with pytest.raises(pipec.PipecError, match="verify must be True or False"):
        pipec.load(saved, verify="no")  # type: ignore[arg-type]


# -- the command line: refused before any process starts ----------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        ("action", ["plan.json", "1B2", "stage 1 micro-batch 2"]),
        ("stage_file", ["changed since pipec wrote it: stage_0.py"]),
        ("weights", ["changed since pipec wrote it: stage_1.safetensors"]),
    ],
)
@pytest.mark.parametrize("command", ["run", "show"])
def test_cli_refuses_a_changed_plan(
    plan_dir: Path, no_launch: None, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    command: str, damage: str, fragments: list[str],
) -> None:
    monkeypatch.delenv(MARKER, raising=False)
    if damage == "action":
        edit_plan_json(plan_dir, delete_action)
    elif damage == "stage_file":
        edit_stage_file(plan_dir)
    else:
        flip_weight_byte(plan_dir)
    before = snapshot(plan_dir)
    line = error_line(capfd, command, str(plan_dir))
    says(line, *fragments, "re-run `pipec partition`")
    assert snapshot(plan_dir) == before  # no report rewritten, no timeline, no checkpoint
    assert MARKER not in os.environ


@pytest.mark.timeout(120)
def test_pipec_run_on_a_changed_plan_exits_non_zero(plan_dir: Path) -> None:
    edit_plan_json(plan_dir, delete_action)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "pipec", "run", str(plan_dir)],
                            capture_output=True, text=True, env=env, timeout=110)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    says(result.stderr, "pipec: error:", "1B2", "re-run `pipec partition`")
    assert "step " not in result.stdout and not list(plan_dir.glob("timeline_rank*.json"))


# -- pipec run --nproc defaults to the plan's ranks --------------------------------------------------


@pytest.mark.timeout(60)
def test_run_nproc_defaults_to_the_plans_ranks(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipec.cli
    import pipec.runtime.launch

    calls: list[int] = []

    def fake_run_plan(directory: Path, *, nproc: int, **kwargs: object) -> int:
        calls.append(nproc)
        return 1  # no report rewrite

    monkeypatch.setattr(pipec.runtime.launch, "run_plan", fake_run_plan)
    assert pipec.cli.main(["run", str(saved), "--steps", "1"]) == 1
    assert calls == [pipec.load(saved).num_ranks] == [2]


@pytest.mark.timeout(120)
def test_run_py_by_hand_checks_the_plan_before_the_factory_runs(plan_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "factory_ran"
    factory = tmp_path / "other.py"
    factory.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                       "def make():\n    raise SystemExit('unreachable')\n")
    edit_plan_json(plan_dir, lambda raw: raw.update(factory=f"{factory}:make"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, str(plan_dir / "run.py"), "--steps", "1"],
                            capture_output=True, text=True, env=env, timeout=110)
    assert result.returncode != 0
    says(result.stderr, "changed since pipec wrote it: plan.json")
    assert not marker.exists()
