"""torch.distributed.pipelining's pipeline-order CSV to and from a pipec Schedule.

torch's own schedules (its ZBV generator and its lowering passes, called
without a process group) are read in both CSV forms; pipec's schedules are
written and read back; torch's extra action kinds are dropped or expanded;
anything else is refused with the cell named.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from torch.distributed.pipelining import schedules as ts

import pipec
from pipec.schedule.ir import Schedule, v_placement
from pipec.schedule.torch_csv import from_torch_csv, parse_torch_csv, to_torch_csv, torch_rows


def _torch_zbv(num_ranks: int, num_microbatches: int) -> dict[int, list[object]]:
    """torch's ZBV compute order (its generator, without building stages)."""
    zbv = ts.ScheduleZBVZeroBubble.__new__(ts.ScheduleZBVZeroBubble)
    zbv.pp_group_size, zbv._n_microbatches, zbv.num_stages = num_ranks, num_microbatches, 2 * num_ranks
    return {r: zbv._calculate_single_rank_operations(r) for r in range(num_ranks)}


def _torch_lowered(order: dict[int, list[object]], placement: tuple[int, ...], num_microbatches: int) -> dict[int, list[object]]:
    """What torch's ``_prepare_schedule_with_comms`` makes of a compute-only order."""
    rows = {r: ts._add_reduce_grad(ts._add_unshard_reshard(list(a)), num_microbatches) for r, a in order.items()}
    return ts._add_send_recv(rows, stage_to_rank=lambda s: placement[s], num_stages=len(placement))


def _dump(order: dict[int, list[object]]) -> str:
    """torch's ``_dump_csv``: one row per rank, None as an empty cell."""
    out = io.StringIO()
    writer = csv.writer(out)
    for rank in order:
        writer.writerow(order[rank])
    return out.getvalue()


def test_torch_zbv_compute_only_reads_as_a_v_schedule() -> None:
    text = _dump(_torch_zbv(2, 4))
    assert text.splitlines()[1].startswith(",1F0,")  # torch pads the grid with empty cells
    sched = parse_torch_csv(text, name="zbv")
    assert sched.placement == (0, 1, 1, 0)
    assert (sched.num_stages, sched.num_microbatches, sched.stages_per_rank, sched.num_ranks) == (4, 4, 2, 2)
    assert not sched.is_lowered
    assert str(sched).splitlines()[0].startswith("0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1")
    sim = pipec.simulate(sched, forward=1.0, input_grad=1.0, weight_grad=1.0)
    assert sim.step_time > 0
    # drawn as any pipec schedule: the grid pipec show prints, the SVG of the report
    from pipec.schedule.grid import schedule_grid
    from pipec.viz.svg import schedule_svg

    assert "rank 1:" in schedule_grid(sched) and "3I0" in schedule_grid(sched)
    assert "<svg" in schedule_svg(pipec.lower(sched))


@pytest.mark.parametrize("num_ranks,num_microbatches", [(2, 4), (4, 8)])
def test_torch_lowered_csv_reads_as_the_lowered_schedule(num_ranks: int, num_microbatches: int) -> None:
    order = _torch_zbv(num_ranks, num_microbatches)
    placement = v_placement(2 * num_ranks, num_ranks)
    text = _dump(_torch_lowered(order, placement, num_microbatches))
    assert "UNSHARD" in text and "REDUCE_GRAD" in text
    lowered = parse_torch_csv(text)  # validated: matched, in pair order, no deadlock
    assert lowered.is_lowered and lowered.placement == placement
    assert "UNSHARD" not in lowered.to_text() and "REDUCE_GRAD" not in lowered.to_text()
    compute = parse_torch_csv(_dump(order))
    assert lowered.compute_only().actions == compute.actions
    # torch's lowering and pipec's put the same messages on the same ranks
    ours = pipec.lower(compute)
    for mine, theirs in zip(ours.actions, lowered.actions):
        assert sorted(map(str, mine)) == sorted(map(str, theirs))


@pytest.mark.parametrize("name,spr", [("1f1b", 1), ("zb-h1", 1), ("interleaved-1f1b", 2)])
def test_pipec_schedules_round_trip_in_both_forms(name: str, spr: int) -> None:
    compute = pipec.make_schedule(name, 4 * spr, 8, stages_per_rank=spr)
    lowered = pipec.lower(compute)
    for sched in (compute, lowered):
        back = parse_torch_csv(to_torch_csv(sched), name=name)
        assert back.actions == sched.actions and back.placement == sched.placement
        assert (back.num_stages, back.num_microbatches, back.stages_per_rank) == (
            sched.num_stages, sched.num_microbatches, sched.stages_per_rank)


def test_the_lowered_form_gets_reduce_grad_after_each_stage_last_backward() -> None:
    lowered = pipec.lower(pipec.make_schedule("zb-h1", 2, 2))
    rows = torch_rows(lowered)
    # rank 1 ends 1W0 1W1 -> 1REDUCE_GRAD; rank 0's last backward is 0W1
    assert rows[1][-2:] == ["1W1", "1REDUCE_GRAD"]
    assert rows[0][-2:] == ["0W1", "0REDUCE_GRAD"]
    assert all(c.count("REDUCE_GRAD") == 1 for c in (",".join(r) for r in rows))
    assert "REDUCE_GRAD" not in to_torch_csv(lowered.compute_only())  # torch adds it itself there
    assert "REDUCE_GRAD" not in to_torch_csv(lowered, reduce_grad=False)


def test_torch_actions_run_as_its_runtime_reads_them() -> None:
    # torch's _Action.from_str reads what pipec writes, and torch's own validator accepts it
    sched = pipec.lower(pipec.make_schedule("1f1b", 2, 4))
    rows = torch_rows(sched)
    parsed = {r: [ts._Action.from_str(c) for c in row] for r, row in enumerate(rows)}
    assert [str(a) for a in parsed[0]] == rows[0]
    assert ts._validate_schedule(parsed, 2, 2, 4) == {0: 0, 1: 1}


def test_overlap_f_b_becomes_adjacent_actions() -> None:
    text = "0F0,0F1,(0F2;0B0)OVERLAP_F_B,0B1,0B2\n1F0,1B0,1F1,1B1,1F2,1B2\n"
    sched = parse_torch_csv(text)
    assert [str(a) for a in sched.actions[0]] == ["0F0", "0F1", "0F2", "0B0", "0B1", "0B2"]


@pytest.mark.parametrize("cell,match", [
    ("0X0", r"rank 0 \(row 1\), cell 2: cannot read '0X0' as an action"),
    ("0SEND_Q1", "cannot read '0SEND_Q1'"),
    ("0F", "has no micro-batch"),
])
def test_an_unknown_cell_is_a_clear_error(cell: str, match: str) -> None:
    with pytest.raises(pipec.ScheduleError, match=match):
        parse_torch_csv(f"0F0,{cell},0B0\n1F0,1B0\n")


def test_a_stage_on_two_ranks_and_an_invalid_order_are_refused() -> None:
    with pytest.raises(pipec.ScheduleError, match=r"stage 1 has actions on rank 0 and on rank 1 \(1B0\)"):
        parse_torch_csv("0F0,1F0,0B0\n1B0\n")
    with pytest.raises(pipec.ScheduleError, match="is invalid"):
        parse_torch_csv("0B0,0F0\n1F0,1B0\n")  # a backward before its forward: the validator's grid
    with pytest.raises(pipec.ScheduleError, match="stages \\[1\\] have no action"):
        parse_torch_csv("0F0,0B0\n2F0,2B0\n")
    with pytest.raises(pipec.ScheduleError, match="is empty"):
        parse_torch_csv("\n")


def test_from_torch_csv_reads_a_file_and_partition_takes_it(tmp_path: Path) -> None:
    import torch
    from torch.nn import functional as F

    file = tmp_path / "zbv.csv"
    file.write_text(_dump(_torch_zbv(2, 4)), encoding="utf-8")
    sched = from_torch_csv(file)
    assert sched.name == "zbv" and isinstance(sched, Schedule)
    assert pipec.from_torch_csv is from_torch_csv and pipec.schedule.from_torch_csv is from_torch_csv
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    x = torch.randn(8, 8)
    plan = pipec.partition(model, (x,), num_stages=4, schedule=sched, stages_per_rank=2,
                           loss_fn=F.mse_loss, target=torch.randn(8, 8), cost_model="h100-sxm")
    assert plan.schedule.placement == (0, 1, 1, 0) and plan.num_microbatches == 4
    assert [s.rank for s in plan.stages] == [0, 1, 1, 0]
    assert plan.simulate().step_time > 0
    with pytest.raises(pipec.ScheduleError, match="cannot read torch's pipeline-order CSV"):
        from_torch_csv(tmp_path / "missing.csv")
