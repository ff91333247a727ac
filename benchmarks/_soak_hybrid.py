"""``benchmarks/soak.py --hybrid``: DP2 x PP2 through ``pipec run --max-restarts``, a rank
SIGKILLed every ``--kill-every`` steps; compared with an uninterrupted run.

The plan is saved with a factory (written next to it) whose module, imported
by every rank, registers a global forward pre-hook (torch's public API): it
counts this rank's stage forwards (``--microbatches`` per step) to know the
step -- from the step of the checkpoint the attempt resumed from -- prints the
rank's RSS every ``kill_every / 10`` steps (50 at most) and, at steps ``k * kill_every + offset`` (offset:
half of ``kill_every`` plus half of ``--checkpoint-every``, so work since the
last checkpoint is lost), SIGKILLs rank ``k % 4`` (once: a marker file per
failure, holding the time of the kill).
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

FACTORY = '''
import os, signal
import torch
from torch import nn

DIM, HIDDEN, BLOCKS, BATCH, MICRO = {dim}, {hidden}, {blocks}, {batch}, {micro}
PAGE = os.sysconf("SC_PAGE_SIZE")


class Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


def mse(out, target):
    return ((out - target) ** 2).mean()


_state = {{"calls": 0, "first": None}}


def _first_step():
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) == 0:
        return 0
    latest = os.path.join(os.path.dirname(os.path.abspath(__file__)), "{name}", "checkpoint", "latest")
    try:
        return int(open(latest).read().strip().split("_")[1].split(".")[0])
    except OSError:
        return 0


def _hook(module, args):
    if not type(module).__name__.startswith("Stage"):
        return
    if _state["first"] is None:
        _state["first"] = _first_step()
    calls = _state["calls"]
    _state["calls"] += 1
    if calls % MICRO:
        return
    step, rank = _state["first"] + calls // MICRO, int(os.environ["RANK"])
    if step % int(os.environ.get("SOAK_RSS_EVERY", "50")) == 0:
        rss = int(open("/proc/self/statm").read().split()[1]) * PAGE
        print(f"SOAK_RSS rank={{rank}} attempt={{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}} "
              f"step={{step}} rss={{rss}}", flush=True)
    every, world = int(os.environ.get("SOAK_KILL_EVERY", "0")), int(os.environ["WORLD_SIZE"])
    offset = int(os.environ.get("SOAK_KILL_OFFSET", "0"))
    if not every or step % every != offset:
        return
    victim = (step // every) % world
    marker = os.path.join(os.environ["SOAK_MARKERS"], f"kill{{step}}")
    if rank == victim and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(repr(__import__("time").time()))
        os.kill(os.getpid(), signal.SIGKILL)


def make():
    if os.environ.get("SOAK_MARKERS"):
        nn.modules.module.register_module_forward_pre_hook(_hook)
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(DIM, HIDDEN) for _ in range(BLOCKS)])
    torch.manual_seed(1)
    return {{"model": model, "example_inputs": (torch.randn(BATCH, DIM),), "target": torch.randn(BATCH, DIM),
            "loss_fn": mse}}
'''

_RSS = re.compile(r"SOAK_RSS rank=(\d+) attempt=(\d+) step=(\d+) rss=(\d+)")


class _Timed(io.StringIO):
    """The launcher's output, each line with the time it arrived."""

    def __init__(self, echo: bool) -> None:
        super().__init__()
        self.lines: list[tuple[float, str]] = []
        self.echo = echo

    def write(self, text: str) -> int:
        now = time.time()  # the kill markers hold time.time() too
        for line in text.splitlines():
            self.lines.append((now, line))
            if self.echo and "SOAK_RSS" not in line and ": loss" not in line:
                print(f"    {line}", flush=True)
        return len(text)


def _plan(root: Path, args: argparse.Namespace, name: str) -> Path:
    import pipec
    from pipec.factory import load_factory

    factory = root / "factory.py"
    factory.write_text(FACTORY.format(dim=args.dim, hidden=args.hidden, blocks=args.blocks, batch=args.batch,
                                      micro=args.microbatches // 2, name=name))
    spec = f"{factory}:make"
    made = load_factory(spec)
    plan = pipec.partition(made.model, made.example_inputs, num_stages=2, num_microbatches=args.microbatches // 2,
                           schedule="1f1b", loss_fn=made.loss_fn, target=made.target, cost_model="cpu",
                           data_parallel=2, strategy="by-params")
    return plan.with_factory(spec).save(root / name)


def _run(directory: Path, args: argparse.Namespace, restarts: int, echo: bool) -> tuple[int, float, _Timed]:
    from pipec.runtime.launch import run_plan

    out = _Timed(echo)
    start = time.monotonic()
    code = run_plan(directory, nproc=4, backend="gloo", steps=args.steps, stream=out, max_restarts=restarts,
                    extra_args=("--checkpoint-every", str(args.checkpoint_every), "--lr", "1e-4"))
    return code, time.monotonic() - start, out


def _rss_growth(out: _Timed, warmup: int) -> dict[int, float]:
    """Per rank, the largest RSS growth within one life (one attempt), from its first sample
    ``warmup`` steps after it started to its last."""
    lives: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for _, line in out.lines:
        m = _RSS.search(line)
        if m:
            rank, attempt, step, rss = (int(g) for g in m.groups())
            lives.setdefault((rank, attempt), []).append((step, rss))
    growth: dict[int, float] = {}
    for (rank, _), samples in lives.items():
        first = samples[0][0]
        warm = [s for s in samples if s[0] >= first + warmup]
        if len(warm) >= 2:
            growth[rank] = max(growth.get(rank, -1.0), (warm[-1][1] - warm[0][1]) / warm[0][1])
    return growth


def hybrid_main(args: argparse.Namespace) -> int:
    import os

    import torch

    import pipec
    from pipec.runtime.checkpoint import merge_checkpoint

    if args.microbatches % 2 or args.batch % args.microbatches:
        raise SystemExit("--hybrid: --microbatches must be even and divide --batch")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        straight = _plan(root, args, "straight")
        broken = root / "broken"
        shutil.copytree(straight, broken, ignore=shutil.ignore_patterns("checkpoint"))
        (root / "factory.py").write_text((root / "factory.py").read_text().replace('"straight"', '"broken"'))
        print(f"soak --hybrid: {args.steps} steps of DP2 x PP2 on 4 Gloo ranks ({args.blocks} blocks of "
              f"{args.dim}x{args.hidden}, batch {args.batch}), checkpoint every {args.checkpoint_every}, "
              f"a rank SIGKILLed every {args.kill_every} steps, --max-restarts {args.max_restarts}", flush=True)
        code, t_straight, first = _run(straight, args, 0, echo=False)
        if code != 0:
            print("\n".join(line for _, line in first.lines[-30:]))
            print(f"FAIL: the uninterrupted run exited {code}")
            return 1
        markers = root / "markers"
        markers.mkdir()
        offset = (args.kill_every // 2 + args.checkpoint_every // 2) % args.kill_every  # between two checkpoints
        os.environ.update(SOAK_MARKERS=str(markers), SOAK_KILL_EVERY=str(args.kill_every),
                          SOAK_KILL_OFFSET=str(offset), SOAK_RSS_EVERY=str(max(1, min(50, args.kill_every // 10))))
        try:
            code, t_broken, out = _run(broken, args, args.max_restarts, echo=True)
        finally:
            for name in ("SOAK_MARKERS", "SOAK_KILL_EVERY", "SOAK_KILL_OFFSET", "SOAK_RSS_EVERY"):
                del os.environ[name]
        kills = sorted((float(p.read_text()), p.name) for p in markers.iterdir())
        done = {int(m.group(1)) for _, line in out.lines if (m := re.search(r"step (\d+): loss", line))}
        resumed = [(t, line) for t, line in out.lines if "resumed from the checkpoint" in line]
        ok = code == 0 and done == set(range(args.steps))
        expected = merge_checkpoint(straight / "checkpoint", pipec.load(straight))
        found = merge_checkpoint(broken / "checkpoint", pipec.load(broken)) if code == 0 else {}
        equal = set(found) == set(expected) and all(torch.equal(found[n], v) for n, v in expected.items())
        growth = _rss_growth(out, args.warmup)
        ok = ok and equal and bool(growth) and max(growth.values()) < 0.05
        print(f"uninterrupted: {t_straight:.1f} s ({t_straight / args.steps * 1e3:.1f} ms/step); with "
              f"{len(kills)} failure(s): {t_broken:.1f} s, exit code {code}")
        if kills:
            lost = (t_broken - t_straight) / len(kills)
            restarts = [next((t for t, _ in resumed if t > k), float("nan")) - k for k, _ in kills]
            print(f"time lost per failure: {lost:.1f} s (wall time over the uninterrupted run / failures); "
                  f"kill -> ranks resumed from the checkpoint: median {statistics.median(restarts):.1f} s "
                  f"({', '.join(f'{r:.1f}' for r in restarts)}); steps redone per failure: "
                  f"{offset % args.checkpoint_every}")
        print(f"every step done: {done == set(range(args.steps))}")
        print(f"final parameters equal the uninterrupted run's: {equal}")
        print("RSS growth within a life, per rank: " + ", ".join(f"rank {r} {g:+.2%}" for r, g in sorted(growth.items())))
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
