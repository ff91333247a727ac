"""The generators still produce exactly the schedules kept in schedules/*.txt.

After an intended change, run ``python schedules/regenerate.py`` and review the diff.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from pipec.schedule.ir import Schedule
from pipec.schedule.validator import validate

FOLDER = Path(__file__).resolve().parents[2] / "schedules"


def _regenerate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("schedules_regenerate", FOLDER / "regenerate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REGENERATE = _regenerate()


@pytest.mark.parametrize("spec", REGENERATE.GOLDEN, ids=lambda s: REGENERATE.file_name(*s))
def test_generator_matches_golden_file(spec: tuple[str, int, int, int, bool]) -> None:
    path = FOLDER / REGENERATE.file_name(*spec)
    assert path.exists(), f"{path.name} is missing; run python schedules/regenerate.py"
    text = path.read_text(encoding="utf-8")
    assert REGENERATE.render(*spec) == text, f"{path.name} differs; review, then regenerate"
    name, num_ranks, stages_per_rank, num_microbatches, lowered = spec
    placement = next((tuple(int(r) for r in line.split(":", 1)[1].split())
                      for line in text.splitlines() if line.startswith("# placement:")), None)
    schedule = Schedule.from_text(text, name=name, stages_per_rank=stages_per_rank, placement=placement)
    assert schedule.num_ranks == num_ranks
    assert schedule.num_microbatches == num_microbatches
    assert schedule.is_lowered == lowered
    validate(schedule)


def test_no_stray_golden_files() -> None:
    expected = {REGENERATE.file_name(*spec) for spec in REGENERATE.GOLDEN}
    assert {p.name for p in FOLDER.glob("*.txt")} == expected
