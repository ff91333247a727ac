"""The ``pipec`` command line: partition, show, run, export, calibrate.

User errors print ``pipec: error: ...`` on stderr -- one line, or the lines of
a message that has several (a validator's grid, one line per bad field) -- say
what to do and exit with code 2; ``--debug`` shows the traceback instead.
Option names follow the Python API (``--stages`` is ``num_stages``,
``--microbatches`` is ``num_microbatches``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipec.errors import ConfigError, PipecError

if TYPE_CHECKING:
    from pipec.facade import Plan

EXIT_USAGE = 2


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', found {text!r}") from None
    return value


def _whole(low: int) -> Any:
    """An argparse type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, found {text!r}")
        return value

    return parse


def _speeds(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected relative speeds separated by commas such as 1,1,0.5,0.5, found {text!r}"
        ) from None


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors follow the one-line, exit-2 rule, and which
    remembers its flags (:func:`command_flags`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.flags: list[str] = []
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.flags += [s for s in action.option_strings if s not in ("-h", "--help")]
        return action

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"pipec: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The ``pipec`` argument parser."""
    return _build()[0]


def command_flags() -> dict[str, tuple[str, ...]]:
    """Every ``pipec`` command and its flags, in the order ``--help`` shows them;
    the key ``""`` holds the flags before the command (``--debug``). What the
    README's CLI reference must name, and what a shell completion offers."""
    parser, commands = _build()
    flags = {"": tuple(parser.flags)}
    for name, command in commands.items():
        flags[name] = tuple(command.flags) if isinstance(command, _Parser) else ()
    return flags


def _build() -> tuple[_Parser, dict[str, argparse.ArgumentParser]]:
    parser = _Parser(
        prog="pipec",
        description="pipec: partition a PyTorch model into pipeline stages, schedule, and run them.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "partition",
        help="trace, cost and split a model into pipeline stages; write the plan directory",
        description="Partition the model built by FILE.py:FACTORY (a function returning a dict with "
        "'model', 'example_inputs' and optionally 'example_kwargs', 'loss_fn', 'target').",
    )
    p.add_argument("factory", metavar="FILE.py:FACTORY", help="the model factory")
    p.add_argument("--stages", type=int, required=True, help="num_stages: pipeline stages in all")
    p.add_argument("--microbatches", type=_int_or_auto, default=None,
                   help="num_microbatches: a number, or 'auto' to search the divisors of the batch")
    p.add_argument("--schedule", default="1f1b",
                   help="gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-h2, interleaved-zb, zb-v, dualpipe-v, "
                   "synth (built from the split's own costs), or 'auto' (default 1f1b)")
    p.add_argument("--stages-per-rank", type=_int_or_auto, default=1,
                   help="stages_per_rank (virtual stages per rank: >= 2 for interleaved-1f1b and "
                   "interleaved-zb, 2 for zb-v and dualpipe-v, 1 or 2 for synth), or 'auto': then --stages "
                   "counts ranks and the interleaved schedules try 2 and 4 stages per rank")
    p.add_argument("--data-parallel", type=_whole(1), default=1, metavar="D",
                   help="replicas of the pipeline (data parallel); the factory's batch is the global one")
    p.add_argument("--recompute", choices=("none", "full", "selective", "auto"), default="none",
                   help="activation recompute per stage: none (default), full, selective, or auto (the "
                   "partitioner chooses each stage's policy with the split, within the memory limit)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="compute dtype of the stages: fp32 (default), bf16 or fp16 (autocast, fp32 master "
                   "weights; fp16 with loss scaling)")
    p.add_argument("--cost-model", default="profile",
                   help="'profile' (measure here), a name in cost_models/ such as h100-sxm, or a JSON path")
    p.add_argument("--memory-limit", default=None,
                   help="per-rank memory limit such as 80GiB (default: the cost model's capacity)")
    p.add_argument("--device-speeds", type=_speeds, default=None,
                   help="relative speed of each rank, e.g. 1,1,0.5,0.5")
    p.add_argument("--strategy", default="optimal",
                   help="optimal (default), equal-count, by-params or greedy")
    p.add_argument("--method", default="auto", help="trace method: auto, fx or export")
    p.add_argument("-o", "--output", required=True, type=Path, help="plan directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing plan directory")

    s = sub.add_parser("show", help="print a plan's summary and schedule; (re)write its report.html")
    s.add_argument("directory", type=Path)

    r = sub.add_parser("run", help="run a plan directory on N local processes through torchrun")
    r.add_argument("directory", type=Path)
    r.add_argument("--nproc", type=_whole(1), default=None,
                   help="processes (ranks); default and only valid value: the plan's num_ranks")
    r.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                   help="default: nccl when CUDA is available, else gloo")
    r.add_argument("--steps", type=_whole(1), default=5, help="training steps (default 5)")
    r.add_argument("--resume", action="store_true", help="resume from DIR/checkpoint")
    r.add_argument("--checkpoint-every", type=_whole(0), default=0, metavar="K",
                   help="save a checkpoint every K steps (0: never)")
    r.add_argument("--checkpoint-minutes", type=float, default=0.0, metavar="M",
                   help="also save one when M minutes passed since the last (0: never)")
    r.add_argument("--max-restarts", type=_whole(0), default=0, metavar="N",
                   help="after a rank fails, restart every rank from the newest checkpoint, up to N times")
    r.add_argument("--master-addr", default="127.0.0.1",
                   help="rendezvous address (default 127.0.0.1: local only)")
    r.add_argument("--nnodes", type=_whole(1), default=1,
                   help="nodes (torchrun's --nnodes); run the same command on each with its --node-rank")
    r.add_argument("--node-rank", type=_whole(0), default=0, help="this node's index (torchrun's --node-rank)")
    r.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="the c10d rendezvous every node joins (needed with --nnodes > 1)")

    e = sub.add_parser("export", help="write a plan for another runtime (torch.distributed.pipelining)")
    e.add_argument("directory", type=Path)
    e.add_argument("--format", choices=("torch",), required=True,
                   help="torch: the lowered schedule as torch's pipeline-order CSV and the stage modules "
                   "for PipelineStage")
    e.add_argument("-o", "--output", type=Path, default=None,
                   help="the directory to write (default: DIR-torch beside the plan)")
    e.add_argument("--force", action="store_true", help="replace an existing export")

    c = sub.add_parser("calibrate", help="measure this machine and write a hardware cost-model file")
    c.add_argument("-o", "--output", required=True, type=Path, help="e.g. cost_models/mybox.json")
    c.add_argument("--name", default=None, help="name recorded in the file (default: file stem)")
    c.add_argument("--backend", choices=("gloo", "nccl"), default=None)
    c.add_argument("--quick", action="store_true", help="small sizes: seconds instead of a minute")
    return parser, dict(sub.choices)  # the action add_subparsers returns: command name -> its parser


def _check_output(out: Path, force: bool) -> None:
    """Refuse an unusable plan directory before any work (save_plan checks again)."""
    from pipec.codegen import PLAN_FILE

    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r}: expected a directory, found a file; choose a directory path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / PLAN_FILE).is_file():
        raise ConfigError(
            f"output directory {str(out)!r} exists, is not empty and holds no {PLAN_FILE}, so it is "
            "not a pipec plan; choose a new or empty directory (--force replaces plans only)"
        )
    if not force:
        raise ConfigError(
            f"output directory {str(out)!r} already holds a plan; pass --force to replace it, "
            "or choose another directory"
        )


def _cmd_partition(args: argparse.Namespace) -> int:
    from pipec.factory import load_factory, resolve_spec

    out: Path = args.output
    _check_output(out, args.force)
    spec = resolve_spec(args.factory)
    made = load_factory(spec)
    from pipec.facade import partition

    kwargs: dict[str, Any] = dict(
        num_stages=args.stages,
        num_microbatches=args.microbatches,
        schedule=args.schedule,
        stages_per_rank=args.stages_per_rank,
        data_parallel=args.data_parallel,
        precision=args.precision,
        recompute=args.recompute,
        loss_fn=made.loss_fn,
        cost_model=args.cost_model,
        memory_limit=args.memory_limit,
        device_speeds=args.device_speeds,
        strategy=args.strategy,
        example_kwargs=made.example_kwargs or None,
        method=args.method,
        target=made.target,
    )
    plan = partition(made.model, made.example_inputs, **kwargs)
    plan = plan.with_factory(spec)
    print(plan.summary())
    plan.save(out)
    print(f"plan written to {out}; report: {out / 'report.html'}")
    return 0


def _write_report(plan: Plan, directory: Path) -> Path | None:
    from pipec.viz.report import write_report

    return write_report(plan.data, directory, traced=plan.traced)


def _cmd_show(args: argparse.Namespace) -> int:
    from pipec.facade import load

    plan = load(args.directory)
    print(plan.summary())
    line = _last_run_error(plan, args.directory)
    if line is not None:
        print(line)
    try:
        from pipec.schedule.grid import schedule_grid

        print()
        print(schedule_grid(plan.schedule))
    except ImportError:
        print(plan.schedule.to_text())
    report = _write_report(plan, args.directory)
    if report is not None:
        print(f"report: {report}")
    return 0


def _last_run_error(plan: Plan, directory: str) -> str | None:
    """The last run's step against the prediction, when ``pipec run`` left timelines
    in ``directory`` (``timeline_rank<r>.json``); None when there are none."""
    from pipec.viz.report_compare import error_line, timelines_prediction
    from pipec.viz.report_measured import load_measured

    measured = load_measured(directory)
    if measured is None or not measured.num_steps:
        return None
    try:
        predicted = plan.simulate()
    except PipecError as e:  # a plan that cannot be simulated still shows its summary
        return f"measured step {measured.step_time * 1e3:.3g} ms (no prediction: {e})"
    return (f"last run: {error_line(measured.step_time, timelines_prediction(plan.data, predicted))}"
            f" (median of {measured.num_steps} step(s) in {', '.join(measured.files)})")


def _cmd_run(args: argparse.Namespace) -> int:
    from pipec.facade import load
    from pipec.runtime.launch import run_plan

    # a missing, damaged or hand-edited plan fails here, before any process starts
    plan = load(args.directory)
    world = plan.data.world_size  # data_parallel x num_ranks
    if world % args.nnodes:
        raise ConfigError(f"the plan runs on {world} processes, which --nnodes {args.nnodes} does not divide; "
                          f"use a node count that divides {world}")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT, the same on every node "
                          "(a port on the first node that every node can reach)")
    per_node = world // args.nnodes
    if args.nproc is None:
        args.nproc = per_node
    if args.nproc != per_node:
        layout = (f"{world} ranks" if plan.data.data_parallel == 1
                  else f"{plan.data.data_parallel} replicas x {plan.num_ranks} ranks = {world} processes")
        on_nodes = f" on each of {args.nnodes} nodes" if args.nnodes > 1 else ""
        raise ConfigError(
            f"the plan in {args.directory} runs on {layout}, but --nproc is {args.nproc}{on_nodes}; "
            f"pass --nproc {per_node}, or re-plan with `pipec partition` for {args.nproc * args.nnodes}"
        )
    from pipec.runtime.launch import Nodes

    nodes = Nodes(args.nnodes, args.node_rank, args.rdzv_endpoint) if args.nnodes > 1 else None

    extra: list[str] = []
    if args.resume:
        extra.append("--resume")
    if args.checkpoint_every:
        extra += ["--checkpoint-every", str(args.checkpoint_every)]
    if args.checkpoint_minutes < 0:
        raise ConfigError(f"--checkpoint-minutes: expected minutes >= 0, found {args.checkpoint_minutes}")
    if args.checkpoint_minutes:
        extra += ["--checkpoint-minutes", repr(args.checkpoint_minutes)]
    code: int = run_plan(
        args.directory,
        nproc=args.nproc,
        backend=args.backend,
        steps=args.steps,
        extra_args=tuple(extra),
        master_addr=args.master_addr,
        nodes=nodes,
        max_restarts=args.max_restarts,
    )
    if code == 0:
        _write_report_quietly(args.directory)
    return code


def _cmd_export(args: argparse.Namespace) -> int:
    from pipec.facade import export_torch, load
    from pipec.split.torch_export import EXPORT_FILE, LOWERED_CSV

    directory: Path = args.directory
    base = directory.resolve()  # `pipec export .` names the export after the directory itself
    out: Path = args.output or base.with_name(f"{base.name}-{args.format}")
    if out.is_dir() and (out / EXPORT_FILE).is_file() and not args.force:
        raise ConfigError(f"output directory {str(out)!r} already holds an export; pass --force to replace it, "
                          "or choose another directory with -o")
    plan = load(directory)  # a missing, damaged or hand-edited plan fails here
    export_torch(plan, out)
    print(f"exported {plan.data.model_name} ({plan.num_stages} stages on {plan.num_ranks} ranks, schedule "
          f"{plan.schedule.name}) for torch.distributed.pipelining to {out}: {LOWERED_CSV} (load with "
          f"_PipelineScheduleRuntime._load_csv(path, format='compute_comms')), stage modules from "
          f"pipec.load_torch_stage({str(out)!r}, k), or pipec.load_torch_pipeline({str(out)!r}, loss_fn=...) "
          "inside a process group")
    return 0


def _write_report_quietly(directory: Path) -> None:
    try:
        from pipec.facade import load

        report = _write_report(load(directory), directory)
        if report is not None:
            print(f"report: {report}")
    except PipecError as exc:
        logging.getLogger(__name__).warning("could not write the report: %s", exc)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from pipec.runtime.calibrate import calibrate

    spec = calibrate(args.output, name=args.name, backend=args.backend, quick=args.quick)
    print(f"wrote {args.output} ({spec.name})")
    return 0


_COMMANDS = {
    "partition": _cmd_partition,
    "show": _cmd_show,
    "run": _cmd_run,
    "export": _cmd_export,
    "calibrate": _cmd_calibrate,
}


def _error_text(exc: BaseException) -> str:
    """The message of ``exc`` for the terminal: its lines kept (a grid must stay a grid),
    trailing spaces and blank lines at either end dropped; never empty."""
    lines = [line.rstrip() for line in str(exc).splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return _COMMANDS[args.command](args)
    except PipecError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"pipec: error: {_error_text(exc)}\n")
        return EXIT_USAGE
    except BrokenPipeError:  # the reader went away (`pipec show DIR | head`): stop quietly,
        # as a program killed by SIGPIPE does, and keep Python's exit from flushing into the pipe
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:  # a path the user gave cannot be read or written
        if args.debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        message = " ".join(f"{type(exc).__name__}: {exc.strerror or exc}{where}".split())
        sys.stderr.write(
            f"pipec: error: {message}; check the path and its permissions (--debug for the traceback)\n"
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("pipec: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
