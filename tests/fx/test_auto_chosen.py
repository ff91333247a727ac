"""The auto-planner's chosen candidate is one fact of the plan (``PlanData.chosen``,
issue #14): ``pipec show`` (the summary) and report.html both read it, so they name
the same candidate -- in memory, after save -> load, and for a plan.json written
before the fact was stored (its winner was listed first)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from models import example

import pipec
from pipec.cli import main
from pipec.errors import PlanError
from pipec.facade import Plan
from pipec.plan import Candidate, PlanData
from pipec.viz.report import render_report

Key = tuple[str, int, int]


def key(c: Candidate) -> Key:
    return (c.schedule, c.num_microbatches, c.stages_per_rank)


def summary_names(text: str) -> Key:
    """The candidate the summary's "chosen: ..." line names."""
    found = re.search(r"^chosen: (\S+) m=(\d+)(?: v=(\d+))?: ", text, re.M)
    assert found, text
    return (found[1], int(found[2]), int(found[3] or 1))


def report_names(page: str) -> Key:
    """The candidate report.html names as chosen, in its text and in its table."""
    found = re.search(r"Chosen: <b>([^<]+)</b>", page)
    assert found, "no chosen candidate in the report"
    parts = html.unescape(found[1]).split(" \u00b7 ")
    named = (parts[0], int(parts[1].removeprefix("m=")), int(parts[2].removeprefix("v=")) if len(parts) > 2 else 1)
    rows = [r for r in page.split("<tr>") if "\u2605 chosen" in r]
    assert len(rows) == 1, "exactly one table row is marked chosen"
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", rows[0])
    assert (cells[0], int(cells[1]), int(cells[2])) == named
    return named


@pytest.fixture(scope="module")
def auto() -> pipec.Plan:
    model, inputs = example("two_input", 8)
    return pipec.partition(model, inputs, num_stages=2, schedule="auto", num_microbatches="auto",
                           cost_model="h100-sxm")


def test_summary_and_report_name_the_stored_choice(auto: pipec.Plan, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = auto.data
    assert data.chosen is not None and len(data.candidates) > 2
    chosen = key(data.candidates[data.chosen])
    assert chosen == (data.schedule.name, data.num_microbatches, data.stages_per_rank)
    assert summary_names(auto.summary()) == report_names(render_report(data)) == chosen
    auto.save(tmp_path / "plan")
    loaded = pipec.load(tmp_path / "plan")
    assert loaded.data.chosen == data.chosen
    assert report_names((tmp_path / "plan" / "report.html").read_text(encoding="utf-8")) == chosen
    assert main(["show", str(tmp_path / "plan")]) == 0
    assert summary_names(capsys.readouterr().out) == chosen
    assert report_names((tmp_path / "plan" / "report.html").read_text(encoding="utf-8")) == chosen


def test_both_follow_the_stored_index_not_a_rule_of_their_own(auto: pipec.Plan) -> None:
    # the summary used to match the plan's configuration and the report fell back
    # to the fastest fitting candidate: each read its own rule. Now both read `chosen`.
    for index in range(len(auto.data.candidates)):
        data = auto.data.model_copy(update={"chosen": index})
        named = key(auto.data.candidates[index])
        assert summary_names(Plan(data).summary()) == named
        assert report_names(render_report(data)) == named


def test_a_plan_json_that_contradicts_its_choice_is_refused(auto: pipec.Plan, tmp_path: Path) -> None:
    auto.save(tmp_path / "plan")
    file = tmp_path / "plan" / "plan.json"
    raw = json.loads(file.read_text(encoding="utf-8"))
    other = next(i for i, c in enumerate(auto.data.candidates) if key(c) != key(auto.data.candidates[raw["chosen"]]))
    for chosen, message in ((other, r"chosen candidate \d+ is .* but the plan is"),
                            (len(auto.data.candidates), r"expected an index in 0\.\.")):
        file.write_text(json.dumps({**raw, "chosen": chosen}), encoding="utf-8")
        with pytest.raises(PlanError, match=message):
            pipec.load(tmp_path / "plan", verify=False)


def test_a_plan_json_saved_before_the_choice_was_stored_reads_its_first_candidate(
        auto: pipec.Plan, tmp_path: Path) -> None:
    raw = json.loads(auto.data.model_dump_json())
    assert raw["chosen"] == 0  # the auto-planner lists its winner first
    del raw["chosen"]
    old = PlanData.model_validate_json(json.dumps(raw))
    assert old.chosen == 0 and old.chosen_candidate == auto.data.candidates[0]
    assert summary_names(Plan(old).summary()) == report_names(render_report(old))
    plain = pipec.partition(*example("two_input", 8), num_stages=2, cost_model="h100-sxm")
    assert plain.data.chosen is None and plain.data.chosen_candidate is None
