"""Phase 2, profile: measure what every node of a traced graph costs on a device.

Input: a :class:`~pipec.types.TracedGraph` (its example inputs are one
micro-batch). Output: a :class:`Profile` -- per node a
:class:`~pipec.types.NodeCost` with the forward time, the input-gradient time
(I) and the weight-gradient time (W) of the zero-bubble split (Qi et al.,
"Zero Bubble Pipeline Parallelism", ICLR 2024, section 2), the bytes kept
for backward, output and parameter bytes -- plus the whole model's forward
and forward+backward time for reference.

How a node is measured (cf. torchgpipe's ``balance/profile.py``, which times
whole layers; here each fx node is timed alone):

- :func:`pipec.costs.node_exec.walk` runs the graph once and hands each node
  its captured inputs, as leaves that keep ``requires_grad``.
- Forward: the op on those inputs, with autograd recording as in training.
- I: ``torch.autograd.grad`` of the op's outputs w.r.t. its inputs that need a
  gradient; W: the same w.r.t. the parameters it reads (a module's
  parameters, or the trainable ``get_attr`` values a function reads). Both
  with ``retain_graph`` on one forward. An input that needs no gradient (the
  micro-batch) costs no I, as in the real backward.
- A node with both also has its whole backward B timed. When I + W exceeds
  1.3 B (and B by more than timer noise), one fused kernel computes both (batch norm's backward does), so each
  half paid for all of it: I and W are scaled to sum to B, keeping their
  measured proportion, and the cost is marked ``derived``. If autograd refuses
  to compute them apart, B is split by rule -- I = W = B/2 -- also ``derived``.

Timing (:class:`pipec.costs.timer.Timer`): medians over ``repeats`` samples
after ``warmup`` calls; each sample batches enough calls to last ~0.2 ms so
tiny ops (views, getitem) are not lost in timer noise, and the harness's own
per-call cost is subtracted, clamped at zero -- for backward also the fixed
cost of a ``torch.autograd.grad`` call, which a whole-model backward pays
once. CPU: ``time.perf_counter``; CUDA: CUDA events after a synchronisation.
The whole model's forward and forward+backward (and the loss's) are sampled
in alternation -- the whole model's half before the nodes and half after --
so a spell of a slower machine falls on both alike (:class:`_Alternating`).
"""

from __future__ import annotations

import logging
import platform
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from pipec._preserve import preserved
from pipec.costs.node_exec import (
    FREE_OPS,
    NodeFailure,
    NodeRun,
    backward_targets,
    storage_bytes,
    storage_key,
    walk,
)
from pipec.costs.precision import autocast, check_device_precision, upcast_floats
from pipec.costs.timer import Timer, node_thunks, progress_bar, settle_host_allocator
from pipec.errors import ConfigError, ProfileError
from pipec.loss import loss_parts
from pipec.types import FrozenModel, NodeCost, TracedGraph, check_precision

log = logging.getLogger(__name__)

_FUSED_RATIO = 1.3  # I + W above this times B: one kernel computes both


class Profile(FrozenModel):
    """Measured per-node costs of one traced graph on one device (one micro-batch)."""

    model_name: str
    device: str  # torch device string, e.g. "cpu", "cuda:0"
    device_name: str  # e.g. "NVIDIA H100 80GB HBM3"
    torch_version: str
    num_threads: int
    repeats: int
    warmup: int
    memory_capacity: int | None = None  # bytes on the device, when known
    forward_time: float  # whole model, seconds
    forward_backward_time: float  # whole model, seconds
    nodes: dict[str, NodeCost]
    # the loss on the model's output (forward; backward as input_grad_time; the bytes
    # its backward keeps), when pipec.profile was given loss_fn; None otherwise
    loss: NodeCost | None = None
    # "fp32" | "bf16" | "fp16": measured under that precision's autocast (as the stages run)
    precision: str = "fp32"

    @property
    def node_time(self) -> float:
        """Sum of every node's forward + backward time."""
        return sum(c.total_time for c in self.nodes.values())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            return cls.model_validate_json(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ProfileError(
                f"cannot read a profile from {str(path)!r}: {err}; re-run pipec.profile(...) and save it"
            ) from None


def _measure_node(run: NodeRun, timer: Timer) -> NodeCost:
    with torch.enable_grad():
        forward_time = timer.per_call(node_thunks(run, lambda a, k: run.call(a, k)))
        outs, grads = backward_targets(run.output)
        if not outs or not (run.input_leaves or run.params):
            return NodeCost(forward_time=forward_time, input_grad_time=0.0, weight_grad_time=0.0)
        both = run.input_leaves + run.params
        try:
            input_grad_time = timer.grad_per_call(outs, grads, run.input_leaves) if run.input_leaves else 0.0
            weight_grad_time = timer.grad_per_call(outs, grads, run.params) if run.params else 0.0
        except RuntimeError as err:
            log.debug("node %s: I and W cannot be asked for apart (%s)", run.node.name, err)
            backward_time = timer.grad_per_call(outs, grads, both)
            weight_share = 0.5 if run.params and run.input_leaves else (1.0 if run.params else 0.0)
            return NodeCost(forward_time=forward_time, input_grad_time=backward_time * (1 - weight_share),
                            weight_grad_time=backward_time * weight_share, derived=True)
        if run.input_leaves and run.params:
            backward_time = timer.grad_per_call(outs, grads, both)
            input_grad_time, weight_grad_time, derived = split_backward(
                input_grad_time, weight_grad_time, backward_time, noise=4 * timer.grad_node_time)
            return NodeCost(forward_time=forward_time, input_grad_time=input_grad_time,
                            weight_grad_time=weight_grad_time, derived=derived)
        return NodeCost(forward_time=forward_time, input_grad_time=input_grad_time,
                        weight_grad_time=weight_grad_time)


def split_backward(input_grad_time: float, weight_grad_time: float, backward_time: float, *,
                   noise: float) -> tuple[float, float, bool]:
    """A node's I and W from their times asked for apart and its whole backward B:
    ``(I, W, derived)``.

    As measured, unless I + W exceeds B by more than ``_FUSED_RATIO - 1`` of B and
    by more than ``noise`` seconds (timer noise): then one fused kernel computes both
    (cuDNN/ATen batch norm backward) and, asked for apart, each paid for all of it;
    I and W keep their measured proportion, scaled to sum to B, and are ``derived``.
    """
    excess = input_grad_time + weight_grad_time - backward_time
    if excess > (_FUSED_RATIO - 1) * backward_time and excess > noise:
        scale = backward_time / (input_grad_time + weight_grad_time)
        return input_grad_time * scale, weight_grad_time * scale, True
    return input_grad_time, weight_grad_time, False


def _whole_model(traced: TracedGraph, inputs: tuple[Any, ...]) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Thunks running the whole graph forward, and forward + backward.

    The backward accumulates into the parameters' ``.grad``, as a stage's does in
    the runtime: there every micro-batch after a step's first adds into gradients
    already allocated. A backward that returns fresh gradients instead
    (``torch.autograd.grad``) writes all of them to new memory on every call; on a
    CPU, where large blocks go back to the system when freed, it pays the page
    faults of the model's whole gradient size each time -- measured on blocks of
    32 MiB of parameters: 36 ms against 26 ms per backward, while the runtime's
    stages took 26 ms together. Call it with the user's gradients set aside
    (:func:`_grads_set_aside`), so none is ever added to. A parameter with a
    post-accumulate-grad hook (an optimizer stepping inside the backward) would
    run that hook on every timed call: then the gradients are returned instead.
    """
    gm = traced.graph_module
    params = tuple(p for p in gm.parameters() if p.requires_grad)
    accumulate = not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in params)

    def forward() -> Any:
        with torch.enable_grad():
            return gm(*inputs)

    def forward_backward() -> None:
        with torch.enable_grad():
            outs, grads = backward_targets(gm(*inputs))
            if outs and params:
                if accumulate:
                    torch.autograd.backward(outs, grads, inputs=list(params))
                else:
                    torch.autograd.grad(outs, params, grads, allow_unused=True)

    return forward, forward_backward


@contextmanager
def _grads_set_aside(gm: torch.fx.GraphModule) -> Iterator[None]:
    """Every parameter's ``.grad`` None on entry and on exit. Used twice around the move to
    the profiled device: outside it, so a user's gradient is not moved with the model
    (:func:`preserved` holds it and puts it back), and inside it, so the profiler's own
    gradients are dropped before the model moves back."""
    params = list(gm.parameters())
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p in params:
            p.grad = None


class _Alternating:
    """A forward and its forward + backward (whole model, or the loss), timed in alternation.

    On a shared machine the speed drifts for seconds at a time. Timing all
    forwards, then all forward + backwards, lets one slow spell fall on one of
    the two only -- and the backward, their difference, off by as much as the
    forward (seen: 72 ms against 154 ms for the same model). Samples alternate
    (the whole model's: half before the nodes are timed and half after) and
    each figure is the median of its samples.
    """

    def __init__(self, pair: tuple[Callable[[], Any], Callable[[], Any]], timer: Timer) -> None:
        self.timer = timer
        self.makes = [lambda n: [pair[0]] * n, lambda n: [pair[1]] * n]
        with torch.enable_grad():
            self.calls = [timer.calls_per_sample(make) for make in self.makes]
        self.samples: tuple[list[float], list[float]] = ([], [])

    def take(self, rounds: int) -> None:
        with torch.enable_grad():
            for _ in range(rounds):
                for make, calls, out in zip(self.makes, self.calls, self.samples):
                    out.append(self.timer.sample(make, calls))

    def medians(self) -> tuple[float, float]:
        if not self.samples[0]:
            self.take(1)
        forward, forward_backward = (statistics.median(s) for s in self.samples)
        return forward, forward_backward


def _measure_loss(output: Any, loss_fn: Callable[..., Any], target: Any, dev: torch.device,
                  timer: Timer) -> NodeCost | None:
    """The loss's forward and backward time on ``output`` (its float tensors as leaves),
    and the bytes its backward keeps; None, logged, if it fails there."""
    leaves, spec = pytree.tree_flatten(upcast_floats(output))  # as the runtime hands it to loss_fn
    leaves = [x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
              for x in leaves]
    out = pytree.tree_unflatten(leaves, spec)
    if target is not None:
        target = pytree.tree_map(lambda x: x.to(dev) if isinstance(x, torch.Tensor) else x, target)
    inputs = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]

    def forward() -> Any:  # the loss tensor; a (loss_sum, count) pair gives its loss_sum (pipec.loss)
        with torch.autocast(dev.type, enabled=False):  # the runtime runs the loss outside autocast
            return loss_parts(loss_fn(out) if target is None else loss_fn(out, target)).loss

    def forward_backward() -> None:
        loss = forward()
        if inputs:
            torch.autograd.grad(loss, inputs, allow_unused=True)

    own = {storage_key(x) for x in inputs}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if storage_key(t) not in own:
            kept[storage_key(t)] = storage_bytes(t)
        return t

    try:
        with torch.enable_grad():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = forward()
            if loss.requires_grad:
                for _ in range(timer.warmup):
                    forward_backward()
                samples = _Alternating((forward, forward_backward), timer)
                samples.take(timer.repeats)
                f, fb = samples.medians()
            else:
                f = fb = timer.per_call(lambda n: [forward] * n)
    except Exception as err:
        how = "loss_fn(output)" if target is None else "loss_fn(output, target)"
        log.warning("the loss is not costed: %s failed on the example output (%s: %s); pass the "
                    "micro-batch's target if it needs one", how, type(err).__name__, err)
        return None
    return NodeCost(forward_time=f, input_grad_time=max(fb - f, 0.0), weight_grad_time=0.0,
                    saved_bytes=sum(kept.values()))


def _resolve_device(traced: TracedGraph, device: str | torch.device | None) -> torch.device:
    if device is None:
        first = next(iter(traced.graph_module.parameters()), None)
        return first.device if first is not None else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device: expected a torch device such as 'cpu' or 'cuda:0', found {device!r} ({err})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ProfileError(
                f"device {str(dev)!r} requested but CUDA is not available in this torch "
                f"({torch.__version__}); profile on 'cpu' or plan with an analytic cost model "
                "(pipec.load_cost_model('h100-sxm'))"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _device_info(dev: torch.device) -> tuple[str, int | None]:
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return str(props.name), int(props.total_memory)
    try:
        import os

        memory: int | None = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        memory = None
    return platform.processor() or platform.machine() or "cpu", memory


def profile(
    traced: TracedGraph,
    *,
    device: str | torch.device | None = None,
    repeats: int = 5,
    warmup: int = 2,
    progress: bool | None = None,
    loss_fn: Callable[..., Any] | None = None,
    target: Any = None,
    precision: str = "fp32",
) -> Profile:
    """Measure every node of ``traced`` on ``device`` (default: where its parameters are).

    ``progress``: a transient progress bar on stderr -- ``None`` shows it on a
    terminal once profiling takes more than a couple of seconds.

    ``loss_fn`` (with ``target``, one micro-batch like the example inputs; without,
    ``loss_fn(output)`` is called, as the runtime does) is timed too, forward and
    backward, on the model's output: it runs in the last stage but is not in the
    traced graph (cross-entropy over a large vocabulary costs as much as a few
    layers). A loss that fails on the example output is logged and left out.

    ``precision`` ("fp32", "bf16", "fp16"): every node, and the whole model, runs
    under ``torch.autocast`` in that dtype, as the stages of a plan of that
    precision do (:mod:`pipec.costs.precision`); the loss outside it, on the output
    cast to float32. A precision the device cannot compute in is a PrecisionError.
    """
    if not isinstance(traced, TracedGraph):
        raise ConfigError(f"traced: expected a pipec.TracedGraph (from pipec.trace), found {type(traced).__name__}")
    for what, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(
                f"{what}: expected a whole number >= {low}, found {value!r}; "
                f"pass e.g. {what}={5 if what == 'repeats' else 2}"
            )
    dev = _resolve_device(traced, device)
    precision = check_precision(precision)
    check_device_precision(dev, precision)
    gm = traced.graph_module
    home = next(iter(gm.parameters()), torch.empty(0)).device
    if dev.type == "cpu":
        settle_host_allocator()  # as a training process's heap is (see its docstring)
    timer = Timer(dev, repeats, warmup)
    costs: dict[str, NodeCost] = {}
    compute = [n for n in traced.nodes if n.op not in FREE_OPS]
    with progress_bar(f"profiling {traced.model_name}", total=len(compute), enabled=progress) as advance:

        def visit(run: NodeRun) -> None:
            try:
                costs[run.node.name] = _measure_node(run, timer)
            except Exception as err:
                raise NodeFailure(run.node, err) from err
            advance()

        try:
            # timing runs the graph many times in the model's mode: keep its batch-norm
            # statistics, RNG state and modes as they were (the plan saves these buffers)
            with preserved(gm), _grads_set_aside(gm), _moved(gm, home, dev), _grads_set_aside(gm), \
                    autocast(dev, precision):
                inputs = tuple(x.to(dev) if isinstance(x, torch.Tensor) else x for x in traced.example_inputs)
                whole = _whole_model(traced, inputs)
                try:
                    for _ in range(max(1, warmup)):  # warms the device up: clocks, allocator, autotuner
                        whole[1]()
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as err:
                    raise ProfileError(
                        f"{traced.model_name} failed on {dev} with its example inputs: "
                        f"{type(err).__name__}: {err}; check that it runs there"
                    ) from err
                whole_samples = _Alternating(whole, timer)
                whole_samples.take(repeats // 2)
                saved = walk(traced, visit, device=dev)
                whole_samples.take(repeats - repeats // 2)
                forward_time, forward_backward_time = whole_samples.medians()
                loss_cost = None if loss_fn is None else _measure_loss(
                    traced.unflatten_output(whole[0]()), loss_fn, target, dev, timer)
        except NodeFailure as failure:
            raise _node_error(failure.node, dev, failure.error) from failure.error
        except torch.cuda.OutOfMemoryError as err:
            raise ProfileError(
                f"out of memory on {dev} while profiling {traced.model_name}: {err}; "
                "profile with a smaller micro-batch (the example inputs) or on a larger device"
            ) from None
    name, memory = _device_info(dev)
    nodes = {}
    for info in traced.nodes:
        cost = costs.get(info.name, NodeCost(forward_time=0.0, input_grad_time=0.0, weight_grad_time=0.0))
        nodes[info.name] = cost.model_copy(update={
            "saved_bytes": saved.get(info.name, 0),
            "output_bytes": info.output_bytes,
            "param_bytes": info.param_bytes,
        })
    result = Profile(
        model_name=traced.model_name, device=str(dev), device_name=name,
        torch_version=torch.__version__, num_threads=torch.get_num_threads(), repeats=repeats,
        warmup=warmup, memory_capacity=memory, forward_time=forward_time,
        forward_backward_time=forward_backward_time, nodes=nodes, loss=loss_cost, precision=precision,
    )
    log.info("profiled %s on %s: %d nodes, sum %.3g s vs whole model %.3g s (fwd+bwd)",
             traced.model_name, dev, len(nodes), result.node_time, forward_backward_time)
    return result


@contextmanager
def _moved(gm: torch.fx.GraphModule, home: torch.device, dev: torch.device) -> Iterator[None]:
    """Move the graph module to ``dev`` for the duration, and back.

    Besides parameters and buffers, a graph captured by torch.export bakes the
    capture device into factory calls (``arange(..., device=cpu)``); those
    arguments are retargeted too, and restored afterwards.
    """
    if dev == home:
        yield
        return
    changed = []

    def swap(value: Any) -> Any:
        return dev if isinstance(value, torch.device) and value == home else value

    for node in gm.graph.nodes:
        args = torch.fx.node.map_aggregate(node.args, swap)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
        if args != node.args or kwargs != node.kwargs:
            changed.append((node, node.args, node.kwargs))
            node.args, node.kwargs = args, kwargs
    if changed:
        gm.recompile()
    gm.to(dev)
    try:
        yield
    finally:
        gm.to(home)
        for node, args, kwargs in changed:
            node.args, node.kwargs = args, kwargs
        if changed:
            gm.recompile()


def _node_error(node: torch.fx.Node, dev: torch.device, err: BaseException) -> ProfileError:
    if isinstance(err, ProfileError):
        return err
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return ProfileError(
        f"node {node.name!r} ({node.op} {node.target}) failed on {dev} while profiling: "
        f"{type(err).__name__}: {first}. Check that the model runs on {dev} with the example inputs, "
        "or mark the submodule as a leaf (pipec.trace(..., leaf_modules=[...]))"
    )


__all__ = ["Profile", "profile", "split_backward"]
