"""The model zoo as a table: what pipec does with each architecture, out of the box.

Runs every model of ``tests/zoo/zoo_models.py`` through the checks of
``tests/zoo/zoo_harness.py`` (the same code the tests run: default
``pipec.partition`` on 2 stages and 2 micro-batches, save, load, one
training step on 2 Gloo ranks on this machine, gradients against a
single-process step, ``eval()`` forward against ``model.eval()``) and prints,
per model: the trace method chosen, the plan time (trace + profile +
partition), the stages' balance (slowest / mean stage time, 1.00 is perfect),
and each check with the max abs difference where one is measured. Failing
checks are explained below the table.

    python benchmarks/zoo.py                 # every model
    python benchmarks/zoo.py gpt2 resnet     # some
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
_TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(_TESTS / "zoo"), str(_TESTS)]

import torch  # noqa: E402
from _table import aligned  # noqa: E402
from zoo_harness import CHECKS, CaseResult, Check, run_case  # noqa: E402
from zoo_models import CASES  # noqa: E402


def _cell(check: Check) -> str:
    mark = "ok" if check.ok else "FAIL"
    return mark if check.max_abs_diff is None else f"{mark} ({check.max_abs_diff:.1e})"


def table(results: list[CaseResult]) -> str:
    head = ("model", "trace", "plan s", "balance", "step", "grads (max abs diff)", "eval", "other checks")
    rows = [head]
    for r in results:
        others = [c for c in ("partition", "unchanged", "save_load")
                  if not r.checks[c].ok and not r.checks[c].detail.startswith("not run:")]
        rows.append((
            r.name,
            r.trace_method or "-",
            "-" if r.plan_time is None else f"{r.plan_time:.2f}",
            "-" if r.balance is None else f"{r.balance:.2f}",
            _cell(r.checks["step"]),
            _cell(r.checks["grads"]),
            _cell(r.checks["eval"]),
            "ok" if not others else "FAIL " + ",".join(others),
        ))
    return aligned(rows)


def failures(results: list[CaseResult]) -> str:
    out = []
    for r in results:
        for name in CHECKS:
            c = r.checks[name]
            if not c.ok and not c.detail.startswith("not run:"):
                out.append(f"{r.name} {name}: {c.detail}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help=f"default: all of {', '.join(CASES)}")
    args = parser.parse_args()
    unknown = sorted(set(args.models) - set(CASES))
    if unknown:
        parser.error(f"unknown models {unknown}; the zoo has {', '.join(CASES)}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models or list(CASES):
            results.append(run_case(CASES[name](), Path(tmp)))
            print(f"{name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    print(table(results))
    passed = sum(c.ok for r in results for c in r.checks.values())
    total = sum(len(r.checks) for r in results)
    print(f"\n{passed}/{total} checks pass on {len(results)} models in {time.perf_counter() - started:.1f}s")
    text = failures(results)
    if text:
        print("\nfailures:\n" + text)


if __name__ == "__main__":
    main()
