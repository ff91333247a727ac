"""V-shaped schedules: two stages per rank, stage ``s`` on rank ``s`` for ``s < p``, else ``2p - 1 - s``.

Phase: schedule (generator). Input: sizes. Output: compute-only Schedule with
the V placement (:func:`pipec.schedule.ir.v_placement`).

- ``zb-v``: Qi et al. 2024, "Pipeline Parallelism with Controllable Memory"
  (NeurIPS 2024), section 3 and Figure 3, the ZB-V schedule first given in
  "Zero Bubble Pipeline Parallelism" (ICLR 2024), section 6.
- ``dualpipe-v``: DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", section
  3.2.1 (DualPipe), in the "cut in half" V form of the DualPipe repository
  (DualPipeV).

The phase structure follows torch.distributed.pipelining's
``ScheduleZBVZeroBubble`` and ``ScheduleDualPipeV`` so the two libraries run
the same orders.
"""

from __future__ import annotations

from collections import deque

from pipec.schedule.gen_common import check_at_least, check_sizes, make
from pipec.schedule.ir import Action, B, F, I, Schedule, W


def zb_v(num_stages: int, num_microbatches: int, stages_per_rank: int = 2) -> Schedule:
    """ZB-V (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory", section 3;
    "Zero Bubble Pipeline Parallelism", section 6).

    Rank ``k`` holds stage ``k`` (chunk 0, on the way down) and stage ``2p - 1 - k``
    (chunk 1, on the way back up). Its warm-up is ``2(p - k) - 1`` chunk-0 forwards,
    then ``k`` pairs of chunk-1 / chunk-0 forwards, then ``p - k`` rounds of a
    chunk-1 F, I, W; the steady state repeats ``F I W`` on chunk 0 then chunk 1; the
    cool-down runs the input gradients first and the weight gradients last, where
    they fill the drain. p=2 (4 stages), m=4, F = I = W (one column per unit)::

        step    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20  21  22  23  24
        rank 0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 0I1 0W1 3F3 3I3 3W3 0I2 0W2 0I3 0W3 .
        rank 1: .   1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 2I2 2W2 1I2 2I3 1I3 1W2 2W3 1W3

    Bubble (F = I = W = ``c`` per stage): for ``m >= 2p`` every rank idles
    ``(p - 1)c`` -- the first micro-batch's forward through the ranks before it;
    the paper's ``(p - 1)(T_F + T_B - 2T_W)`` with per-rank (two-stage) times is 0
    and leaves exactly this fill out. With ``m = p`` the warm-up is cut short and
    each rank idles ``2(p - 1)c``. Peak activations (``m >= 2p``): ``2p`` stage
    micro-batches on every rank -- ``p`` micro-batches of the rank's whole share
    of the model, the paper's ``p M_B``, as 1F1B's rank 0. Any ``m >= 1`` runs.
    """
    num_ranks = check_sizes("zb-v", num_stages, num_microbatches, stages_per_rank)
    p, m = num_ranks, num_microbatches
    n = max(2 * p - 1, m)  # torch's trick: build for enough micro-batches, then drop the extra ones
    rows: list[list[Action]] = []
    for k in range(p):
        down, up = k, 2 * p - 1 - k
        row: list[Action] = []
        f0 = f1 = b0 = b1 = 0
        for _ in range(2 * (p - k) - 1):
            row.append(F(down, f0))
            f0 += 1
        for _ in range(k):
            row += [F(up, f1), F(down, f0)]
            f1 += 1
            f0 += 1
        for _ in range(p - k):
            row += [F(up, f1), I(up, b1), W(up, b1)]
            f1 += 1
            b1 += 1
        while f1 < f0 or f0 < n:
            if f0 < n:
                row.append(F(down, f0))
                f0 += 1
            row += [I(down, b0), W(down, b0), F(up, f1), I(up, b1), W(up, b1)]
            b0 += 1
            f1 += 1
            b1 += 1
        w0, w1 = b0, b1
        for _ in range(k):
            row += [I(down, b0), I(up, b1)]
            b0 += 1
            b1 += 1
        for _ in range(p - k):
            row += [I(down, b0), W(down, w0)]
            b0 += 1
            w0 += 1
        row += [W(up, i) for i in range(w1, b1)]
        row += [W(down, i) for i in range(w0, b0)]
        rows.append([a for a in row if a.microbatch < m])
    return make("zb-v", num_stages, m, stages_per_rank, rows, v_shaped=True)


def dualpipe_v(num_stages: int, num_microbatches: int, stages_per_rank: int = 2) -> Schedule:
    """DualPipeV (DeepSeek-V3 technical report, section 3.2.1; the V form of DualPipe
    from the DualPipe repository, as torch's ``ScheduleDualPipeV``).

    Rank ``k`` holds stages ``k`` and ``2p - 1 - k`` (the V). Its phases: ``2(p - k - 1)``
    chunk-0 forwards; ``k + 1`` chunk-0/chunk-1 forward pairs; ``p - k - 1`` rounds of
    chunk-1 I, a pending W, chunk-1 F; the main phase of ``m - 2p + k + 1`` rounds
    pairing the **forward of one micro-batch with the full backward of another**
    (chunk-0 F with chunk-1 B, then chunk-1 F with chunk-0 B); then the backwards,
    the second half split into I and W so the W fill the drain.

    DualPipe overlaps each F&B pair (one micro-batch's forward computing while
    the other's backward communicates). pipec's executor runs one action at a
    time on each rank, so each pair is emitted as **two adjacent actions** ``F``
    then ``B`` -- the same order, without the overlap; the simulator times them
    one after the other. p=2 (4 stages), m=4 (one column per unit of time; rank
    0's pairs ``0F3 3B1`` and ``3F2 0B0`` are adjacent columns)::

        step    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18
        rank 0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1 0F3 3B1 3F2 0B0 3B2 3F3 0B1 3B3 0I2 0W2 0I3 0W3
        rank 1: .   1F0 2F0 1F1 2F1 1F2 2B0 2F2 1B0 1F3 2B1 2F3 1B1 2B2 1B2 2I3 1I3 2W3 1W3

    Bubble with F = I = W = ``c`` per stage and no overlap: every rank idles
    ``(p - 1)c`` (``m >= 2p``), as ZB-V. The report's ``(PP/2 - 1)(F&B + B - 3W)``
    (``F&B`` the overlapped pair) counts on the overlap, which a one-action-at-a-time
    executor does not have, so it does not apply here --
    see tests/unit/test_schedule_v.py. Peak activations: ``2p + 1`` stage
    micro-batches on every rank (the report's ``PP + 1``). Needs ``m >= 2p``
    (torch's constraint too).
    """
    num_ranks = check_sizes("dualpipe-v", num_stages, num_microbatches, stages_per_rank)
    p, m = num_ranks, num_microbatches
    check_at_least("dualpipe-v", "num_microbatches", m, num_stages,
                   "DualPipeV runs 2p micro-batches before its steady state; raise num_microbatches "
                   "or use 'zb-v'")
    rows = [_dualpipe_v_rank(k, p, m) for k in range(p)]
    return make("dualpipe-v", num_stages, m, stages_per_rank, rows, v_shaped=True)


def _dualpipe_v_rank(k: int, p: int, m: int) -> list[Action]:
    down, up = k, 2 * p - 1 - k
    row: list[Action] = []
    nxt = {(down, "F"): 0, (up, "F"): 0, (down, "B"): 0, (up, "B"): 0}
    pending_w: deque[tuple[int, int]] = deque()

    def forward(stage: int) -> None:
        row.append(F(stage, nxt[(stage, "F")]))
        nxt[(stage, "F")] += 1

    def backward(stage: int, split: bool) -> None:
        mb = nxt[(stage, "B")]
        nxt[(stage, "B")] += 1
        if split:
            row.append(I(stage, mb))
            pending_w.append((stage, mb))
        else:
            row.append(B(stage, mb))

    def weight() -> None:
        if pending_w:
            row.append(W(*pending_w.popleft()))

    for _ in range(2 * (p - k - 1)):
        forward(down)
    for _ in range(k + 1):
        forward(down)
        forward(up)
    for _ in range(p - k - 1):
        backward(up, True)
        weight()
        forward(up)
    for _ in range(m - 2 * p + k + 1):
        # the F&B pairs: adjacent here, overlapped in DualPipe (see the docstring)
        forward(down)
        backward(up, False)
        forward(up)
        backward(down, False)
    for _ in range(p - k - 1):
        backward(up, False)
        forward(up)
        backward(down, False)
    split = False
    for i in range(k + 1):
        if i == (k + 1) // 2 and k % 2 == 1:
            split = True
        backward(up, split)
        if i == (k + 1) // 2 and k % 2 == 0:
            split = True
        backward(down, split)
    for _ in range(p - k - 1):
        weight()
        backward(down, split)
    while pending_w:
        weight()
    return row


__all__ = ["dualpipe_v", "zb_v"]
