"""Simulated bubble fraction of every schedule next to its closed form, and simulator speed.

Run: ``python benchmarks/schedule_sim.py`` (about half a minute on one core).

Costs are uniform over stages with F = I = W = 1 (so B = 2), the assumption of
the ZB-H1 closed form (Qi et al. 2023, section 3.1). Interleaved 1F1B runs
``v = 2`` stages per rank over the same model, so each of its stages costs half.
Closed forms (bubble = 1 - busy / (ranks x step time)):

- GPipe, 1F1B:          (p - 1) / (m + p - 1)
- interleaved 1F1B:     (p - 1) / (m v + p - 1)
- ZB-H1:                (p - 1) / (3 m + p - 1)
"""

from __future__ import annotations

import sys
import time

from pipec.schedule.generators import make_schedule
from pipec.schedule.lowering import lower
from pipec.schedule.simulator import simulate
from pipec.schedule.validator import validate

V = 2


def closed_form(name: str, p: int, m: int) -> float:
    if name == "interleaved-1f1b":
        return (p - 1) / (m * V + p - 1)
    if name == "zb-h1":
        return (p - 1) / (3 * m + p - 1)
    return (p - 1) / (m + p - 1)


def bubble(name: str, p: int, m: int) -> float:
    v = V if name == "interleaved-1f1b" else 1
    cost = 1.0 / v
    sim = simulate(
        make_schedule(name, p * v, m, v), forward=cost, input_grad=cost, weight_grad=cost
    )
    return sim.bubble_fraction


def main() -> int:
    out = sys.stdout
    names = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")
    out.write("bubble fraction: simulated / closed form (F = I = W, uniform stages)\n")
    out.write(f"{'p':>3} {'m':>4}  " + "  ".join(f"{n:>21}" for n in names) + "\n")
    for p in (2, 4, 8):
        for m in (p, 2 * p, 4 * p, 8 * p):
            cells = [f"{bubble(n, p, m):.4f} / {closed_form(n, p, m):.4f}" for n in names]
            out.write(f"{p:>3} {m:>4}  " + "  ".join(f"{c:>21}" for c in cells) + "\n")

    p, m = 64, 512
    out.write(f"\nsimulator wall time, p={p}, m={m} (compute-only; lowered 1f1b last)\n")
    for name in names:
        v = V if name == "interleaved-1f1b" else 1
        schedule = make_schedule(name, p * v, m, v)
        start = time.perf_counter()
        sim = simulate(schedule, forward=1.0, input_grad=1.0, weight_grad=1.0)
        elapsed = time.perf_counter() - start
        actions = sum(len(row) for row in schedule.actions)
        out.write(f"  {name:>18}: {elapsed:6.2f} s for {actions} actions (bubble {sim.bubble_fraction:.4f})\n")
    schedule = make_schedule("1f1b", p, m)
    start = time.perf_counter()
    lowered = lower(schedule)
    lower_time = time.perf_counter() - start
    start = time.perf_counter()
    validate(lowered)
    validate_time = time.perf_counter() - start
    start = time.perf_counter()
    simulate(lowered, forward=1.0, input_grad=1.0, weight_grad=1.0, comm=0.1)
    sim_time = time.perf_counter() - start
    out.write(
        f"  1f1b lowered ({sum(len(r) for r in lowered.actions)} actions): lower {lower_time:.2f} s, "
        f"validate {validate_time:.2f} s, simulate {sim_time:.2f} s\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
