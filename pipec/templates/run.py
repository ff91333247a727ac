"""Train the pipeline plan in this directory: one process per rank.

    torchrun --nproc-per-node N [--max-restarts R] run.py [--steps K] [--lr LR]
                 [--backend gloo|nccl] [--checkpoint-every K] [--checkpoint-minutes M] [--resume]
    pipec run DIR --nproc N [--steps K] [--checkpoint-every K] [--checkpoint-minutes M]
                  [--resume] [--max-restarts R]          (the same, launched for you)
    torchrun --nnodes 2 --node-rank R --nproc-per-node N/2 --rdzv-backend c10d \
             --rdzv-endpoint HOST:PORT run.py [...]   (on each of 2 nodes, R = 0, 1)

N is the plan's world: data_parallel x num_ranks processes.

Written by pipec; this is your training loop, edit it freely. Every rank runs
this file: it builds its own stage(s) from stage_<k>.py + stage_<k>.safetensors,
passes its replica's share of the global batch to pipe.step(...) (the whole
batch with one replica; the runtime splits it into micro-batches), and the
ranks holding the last stage print the loss (the global mean over replicas).

The batch, target and loss come from the factory recorded in plan.json
("FILE.py:FACTORY", a function returning a dict with model, example_inputs,
optional example_kwargs, loss_fn and target); without one, a random batch of
the recorded input shapes and the mean of the output serve as a smoke test.
Each rank writes its measured timeline to timeline_rank<r>.json here.

--steps is the total: with --resume, training continues from the newest
checkpoint in --checkpoint-dir (default checkpoint/ here) up to --steps;
--checkpoint-every K saves one every K steps and --checkpoint-minutes M one
when M minutes passed since the last (rank 0's clock, agreed by every rank),
the newest --keep kept. When a rank fails, it tells the others (they stop
within seconds) and prints the pipeline's first failure as a PIPEC_FAILURE
line, which `pipec run` reports. With torchrun's --max-restarts R, torchrun
then starts every rank again (up to R times) and this file resumes from the
newest complete checkpoint by itself (TORCHELASTIC_RESTART_COUNT > 0); each
step is a function of its index (the same batch, dropout drawn from the seed
saved in the checkpoint and the step), so the run ends with the parameters an
uninterrupted run has. Every rank dies with its launcher (prctl PDEATHSIG).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import pipec
from pipec.factory import FactoryResult, resolve_spec, split_spec
from pipec.factory import load_factory as pipec_load_factory
from pipec.microbatch import call_of, replica_share
from pipec.plan import PlanData
from pipec.runtime.failure import failure_line, record_of

HERE = Path(__file__).resolve().parent


def load_factory(spec: str) -> FactoryResult:
    """Call FACTORY from FILE.py (a path as recorded by `pipec partition`, or relative to here)."""
    path, _ = split_spec(spec)
    if not path.is_file() and (HERE / path).is_file():
        spec = resolve_spec(spec, HERE)
    return pipec_load_factory(spec)


def mean_of_output(output: Any, target: Any = None) -> torch.Tensor:
    """Smoke-test loss: the mean of the output's first floating-point tensor."""
    if isinstance(output, torch.Tensor):
        return output.float().mean()
    values = output.values() if isinstance(output, dict) else output
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.float().mean()
    raise ValueError("the model output holds no floating-point tensor to take the mean of")


def random_batch(plan: PlanData) -> tuple[Any, ...]:
    """A full batch of the shapes in plan.json (inputs are recorded per micro-batch)."""
    batch: list[torch.Tensor | None] = []
    for spec in plan.inputs:
        meta = spec.meta
        if meta is None:
            batch.append(None)
            continue
        shape = list(meta.shape)
        if shape:
            shape[0] = plan.batch_size or shape[0] * plan.num_microbatches
        dtype = meta.torch_dtype
        if dtype.is_floating_point:
            batch.append(torch.randn(shape, dtype=dtype))
        elif dtype == torch.bool:
            batch.append(torch.ones(shape, dtype=dtype))
        else:
            batch.append(torch.randint(0, 2, shape, dtype=dtype))
    return tuple(batch)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="train until this many steps are done")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=os.environ.get("PIPEC_BACKEND") or None)
    parser.add_argument("--timelines", type=Path, default=HERE, help="where timeline_rank<r>.json go")
    parser.add_argument("--checkpoint-dir", type=Path, default=HERE / "checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="K", help="0: never")
    parser.add_argument("--checkpoint-minutes", type=float, default=0.0, metavar="M", help="0: never")
    parser.add_argument("--keep", type=int, default=2, help="checkpoints kept (the newest)")
    parser.add_argument("--resume", action="store_true", help="start from the newest checkpoint")
    return parser.parse_args()


def train(args: argparse.Namespace, state: dict[str, Any]) -> None:
    loaded = pipec.load(HERE)  # every file checked (manifest.json, schedule) before any code runs
    plan = loaded.data
    torch.manual_seed(0)  # the same batch on every rank
    kwargs: dict[str, Any] = {}
    target: Any = None
    loss_fn: Callable[..., torch.Tensor] = mean_of_output
    if plan.factory:
        made = load_factory(plan.factory)
        inputs = made.example_inputs
        kwargs = dict(made.example_kwargs)
        target = made.target
        loss_fn = made.loss_fn or mean_of_output
        del made  # the plan's weights come from the safetensors files, not this model
    else:  # the plan's inputs, called as the model was traced (positions, keywords, dicts)
        inputs, kwargs = call_of(random_batch(plan), plan.input_structure, plan.inputs)

    pipe = state["pipe"] = pipec.PipelineRuntime(loaded, loss_fn=loss_fn, backend=args.backend)
    size = getattr(pipe, "data_parallel_size", 1)
    if size > 1:  # every rank of replica d passes rows [d b, (d + 1) b) of the global batch
        inputs, kwargs, target = replica_share((inputs, kwargs, target), size, pipe.data_parallel_rank)
    # pipe.optimizer: under fp16 its step() skips an overflowed step on every rank (loss scaling)
    optimizer = pipe.optimizer(torch.optim.SGD, lr=args.lr)
    first = 0
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)  # torchrun --max-restarts
    if args.resume or (restart > 0 and (args.checkpoint_dir / "latest").is_file()):
        first = pipe.load_checkpoint(args.checkpoint_dir, optimizer=optimizer)
        if pipe.rank == 0:
            again = f" (restart {restart})" if restart else ""
            print(f"resumed from the checkpoint of step {first} in {args.checkpoint_dir}{again}", flush=True)
    elif restart > 0 and pipe.rank == 0:
        print(f"restart {restart}: no checkpoint in {args.checkpoint_dir} yet, starting from step 0", flush=True)
    saved_at = time.monotonic()
    for step in range(first, args.steps):
        state["step"] = step
        start = time.perf_counter()
        loss = pipe.step(*inputs, target=target, **kwargs)
        optimizer.step()
        optimizer.zero_grad()
        elapsed = time.perf_counter() - start
        if loss is not None:
            print(f"step {step}: loss {loss.item():.5f}  step time {elapsed * 1e3:.1f} ms", flush=True)
        due = args.checkpoint_every > 0 and (step + 1) % args.checkpoint_every == 0
        if args.checkpoint_minutes > 0 and not due:  # rank 0's clock decides, for every rank
            late = pipe.rank == 0 and time.monotonic() - saved_at >= args.checkpoint_minutes * 60
            due = pipe.any_rank(late, "whether a checkpoint is due")
        if due:
            saved_at = time.monotonic()
            path = pipe.save_checkpoint(args.checkpoint_dir, optimizer=optimizer, step=step + 1, keep=args.keep)
            if pipe.rank == 0:
                print(f"checkpoint of step {step + 1} written to {path}", flush=True)

    if hasattr(pipe, "save_timeline"):  # read by `pipec show` / report.html
        pipe.save_timeline(args.timelines / f"timeline_rank{pipe.rank}.json")
        if pipe.rank == 0:
            print(f"measured timelines written to {args.timelines}", flush=True)
    pipe.close()


def main() -> None:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # never outlive torchrun (and so `pipec run`)
        from pipec.runtime.parent_death import die_with_parent

        die_with_parent()
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart != "0" and os.environ.get("LOCAL_RANK") == "0":  # for `pipec run`: one restart, one message
        print(f"PIPEC_ATTEMPT {restart}", flush=True)
    args = parse_args()
    state: dict[str, Any] = {"pipe": None, "step": None}
    try:
        train(args, state)
    except BaseException as exc:
        # tell the other ranks (they stop at once), then print the pipeline's first failure
        pipe = state["pipe"]
        if pipe is not None:
            record = pipe.report_failure(exc, step=state["step"])
        else:
            record = record_of(exc, rank=int(os.environ.get("RANK", "0")), step=state["step"])
        traceback.print_exc()
        print(failure_line(record), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # a thread may still be blocked in a wait: do not wait for it at exit


if __name__ == "__main__":
    main()
