"""Train the pipeline plan in this directory: one process per rank.

    torchrun --nproc-per-node N run.py [--steps K] [--lr LR] [--backend gloo|nccl]
    pipec run DIR --nproc N [--steps K]          (the same, launched for you)

Written by pipec; this is your training loop, edit it freely. Every rank runs
this file: it builds its own stage(s) from stage_<k>.py + stage_<k>.safetensors,
passes the FULL batch to pipe.step(...) (the runtime splits it into
micro-batches), and the rank holding the last stage prints the loss.

The batch, target and loss come from the factory recorded in plan.json
("FILE.py:FACTORY", a function returning a dict with model, example_inputs,
optional example_kwargs, loss_fn and target); without one, a random batch of
the recorded input shapes and the mean of the output serve as a smoke test.
Each rank writes its measured timeline to timeline_rank<r>.json here.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import pipec
from pipec.factory import FactoryResult, resolve_spec, split_spec
from pipec.factory import load_factory as pipec_load_factory

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


def random_batch(plan: dict[str, Any]) -> tuple[Any, ...]:
    """A full batch of the shapes in plan.json (inputs are recorded per micro-batch)."""
    batch: list[torch.Tensor | None] = []
    for spec in plan["inputs"]:
        meta = spec["meta"]
        if meta is None:
            batch.append(None)
            continue
        shape = list(meta["shape"])
        if shape:
            shape[0] = plan.get("batch_size") or shape[0] * plan["num_microbatches"]
        dtype = getattr(torch, meta["dtype"])
        if dtype.is_floating_point:
            batch.append(torch.randn(shape, dtype=dtype))
        elif dtype == torch.bool:
            batch.append(torch.ones(shape, dtype=dtype))
        else:
            batch.append(torch.randint(0, 2, shape, dtype=dtype))
    return tuple(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None)
    parser.add_argument("--timelines", type=Path, default=HERE, help="where timeline_rank<r>.json go")
    args = parser.parse_args()

    plan = json.loads((HERE / "plan.json").read_text(encoding="utf-8"))
    torch.manual_seed(0)  # the same batch on every rank
    kwargs: dict[str, Any] = {}
    target: Any = None
    loss_fn: Callable[..., torch.Tensor] = mean_of_output
    if plan.get("factory"):
        made = load_factory(plan["factory"])
        inputs = made.example_inputs
        kwargs = dict(made.example_kwargs)
        target = made.target
        loss_fn = made.loss_fn or mean_of_output
        del made  # the plan's weights come from the safetensors files, not this model
    else:
        inputs = random_batch(plan)

    pipe = pipec.PipelineRuntime(HERE, loss_fn=loss_fn, backend=args.backend)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=args.lr)
    for step in range(args.steps):
        start = time.perf_counter()
        loss = pipe.step(*inputs, target=target, **kwargs)
        optimizer.step()
        optimizer.zero_grad()
        elapsed = time.perf_counter() - start
        if loss is not None:
            print(f"step {step}: loss {loss.item():.5f}  step time {elapsed * 1e3:.1f} ms", flush=True)

    if hasattr(pipe, "save_timeline"):  # read by `pipec show` / report.html
        pipe.save_timeline(args.timelines / f"timeline_rank{pipe.rank}.json")
        if pipe.rank == 0:
            print(f"measured timelines written to {args.timelines}", flush=True)


if __name__ == "__main__":
    main()
