"""Run one zoo model through everything a user does, recording each check apart.

For a :class:`zoo_models.ZooCase` :func:`run_case` does, in order:

``partition``  ``pipec.partition`` with the defaults (``cost_model="profile"``,
               ``method="auto"``, schedule 1F1B) on 2 stages, 2 micro-batches
``unchanged``  the user's model is as it was: parameters, buffers, train/eval
               flags, ``requires_grad``, no ``.grad`` left, no hooks left
``save_load``  ``plan.save`` then ``pipec.load``: the loaded plan has the same data,
               and its stage weights are the user's weights under their FQNs
``step``       one training step of the loaded plan on 2 Gloo ranks: the loss
               comes back on one rank and equals the single-process loss
``grads``      every gradient equals the single-process one (full batch; for
               BatchNorm models, ``loss / num_microbatches`` accumulated over the
               micro-batches, since a pipeline normalises each micro-batch alone)
``eval``       ``pipe.eval(); pipe.forward(batch)`` equals ``model.eval()(batch)``

Each check records ok, a one-paragraph detail and, where one is measured, the
max abs difference; a check that cannot run because an earlier one failed
fails too, naming that check. ``eval`` and ``step`` each run in a Gloo
launch of their own (two forked ranks, about a second) from the saved plan,
so BatchNorm running statistics are the user's in both.

    python benchmarks/zoo.py     # the same checks as a table
"""

from __future__ import annotations

import copy
import math
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from zoo_models import NUM_MICROBATCHES, ZooCase

import pipec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
from _workers import run_ranks  # noqa: E402

CHECKS = ("partition", "unchanged", "save_load", "step", "grads", "eval")
NUM_STAGES = 2
TOL = {"rtol": 1e-4, "atol": 1e-5}
LAUNCH_TIMEOUT = 90.0
RUNTIME_TIMEOUT = 30.0


@dataclass
class Check:
    ok: bool
    detail: str = ""
    max_abs_diff: float | None = None


@dataclass
class CaseResult:
    name: str
    checks: dict[str, Check] = field(default_factory=dict)
    trace_method: str | None = None
    plan_time: float | None = None
    balance: float | None = None  # slowest stage time / mean stage time
    wall_time: float = 0.0


def _error(exc: BaseException) -> str:
    """The exception and where it was raised: its last frames, enough to assign it."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__}: {exc}\n  at {where}"


def _not_run(because: str) -> Check:
    return Check(False, f"not run: {because} failed (see that check)")


# -- the user's model before and after -------------------------------------------
def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        "training": {n: m.training for n, m in model.named_modules(remove_duplicate=False)},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                len(m._state_dict_hooks), len(m._load_state_dict_pre_hooks))
            for n, m in model.named_modules(remove_duplicate=False)
        },
    }


def _changes(before: dict[str, Any], model: nn.Module) -> list[str]:
    after = _snapshot(model)
    found: list[str] = []
    if set(after["state"]) != set(before["state"]):
        found.append(f"state_dict keys changed: {sorted(set(after['state']) ^ set(before['state']))}")
    for k, v in before["state"].items():
        w = after["state"].get(k)
        if w is not None and (w.shape != v.shape or w.dtype != v.dtype or not torch.equal(w, v)):
            found.append(f"{k} changed" + (f" (max abs diff {_diff(w, v):.3g})" if w.shape == v.shape else ""))
    for what in ("params", "requires_grad", "training", "hooks"):
        diff = sorted(k for k in before[what] if after[what].get(k) != before[what][k])
        if diff:
            found.append(f"{what} changed on {diff[:5]}")
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    if grads:
        found.append(f".grad left on {grads[:5]}")
    return found


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


# -- references (single process, on copies of the untouched model) ---------------
def _microbatches(value: Any) -> list[Any]:
    leaves, spec = pytree.tree_flatten(value)
    chunks: list[list[Any]] = [[] for _ in range(NUM_MICROBATCHES)]
    for leaf in leaves:
        parts = leaf.chunk(NUM_MICROBATCHES) if isinstance(leaf, torch.Tensor) and leaf.dim() else None
        for m, c in enumerate(chunks):
            c.append(parts[m] if parts is not None else leaf)
    return [pytree.tree_unflatten(c, spec) for c in chunks]


def _loss(case: ZooCase, output: Any, target: Any) -> torch.Tensor:
    return case.loss_fn(output) if case.target is None else case.loss_fn(output, target)


def reference_step(case: ZooCase, model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients (by parameter name) of one single-process training step."""
    model = copy.deepcopy(model).train()
    if case.microbatch_reference:
        total = torch.zeros(())
        for args, kwargs, target in zip(*map(_microbatches, (case.inputs, case.kwargs, case.target))):
            loss = _loss(case, model(*args, **kwargs), target) / NUM_MICROBATCHES
            loss.backward()
            total += loss.detach()
    else:
        total = _loss(case, model(*case.inputs, **case.kwargs), case.target)
        total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.detach(), grads


def reference_eval(case: ZooCase, model: nn.Module) -> Any:
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        return model(*case.inputs, **case.kwargs)


# -- the two ranks -----------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One phase (``"eval"``: ``pipe.eval(); pipe.forward(...)``, or ``"step"``: one
    training step) on one saved plan. Each runs in a launch of its own: after a
    failure a runtime breaks its connections on purpose (peers stop at once), so
    nothing can run after it in the same process group."""

    directory: str
    phase: str
    loss_fn: Callable[..., torch.Tensor]
    inputs: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    target: Any


def _ranks(rank: int, world_size: int, job: Job) -> tuple[str, Any]:
    try:
        return _run_job(rank, job)
    finally:
        _all_done(world_size)


def _all_done(world_size: int) -> None:
    """Leave only when every rank is done. Here rank 0's process hosts the c10d
    store (under torchrun the agent does): if it exited at once after a failure,
    a rank still building its runtime would wait on the lost store for the
    process group's timeout (30 minutes), not fail."""
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
        store.add("zoo/done", 1)
        deadline = time.monotonic() + RUNTIME_TIMEOUT
        while store.add("zoo/done", 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.02)
    except Exception:  # the store is gone: nobody is left to wait for
        return


def _run_job(rank: int, job: Job) -> tuple[str, Any]:
    from pipec.runtime.runtime import PipelineRuntime

    try:
        pipe = PipelineRuntime(job.directory, job.loss_fn, timeout=RUNTIME_TIMEOUT)
        if job.phase == "eval":
            pipe.eval()
            return "ok", pipe.forward(*job.inputs, **job.kwargs)
        pipe.train()
        loss = pipe.step(*job.inputs, target=job.target, **job.kwargs)
        return "ok", (loss, {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None})
    except Exception as e:  # the check reports it, with the other rank's outcome
        return "error", f"rank {rank}: {_error(e)}"


def _launch(job: Job) -> list[tuple[str, Any]]:
    """Each rank's outcome of ``job``: ("ok", value) or ("error", why)."""
    try:
        return run_ranks(_ranks, NUM_STAGES, job, timeout=LAUNCH_TIMEOUT)
    except Exception as e:  # a crash or hang of the whole launch
        return [("error", f"2-rank launch failed: {e}")]


# -- checks on what the ranks returned ---------------------------------------------
def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name of a parameter (tied aliases too) -> the name ``named_parameters`` gives."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out[n] = first.setdefault(id(p), n)
    return out


def _step_checks(case: ZooCase, ranks: list[tuple[str, Any]], model: nn.Module,
                 compare_loss: bool) -> tuple[Check, Check]:
    errors = [r[1] for r in ranks if r[0] == "error"]
    if errors:
        return Check(False, "\n".join(errors)), _not_run("step")
    ref_loss, ref_grads = reference_step(case, model)
    losses = [r[1][0] for r in ranks if r[1][0] is not None]
    if len(losses) != 1:
        step = Check(False, f"expected the loss on exactly one rank, found it on {len(losses)}")
    elif not torch.isfinite(losses[0]).all():
        step = Check(False, f"loss is not finite: {losses[0]}")
    elif compare_loss:
        d = _diff(losses[0], ref_loss)
        ok = bool(torch.isclose(losses[0], ref_loss, **TOL))
        step = Check(ok, f"loss {float(losses[0]):.6g}, single-process {float(ref_loss):.6g}", d)
    else:
        step = Check(True, f"loss {float(losses[0]):.6g} (stochastic: not compared)")
    names = _canonical_names(model)
    grads: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for r in ranks:
        for n, g in r[1][1].items():
            key = names.get(n, n)
            if key in grads and not torch.allclose(g, grads[key], **TOL):
                problems.append(f"{key}: the ranks holding it disagree (max abs diff {_diff(g, grads[key]):.3g})")
            grads[key] = g
    missing, extra = sorted(set(ref_grads) - set(grads)), sorted(set(grads) - set(ref_grads))
    if missing or extra:
        problems.append(f"gradient names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    worst, worst_name = 0.0, ""
    for n, want in ref_grads.items():
        if n not in grads:
            continue
        got = grads[n]
        if got.shape != want.shape:
            problems.append(f"{n}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
            continue
        d = _diff(got, want)
        if d > worst:
            worst, worst_name = d, n
        if not torch.allclose(got, want, **TOL):
            problems.append(f"{n}: max abs diff {d:.3g} (|grad| max {float(want.abs().max()):.3g})")
    detail = "; ".join(problems[:6]) if problems else (
        f"{len(ref_grads)} gradients equal" + (f"; largest difference on {worst_name}" if worst_name else ""))
    return step, Check(not problems, detail, worst)


def _tensor_leaves(value: Any) -> list[Any]:
    """Tensor leaves; a list of 0-d tensors (per-micro-batch scalars, as the runtime
    merges a scalar output such as an HF ``loss``) stays one leaf."""
    def per_microbatch(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, torch.Tensor) and t.dim() == 0 for t in x)

    leaves = pytree.tree_leaves(value, is_leaf=per_microbatch)
    return [x for x in leaves if isinstance(x, torch.Tensor) or per_microbatch(x)]


def _eval_check(case: ZooCase, ranks: list[tuple[str, Any]], model: nn.Module) -> Check:
    errors = [r[1] for r in ranks if r[0] == "error"]
    if errors:
        return Check(False, "\n".join(errors))
    outputs = [r[1] for r in ranks if r[1] is not None]
    if len(outputs) != 1:
        return Check(False, f"expected the output on exactly one rank, found it on {len(outputs)}")
    got, want = _tensor_leaves(outputs[0]), _tensor_leaves(reference_eval(case, model))
    if len(got) != len(want):
        return Check(False, f"the output has {len(got)} tensors, model.eval() gives {len(want)}")
    worst, problems = 0.0, []
    for i, (g, w) in enumerate(zip(got, want)):
        if isinstance(g, list):  # the mean of equal-sized micro-batches' means (an HF loss)
            g = torch.stack(g).mean()
        if g.shape != w.shape:
            problems.append(f"output {i}: shape {tuple(g.shape)}, expected {tuple(w.shape)}")
            continue
        d = _diff(g, w)
        worst = max(worst, d)
        if not torch.allclose(g, w, **TOL):
            problems.append(f"output {i} {tuple(w.shape)}: max abs diff {d:.3g}")
    detail = "; ".join(problems) if problems else f"{len(want)} output tensors equal model.eval()'s"
    return Check(not problems, detail, worst)


# -- the whole case ----------------------------------------------------------------
def _partition(case: ZooCase, model: nn.Module) -> pipec.Plan:
    return pipec.partition(
        model, case.inputs, num_stages=NUM_STAGES, num_microbatches=NUM_MICROBATCHES,
        loss_fn=case.loss_fn, example_kwargs=case.kwargs or None, target=case.target,
    )


def _save_load(plan: pipec.Plan, directory: Path, pristine: nn.Module) -> tuple[Check, pipec.Plan | None]:
    try:
        saved = plan.save(directory)
        loaded = pipec.load(saved)
        problems: list[str] = []
        mismatch = [k for k in ("stages", "boundaries", "schedule", "tied_groups", "inputs")
                    if getattr(loaded.data, k) != getattr(plan.data, k)]
        if mismatch:
            problems.append(f"loaded plan differs in {mismatch}")
        want = pristine.state_dict()
        params = dict(pristine.named_parameters(remove_duplicate=False))
        covered: set[int] = set()
        for s in range(loaded.num_stages):
            for k, v in loaded.stage_module(s).state_dict().items():
                if k not in want:
                    problems.append(f"stage {s} holds {k}, not a name of the model's state_dict")
                elif v.shape != want[k].shape or not torch.equal(v, want[k]):
                    problems.append(f"stage {s} {k} differs from the user's model")
                else:
                    covered.add(id(params.get(k)))
        lost = [n for n, p in pristine.named_parameters() if id(p) not in covered]
        if lost:
            problems.append(f"no stage holds the parameters {lost[:5]}")
    except Exception as e:
        return Check(False, _error(e)), None
    # the ranks still run a plan whose weights differ: the gradients then show what that costs
    return Check(not problems, "; ".join(problems[:6])), loaded


def run_case(case: ZooCase, workdir: Path) -> CaseResult:
    started = time.perf_counter()
    result = CaseResult(case.name)
    checks = result.checks
    model = case.build().train()
    pristine = copy.deepcopy(model)
    before = _snapshot(model)
    try:
        t = time.perf_counter()
        plan = _partition(case, model)
        result.plan_time = time.perf_counter() - t
        result.trace_method = plan.data.trace_method
        times = [s.forward_time + s.backward_time for s in plan.stages]
        result.balance = max(times) / (sum(times) / len(times)) if sum(times) > 0 else math.nan
        checks["partition"] = Check(True, f"{plan.num_stages} stages, traced with {plan.data.trace_method}")
    except Exception as e:
        checks["partition"] = Check(False, _error(e))
        plan = None
    changes = _changes(before, model)
    checks["unchanged"] = Check(not changes, "; ".join(changes[:6]))
    if plan is None:
        for name in ("save_load", "step", "grads", "eval"):
            checks[name] = _not_run("partition")
        result.wall_time = time.perf_counter() - started
        return result
    checks["save_load"], loaded = _save_load(plan, workdir / case.name, pristine)
    if loaded is None:
        for name in ("step", "grads", "eval"):
            checks[name] = _not_run("save_load")
        result.wall_time = time.perf_counter() - started
        return result
    def job(directory: Path, phase: str) -> Job:
        return Job(str(directory), phase, case.loss_fn, case.inputs, case.kwargs, case.target)

    checks["eval"] = _eval_check(case, _launch(job(workdir / case.name, "eval")), pristine)
    stepped = _launch(job(workdir / case.name, "step"))
    if case.grad_build is None:
        checks["step"], checks["grads"] = _step_checks(case, stepped, pristine, compare_loss=True)
    else:  # the gradients of the dropout-free twin, planned and saved the same way
        checks["step"], _ = _step_checks(case, stepped, pristine, compare_loss=False)
        twin = case.grad_build().train()
        try:
            twin_dir = _partition(case, copy.deepcopy(twin)).save(workdir / f"{case.name}-p0")
        except Exception as e:
            checks["grads"] = Check(False, f"partition/save of the dropout-free twin: {_error(e)}")
        else:
            checks["grads"] = _step_checks(case, _launch(job(twin_dir, "step")), twin, compare_loss=True)[1]
    result.wall_time = time.perf_counter() - started
    return result
