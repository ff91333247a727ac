"""Simulated proof for issue #17's schedules: V-shaped and zero-bubble bubbles, and synth.

Run: ``python benchmarks/schedule_synth.py`` (a minute or two on one core).

Part 1, equal costs (F = I = W = 1 per stage): each schedule's idle time per rank
against its docstring's closed form, for p in {4, 8, 16} and m in {p, 2p, 4p}
(``v`` stages per rank; busy time per rank is ``3 m v``):

- zb-v:            (p - 1) for m >= 2p, 2 (p - 1) for m = p   (peak 2p stage micro-batches)
- dualpipe-v:      (p - 1), m >= 2p only                      (peak 2p + 1)
- zb-h2:           (p - 1)                                    (peak 2p - k on rank k, m >= 2p)
- interleaved-zb:  (p - 1)                                    (peak v p)
- zb-h1:           (p - 1)(F + I - W) = p - 1;  1f1b: 3 (p - 1)

Part 2, measured-looking costs: the last stage 1.5x heavier, W = 0.6 x I, I = 1.2 F,
0.05 per message. For each fixed schedule X, synth is built with X's micro-batches in
flight as its caps, per stage and per rank at once (the same memory), and both are simulated; ``synth from`` says
whether the greedy order won or synth fell back to a fixed schedule's order.
"""

from __future__ import annotations

import sys
import time

from _table import aligned

from pipec.errors import ScheduleError
from pipec.schedule.generators import make_schedule
from pipec.schedule.in_flight import in_flight_from_schedule
from pipec.schedule.simulator import simulate
from pipec.schedule.synth import synthesize

FORMULAS = {
    "zb-v": (2, lambda p, m: p - 1 if m >= 2 * p else 2 * (p - 1)),
    "dualpipe-v": (2, lambda p, m: p - 1),
    "zb-h2": (1, lambda p, m: p - 1),
    "interleaved-zb": (2, lambda p, m: p - 1),
    "zb-h1": (1, lambda p, m: p - 1),
    "1f1b": (1, lambda p, m: 3 * (p - 1)),
}
FIXED = {1: ("gpipe", "1f1b", "zb-h1", "zb-h2"), 2: ("zb-v", "dualpipe-v")}


def part1() -> bool:
    rows = [["schedule", "p", "m", "idle/rank", "formula", "bubble", "peak/rank", "ok"]]
    ok = True
    for name, (v, formula) in FORMULAS.items():
        for p in (4, 8, 16):
            for m in (p, 2 * p, 4 * p):
                try:
                    sched = make_schedule(name, p * v, m, v)
                except ScheduleError:
                    rows.append([name, str(p), str(m), "-", "-", "-", "-", "needs m >= 2p"])
                    continue
                sim = simulate(sched, forward=1.0, input_grad=1.0, weight_grad=1.0)
                idle = sim.step_time - 3 * m * v
                good = abs(idle - formula(p, m)) < 1e-9
                ok &= good
                rows.append([name, str(p), str(m), f"{idle:g}", f"{formula(p, m):g}",
                             f"{sim.bubble_fraction:.3f}", f"{max(sim.peak_inflight)}", "yes" if good else "NO"])
    sys.stdout.write("Part 1: equal costs, idle time per rank (units of one stage's F)\n")
    sys.stdout.write(aligned(rows) + "\n\n")
    return ok


def costs(n: int) -> dict[str, list[float]]:
    forward = [1.0] * n
    forward[-1] = 1.5
    input_grad = [1.2 * f for f in forward]
    return {"forward": forward, "input_grad": input_grad, "weight_grad": [0.6 * t for t in input_grad]}


def part2() -> tuple[int, int, int]:
    rows = [["p", "v", "m", "memory of", "schedule", "step", "bubble", "peak act./rank", "synth from"]]
    wins = ties = losses = 0
    for v in (1, 2):
        for p in (4, 8, 16):
            m = 2 * p
            c = costs(p * v)
            for name in FIXED[v]:
                try:
                    fixed = make_schedule(name, p * v, m, v)
                except ScheduleError:
                    continue
                base = simulate(fixed, comm=0.05, **c)
                found = synthesize(p * v, m, v, comm=0.05, max_in_flight=in_flight_from_schedule(fixed),
                                   max_rank_in_flight=base.peak_inflight, **c)
                syn = found.simulation
                origin = found.source + (" + search" if found.improved else "")
                for label, sim, src in ((name, base, ""), ("synth", syn, origin)):
                    rows.append([str(p), str(v), str(m), name, label, f"{sim.step_time:.2f}",
                                 f"{sim.bubble_fraction:.3f}", " ".join(str(x) for x in sim.peak_inflight), src])
                if syn.step_time < base.step_time - 1e-9:
                    wins += 1
                elif syn.step_time <= base.step_time + 1e-9:
                    ties += 1
                else:
                    losses += 1
    sys.stdout.write("Part 2: last stage 1.5x, W = 0.6 I, comm 0.05; synth at each fixed schedule's memory\n")
    sys.stdout.write(aligned(rows) + "\n")
    return wins, ties, losses


def main() -> int:
    started = time.perf_counter()
    ok = part1()
    wins, ties, losses = part2()
    sys.stdout.write(f"\nsynth vs the fixed schedule of the same memory: faster {wins}, equal {ties}, "
                     f"slower {losses}; formulas {'all match' if ok else 'MISMATCH'}; "
                     f"{time.perf_counter() - started:.0f}s\n")
    return 0 if ok and losses == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
