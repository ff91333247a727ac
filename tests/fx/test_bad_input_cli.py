"""Bad input to the ``pipec`` command line: exit code 2, one line on stderr
starting ``pipec: error:`` (or the lines of a multi-line message, kept) that says what was expected, what was found
and what to do; nothing half-written, no process launched (issue #8).

The commands run in-process through :func:`pipec.cli.main` (fast; ``capfd``
sees every byte written to the real stderr, torch's own included); one test
runs ``python -m pipec`` to check the same holds for the real entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from models import example

import pipec
from pipec.cli import main
from pipec.codegen import PLAN_FILE
from pipec.plan import FORMAT_VERSION

TESTS = Path(__file__).resolve().parent.parent

FACTORY = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import torch
from torch import nn
from models import example

CALLS = []


def make():
    CALLS.append("make")
    model, inputs = example("mlp", 8)
    return {{"model": model, "example_inputs": inputs}}


def not_a_dict():
    return [example("mlp", 8)]


def boom():
    raise RuntimeError("no GPU here")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else self.lin(x) * 2


def branchy():
    return {{"model": Branchy(), "example_inputs": (torch.randn(8, 4).abs(),)}}
"""


def error_line(capfd: pytest.CaptureFixture[str], *argv: str, lines: int = 1) -> str:
    """Run ``pipec ARGV``; check exit code 2 and ``lines`` lines on stderr (0: two or
    more), the first starting ``pipec: error:``; return them."""
    capfd.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code  # type: ignore[assignment]
    err = capfd.readouterr().err
    assert code == 2, f"exit code {code}, stderr {err!r}"
    found = err.splitlines()
    assert len(found) == lines if lines else len(found) >= 2, f"expected {lines or 'several'} line(s) on stderr, found {len(found)}:\n{err}"
    assert found[0].startswith("pipec: error: ")
    assert "Traceback" not in err
    return err.rstrip("\n")


def says(line: str, *fragments: str) -> None:
    missing = [f for f in fragments if f.lower() not in line.lower()]
    assert not missing, f"{missing} not in {line!r}"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "zoo.py"
    path.write_text(FACTORY)
    return path


@pytest.fixture(scope="module")
def saved_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, inputs = example("mlp", 8)
    plan = pipec.partition(model, inputs, num_stages=2, cost_model="h100-sxm")
    return plan.save(tmp_path_factory.mktemp("saved") / "plan")


@pytest.fixture
def plan_copy(saved_plan: Path, tmp_path: Path) -> Path:
    out = tmp_path / "plan"
    out.mkdir()
    for p in saved_plan.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


def partition(*extra: str, factory: str = "zoo.py:make", output: str = "out") -> tuple[str, ...]:
    return ("partition", factory, "--stages", "2", "--cost-model", "h100-sxm", "-o", output, *extra)


# -- pipec partition: the factory -------------------------------------------------------------


def test_factory_file_that_does_not_exist(factory: Path, capfd: pytest.CaptureFixture[str]) -> None:
    line = error_line(capfd, *partition(factory="nowhere.py:make"))
    says(line, "factory: file", "nowhere.py", "does not exist", "give the path to a .py file")
    assert not Path("out").exists()


def test_factory_name_that_does_not_exist(factory: Path, capfd: pytest.CaptureFixture[str]) -> None:
    line = error_line(capfd, *partition(factory="zoo.py:build"))
    says(line, "expected a function 'build'", "found none", "use one of the callables there: ", "make")
    assert not Path("out").exists()


def test_factory_spec_without_a_function(factory: Path, capfd: pytest.CaptureFixture[str]) -> None:
    line = error_line(capfd, *partition(factory="zoo.py"))
    says(line, "expected FILE.py:FACTORY", "such as examples/gpt2.py:make", "found 'zoo.py'")


def test_factory_returning_a_non_dict(factory: Path, capfd: pytest.CaptureFixture[str]) -> None:
    line = error_line(capfd, *partition(factory="zoo.py:not_a_dict"))
    says(line, "not_a_dict", "returned list", "it must return a dict with 'model' and 'example_inputs'")
    assert not Path("out").exists()


def test_factory_that_raises(factory: Path, capfd: pytest.CaptureFixture[str]) -> None:
    line = error_line(capfd, *partition(factory="zoo.py:boom"))
    says(line, "zoo.py:boom", "raised RuntimeError: no GPU here", "fix the factory")
    assert not Path("out").exists()


# -- pipec partition: the output directory ------------------------------------------------------


def test_output_holding_a_plan_needs_force(factory: Path, plan_copy: Path, capfd: pytest.CaptureFixture[str]) -> None:
    before = snapshot(plan_copy)
    line = error_line(capfd, *partition(output=str(plan_copy)))
    says(line, "output directory", str(plan_copy), "already holds a plan", "pass --force")
    assert snapshot(plan_copy) == before


def test_output_that_is_not_a_plan_is_refused_before_any_work(factory: Path, capfd: pytest.CaptureFixture[str]) -> None:
    mine = Path("mine")
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    # boom would raise if called: the directory is checked first
    line = error_line(capfd, *partition("--force", factory="zoo.py:boom", output="mine"))
    says(line, "exists, is not empty and holds no plan.json", "not a pipec plan", "choose a new or empty directory")
    assert snapshot(mine) == {"notes.txt": b"keep me"}


def test_output_that_is_a_file(factory: Path, capfd: pytest.CaptureFixture[str]) -> None:
    Path("taken").write_text("x")
    line = error_line(capfd, *partition(output="taken"))
    says(line, "expected a directory", "found a file", "choose a directory path")
    assert Path("taken").read_text() == "x"


def test_failed_partition_keeps_the_old_plan(factory: Path, plan_copy: Path, capfd: pytest.CaptureFixture[str]) -> None:
    before = snapshot(plan_copy)
    line = error_line(capfd, *partition("--force", "--memory-limit", "1KiB", output=str(plan_copy)))
    says(line, "fits the memory limit", "smallest per-rank limit that fits is", "raise memory_limit")
    assert snapshot(plan_copy) == before
    assert sorted(p.name for p in plan_copy.parent.iterdir()) == ["plan", "zoo.py"]  # no temporary directory left


# -- pipec partition: the arguments -------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (("--stages", "0"), ["num_stages: expected >= 1", "found 0", "pass a whole number"]),
        (("--stages", "two"), ["argument --stages", "invalid int value: 'two'", "see `pipec partition --help`"]),
        (("--microbatches", "3"), ["3 does not divide the batch", "dim 0 = 8", "use one of [1, 2, 4, 8]"]),
        (("--microbatches", "64"), ["num_microbatches: expected 1..8", "found 64", "pass a whole number in 1..8"]),
        (("--stages", "4", "--stages-per-rank", "3"), ["stages_per_rank: expected a divisor of num_stages=4", "found 3", "use one of [1, 2, 4]"]),
        (("--stages-per-rank", "2", "--stages", "4"), ["'1f1b' runs one stage per rank", "found stages_per_rank=2", "use 'interleaved-1f1b'"]),
        (("--schedule", "interleaved-1f1b"), ["needs stages_per_rank >= 2", "found 1", "use '1f1b'"]),
        (("--schedule", "pipedream"), ["schedule: expected one of gpipe, 1f1b", "found 'pipedream'"]),
        (("--strategy", "fastest"), ["strategy: expected one of optimal", "found 'fastest'"]),
        (("--cost-model", "tpu-v9"), ["unknown cost model 'tpu-v9'", "h100-sxm", "pass a path to a JSON file"]),
        (("--memory-limit", "80 gigs"), ["memory_limit: cannot read '80 gigs'", "expected a number with a unit", "write e.g. '80GiB'"]),
        (("--memory-limit=-8GiB",), ["cannot read '-8GiB'", "cannot be negative", "write e.g."]),
        (("--device-speeds", "1,fast"), ["argument --device-speeds", "such as 1,1,0.5,0.5", "found '1,fast'"]),
        (("--device-speeds", "1"), ["device_speeds: expected 2 values", "found 1", "pass one relative speed per rank"]),
        (("--device-speeds", "1,0"), ["device_speeds[1]: expected a finite number > 0", "found 0.0", "pass each rank's speed"]),
    ],
)
def test_bad_partition_arguments(factory: Path, capfd: pytest.CaptureFixture[str], argv: tuple[str, ...], fragments: list[str]) -> None:
    line = error_line(capfd, *partition(*argv))
    says(line, *fragments)
    assert not Path("out").exists()


def test_broken_cost_model_file(factory: Path, capfd: pytest.CaptureFixture[str]) -> None:
    Path("box.json").write_text('{"name": "box", "peak_flops": {"fp32": 1e12},')
    line = error_line(capfd, *partition("--cost-model", "box.json"))
    says(line, "box.json", "is not valid JSON", "fix the syntax there")
    Path("box.json").write_text(json.dumps({"name": "box", "peak_flops": {"fp99": 1.0}}))
    # a multi-line message keeps its lines: one per bad field, then the advice
    text = error_line(capfd, *partition("--cost-model", "box.json"), lines=0)
    first, *fields, advice = text.splitlines()
    assert first == "pipec: error: invalid hardware description 'box.json':"
    assert all(f.startswith("  field '") for f in fields)
    says(fields[0], "field 'peak_flops'", "unknown dtype 'fp99'")
    says(fields[1], "field 'memory_bandwidth'", "required")
    says(advice, "fix these fields")
    assert not Path("out").exists()


def test_untraceable_model_keeps_its_lines_without_torchs_graph_dump(factory: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # the message is the trace error's own lines: each method's reason (torch's, as torch
    # wrote it), then the fix last, where a terminal leaves the eye
    text = error_line(capfd, *partition(factory="zoo.py:branchy"), lines=0)
    lines = text.splitlines()
    says(lines[0], "pipec: error: could not trace Branchy", "tried fx, export:")
    assert lines[1].startswith("  - fx: ")
    assert [line for line in lines if line.startswith("  - ")][1].startswith("  - export: ")
    says(lines[-1], "to fix", "torch.cond")
    assert "graph():" not in text and "def forward" not in text  # no fx graph printed
    assert not Path("out").exists()


# -- pipec show -----------------------------------------------------------------------------------


def _damage(plan: Path, how: str) -> None:
    text = (plan / PLAN_FILE).read_text()
    if how == "corrupt":
        (plan / PLAN_FILE).write_text("this is not json {")
    elif how == "truncated":
        (plan / PLAN_FILE).write_text(text[: len(text) // 3])
    elif how == "version":
        raw = json.loads(text)
        raw["format_version"] = FORMAT_VERSION + 1
        (plan / PLAN_FILE).write_text(json.dumps(raw))
    elif how == "weights":
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(plan / "stage_1.safetensors"))
        key = sorted(tensors)[0]
        tensors[key] = torch.zeros(3, 3)
        save_file(tensors, str(plan / "stage_1.safetensors"))


@pytest.mark.parametrize(
    ("how", "fragments"),
    [
        ("corrupt", ["plan.json is not valid JSON", "corrupt or truncated", "re-run `pipec partition`"]),
        ("truncated", ["plan.json is not valid JSON", "truncated", "re-run `pipec partition`"]),
        ("version", [f"has format_version {FORMAT_VERSION + 1}", f"reads format_version {FORMAT_VERSION}", "re-run `pipec partition`"]),
        ("weights", ["stage_1.safetensors does not match stage_1.py", "wrong shape", "re-run `pipec partition`"]),
    ],
)
def test_show_a_damaged_plan(plan_copy: Path, capfd: pytest.CaptureFixture[str], how: str, fragments: list[str]) -> None:
    _damage(plan_copy, how)
    before = snapshot(plan_copy)
    line = error_line(capfd, "show", str(plan_copy))
    says(line, str(plan_copy), *fragments)
    assert snapshot(plan_copy) == before  # report.html is not rewritten from a broken plan


def test_show_a_missing_directory(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    line = error_line(capfd, "show", str(tmp_path / "nowhere"))
    says(line, "no plan directory at", "nowhere", "expected the directory given to plan.save", "re-run")
    assert not (tmp_path / "nowhere").exists()


# -- pipec run: fails before any process starts -----------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipec.runtime.launch

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pipec run launched processes for a bad request")

    monkeypatch.setattr(pipec.runtime.launch.subprocess, "Popen", refuse)


@pytest.mark.timeout(60)
def test_run_with_the_wrong_nproc(plan_copy: Path, no_launch: None, capfd: pytest.CaptureFixture[str]) -> None:
    line = error_line(capfd, "run", str(plan_copy), "--nproc", "3")
    says(line, "runs on 2 ranks", "--nproc is 3", "pass --nproc 2", "re-plan")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (("--nproc", "0"), ["argument --nproc", "expected a whole number >= 1", "found '0'"]),
        (("--nproc", "2", "--steps", "0"), ["argument --steps", "expected a whole number >= 1", "found '0'"]),
        (("--nproc", "2", "--checkpoint-every", "-1"), ["argument --checkpoint-every", "expected a whole number >= 0", "found '-1'"]),
        (("--nproc", "2", "--backend", "mpi"), ["argument --backend", "invalid choice: 'mpi'", "choose from"]),
    ],
)
def test_run_with_bad_arguments(plan_copy: Path, no_launch: None, capfd: pytest.CaptureFixture[str], argv: tuple[str, ...], fragments: list[str]) -> None:
    line = error_line(capfd, "run", str(plan_copy), *argv)
    says(line, *fragments)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_run_a_missing_or_corrupt_plan(plan_copy: Path, no_launch: None, capfd: pytest.CaptureFixture[str], how: str) -> None:
    target = plan_copy.parent / "nowhere" if how == "missing" else plan_copy
    if how == "corrupt":
        _damage(plan_copy, "truncated")
    line = error_line(capfd, "run", str(target), "--nproc", "2")
    says(line, str(target), "no plan directory" if how == "missing" else "not valid JSON", "re-run `pipec partition`")


# -- the real entry point -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_python_dash_m_pipec_prints_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "pipec", "show", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, env=env, timeout=110)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    says(result.stderr, "pipec: error: no plan directory at", "nowhere", "re-run")
    assert result.stdout == ""


@pytest.mark.timeout(120)
def test_a_reader_that_goes_away_ends_the_command_quietly(saved_plan: Path) -> None:
    # `pipec show DIR | head -1`: the pipe's reader is gone before pipec writes
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-m", "pipec", "show", str(saved_plan)], stdout=write,
                                stderr=subprocess.PIPE, text=True, timeout=110,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        os.close(write)
    assert result.returncode == 128 + 13, result.stderr  # as if killed by SIGPIPE
    assert result.stderr == ""  # not "pipec: error: BrokenPipeError ... check the path"
