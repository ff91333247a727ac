"""An analytic cost model: a per-kernel roofline over a hardware description.

Phase: cost model (planner side). Plans an 8xH100 pipeline from a laptop:
nothing runs on the target device, nothing needs a GPU.

Input: a :class:`~pipec.costs.hardware.HardwareSpec` and a traced graph.
Output: a :class:`~pipec.types.NodeCost` per node.

Method (the roofline model, Williams, Waterman & Patterson, "Roofline: an
insightful visual performance model", CACM 52(4), 2009): the graph is run on
*fake* tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no
data, no compute), node by node (:func:`pipec.costs.node_exec.walk`). A
``TorchDispatchMode`` sees every aten kernel the node's forward launches, and
every kernel of two backward passes -- ``torch.autograd.grad`` w.r.t. the
node's inputs (I) and w.r.t. its parameters (W) -- so backward FLOPs are
counted, not guessed. Per kernel::

    time = max(flops / (peak_flops[dtype] * compute_efficiency),
               bytes / (memory_bandwidth * memory_efficiency)) + kernel_launch_overhead

FLOPs come from ``torch.utils.flop_counter``'s formulas (matmul, conv,
attention; other kernels count 0 FLOPs and are bandwidth-bound). Bytes are the
kernel's tensor inputs plus outputs (an expanded input counts its storage; a
gather such as ``embedding`` reads only the rows it outputs). View kernels
(``view``, ``t``, ``expand``...) move nothing and launch nothing: they cost 0.
The peak's dtype is the kernel's output dtype (fp32, bf16, ...) unless
``dtype=`` names one for every floating kernel (e.g. ``"tf32"``). Bytes are as
traced. With ``precision="bf16"``/``"fp16"`` (what ``pipec.partition(...,
precision=)`` plans) the graph is counted under CPU ``torch.autocast`` in that
dtype, so the kernels the runtime's autocast runs in it (matmuls, convolutions,
their backward) are priced at its peak and move its bytes, the casts autocast
adds are counted as the memory-bound kernels they are, and what autocast keeps
in float32 stays at the fp32 peak. (CPU autocast's op lists stand in for the
target's: they agree on the matmul-like ops, which dominate; CUDA keeps a few
more ops -- softmax, norms -- in float32.)

``saved_bytes`` uses the same saved-tensor hooks as the profiler, on fake
tensors. A model built on the meta device (``with torch.device("meta"):``, so
a 7B model plans on a laptop without its 28 GB) is counted as fake CPU
tensors, so each op is counted as the fused kernel a device runs rather than
meta's reference decomposition. If a node cannot run on fake tensors (data-dependent shapes), the
whole graph is counted on its real example inputs on the CPU instead.

Repeated layers repeat nodes: on fake tensors, an aten op (or a tensor method,
or an ``operator`` function) called with the same non-tensor arguments and
tensors of the same metadata (shape, strides, offset, storage size, dtype,
device, whether it needs a gradient, whether it is a parameter, which
arguments are the same tensor) launches the same kernels, forward and
backward. Such a node is counted once and its tallies reused
(:func:`count_key`); a node that mutates an input, a ``call_module`` node and
any other Python function are always counted.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipec.costs.hardware import DTYPE_NAMES, HardwareSpec, load_hardware, spec_from_dict
from pipec.costs.node_exec import (
    NodeFailure,
    NodeRun,
    backward_targets,
    storage_bytes,
    tensors_in,
    walk,
)
from pipec.costs.precision import autocast
from pipec.errors import CostModelError
from pipec.types import NodeCost, RuntimeOverhead, TracedGraph, check_precision

log = logging.getLogger(__name__)

aten = torch.ops.aten
_NO_KERNEL = {
    aten.detach, aten.alias, aten.empty, aten.empty_like, aten.empty_strided,
    aten._unsafe_view, aten._reshape_alias, aten.lift_fresh, aten._assert_tensor_metadata,
}
# gathers read only the rows they output from their first argument
_GATHERS = {aten.embedding, aten.index_select, aten.gather, aten.index}
_PEAK_KEY = {
    torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16",
    torch.float16: "fp16", torch.float8_e4m3fn: "fp8", torch.float8_e5m2: "fp8",
}


def _flop_registry() -> dict[Any, Any]:
    from torch.utils import flop_counter

    registry = dict(getattr(flop_counter, "flop_registry", {}))
    # The CPU flash-attention kernels do the same work as the CUDA ones.
    for cpu_name, cuda_op in (
        ("_scaled_dot_product_flash_attention_for_cpu", aten._scaled_dot_product_flash_attention),
        ("_scaled_dot_product_flash_attention_for_cpu_backward",
         aten._scaled_dot_product_flash_attention_backward),
    ):
        if hasattr(aten, cpu_name) and cuda_op in registry:
            registry.setdefault(getattr(aten, cpu_name), registry[cuda_op])
    return registry


def _nbytes(t: torch.Tensor) -> int:
    logical = t.numel() * t.element_size()
    try:
        return min(logical, int(t.untyped_storage().nbytes()))
    except (RuntimeError, NotImplementedError):
        return int(logical)


@dataclass
class Tally:
    """What one pass over a node launches: kernels, FLOPs, bytes and roofline time."""

    kernels: int = 0
    flops: float = 0.0
    num_bytes: int = 0
    time: float = 0.0


@dataclass
class NodeCount:
    forward: Tally = field(default_factory=Tally)
    input_grad: Tally = field(default_factory=Tally)
    weight_grad: Tally = field(default_factory=Tally)

    def copy(self) -> NodeCount:
        return NodeCount(replace(self.forward), replace(self.input_grad), replace(self.weight_grad))


class _NotAKey(Exception):
    """An argument whose effect on the kernels :func:`count_key` cannot vouch for."""


_PLAIN = (bool, int, float, complex, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def count_key(run: NodeRun) -> Hashable | None:
    """What decides the kernels a node launches on fake tensors, forward and both
    backwards; None for a node whose count must not be shared (see the module docstring)."""
    node = run.node
    target = node.target
    op: Hashable
    if run.mutates or node.op not in ("call_function", "call_method"):
        return None
    if node.op == "call_method":
        op = ("method", str(target))
    elif isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) or (
        callable(target) and getattr(operator, getattr(target, "__name__", ""), None) is target
    ):
        op = target
    else:
        return None
    params = {id(t) for t in run.params}
    leaves = {id(t) for t in run.input_leaves}
    first_seen: dict[int, int] = {}  # the same tensor passed twice sums two gradients

    def describe(x: Any) -> Hashable:
        if isinstance(x, torch.Tensor):
            if x.layout != torch.strided:
                raise _NotAKey
            role = 0 if id(x) in params else 1 if id(x) in leaves else 2
            return ("tensor", tuple(x.shape), tuple(x.stride()), x.storage_offset(), storage_bytes(x),
                    x.dtype, x.device, x.requires_grad, role, first_seen.setdefault(id(x), len(first_seen)))
        if isinstance(x, (tuple, list)):
            return (type(x).__name__, tuple(describe(v) for v in x))
        if isinstance(x, dict):
            return ("dict", tuple((k, describe(v)) for k, v in x.items()))
        if x is None or type(x) in _PLAIN:
            return (type(x).__name__, x)
        raise _NotAKey

    try:
        return (op, describe(run.args), describe(run.kwargs))
    except (_NotAKey, RuntimeError, TypeError):
        return None


class _KernelCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self, model: AnalyticCostModel, tally: Tally) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.model = model
        self.tally = tally

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        outputs = tensors_in(out)
        if not outputs or packet in _NO_KERNEL or func.is_view:
            return out
        formula = self.model._flops.get(packet)
        flops = float(formula(*args, **kwargs, out_val=out)) if formula is not None else 0.0
        written = sum(_nbytes(t) for t in outputs)
        inputs = tensors_in((args, kwargs))
        if packet in _GATHERS and isinstance(args[0], torch.Tensor):
            read = written + sum(_nbytes(t) for t in inputs if t is not args[0])
        else:
            read = sum(_nbytes(t) for t in inputs)
        self.tally.kernels += 1
        self.tally.flops += flops
        self.tally.num_bytes += read + written
        self.tally.time += self.model.kernel_time(flops, read + written, outputs[0].dtype)
        return out


class AnalyticCostModel:
    """Roofline cost model of ``spec`` (see the module docstring for the rules).

    ``dtype``: a key of ``spec.peak_flops`` used for every floating kernel;
    default: each kernel's own dtype. ``precision``: count the graph under
    autocast in that precision's dtype (see the module docstring).
    """

    def __init__(self, spec: HardwareSpec, *, dtype: str | None = None, precision: str = "fp32") -> None:
        if not isinstance(spec, HardwareSpec):
            raise CostModelError(
                f"AnalyticCostModel: expected a HardwareSpec, found {type(spec).__name__}; "
                "use pipec.load_cost_model('h100-sxm') or load_hardware(path)"
            )
        if dtype is not None and dtype not in spec.peak_flops:
            raise CostModelError(
                f"dtype {dtype!r} has no peak in hardware {spec.name!r}, which lists "
                f"{sorted(spec.peak_flops)}; pick one of those (dtypes known: {sorted(DTYPE_NAMES)})"
            )
        self.spec = spec
        self.dtype = dtype
        self.precision = check_precision(precision)
        self._flops = _flop_registry()
        self._cache: tuple[TracedGraph, dict[str, NodeCount], dict[str, int]] | None = None

    @property
    def name(self) -> str:
        return (f"analytic:{self.spec.name}" + (f":{self.dtype}" if self.dtype else "")
                + (f"[{self.precision}]" if self.precision != "fp32" else ""))

    @property
    def memory_capacity(self) -> int | None:
        return self.spec.memory_capacity

    @property
    def runtime_overhead(self) -> RuntimeOverhead | None:
        """The runtime's own cost per action and step (the hardware file's; see
        :class:`~pipec.types.RuntimeOverhead`): the plan carries it, the simulator adds it."""
        return self.spec.runtime_overhead

    def __repr__(self) -> str:
        return f"AnalyticCostModel({self.spec.name!r}, dtype={self.dtype!r}, precision={self.precision!r})"

    def with_precision(self, precision: str) -> AnalyticCostModel:
        """The same hardware counted under ``precision`` (what :func:`pipec.partition` asks for)."""
        return AnalyticCostModel(self.spec, dtype=self.dtype, precision=precision)

    # -- roofline ------------------------------------------------------------
    def peak_key(self, dtype: torch.dtype) -> str:
        if self.dtype is not None and (dtype.is_floating_point or dtype.is_complex):
            return self.dtype
        key = _PEAK_KEY.get(dtype, "fp32")
        if key in self.spec.peak_flops:
            return key
        return "fp32" if "fp32" in self.spec.peak_flops else max(self.spec.peak_flops, key=self.spec.peak_flops.__getitem__)

    def kernel_time(self, flops: float, num_bytes: int, dtype: torch.dtype = torch.float32) -> float:
        """Roofline seconds of one kernel plus its launch overhead."""
        compute = flops / self.spec.peak(self.peak_key(dtype)) if flops else 0.0
        memory = num_bytes / self.spec.effective_memory_bandwidth
        return max(compute, memory) + self.spec.kernel_launch_overhead

    # -- counting ------------------------------------------------------------
    def count_call(self, fn: Callable[[], Any]) -> Tally:
        """Kernels, FLOPs, bytes and roofline time of whatever ``fn()`` launches."""
        tally = Tally()
        with _KernelCounter(self, tally):
            fn()
        return tally

    def count(self, traced: TracedGraph) -> dict[str, NodeCount]:
        """Kernels, FLOPs, bytes and time per compute node, for each pass."""
        return self._counted(traced)[0]

    def _counted(self, traced: TracedGraph) -> tuple[dict[str, NodeCount], dict[str, int]]:
        if self._cache is not None and self._cache[0] is traced:
            return self._cache[1], self._cache[2]
        try:
            counts, saved = self._walk(traced, fake=True)
        except NodeFailure as failure:
            log.info("node %s cannot run on fake tensors (%s); counting on real CPU tensors",
                     failure.node.name, failure.error)
            try:
                counts, saved = self._walk(traced, fake=False)
            except NodeFailure as again:
                raise CostModelError(
                    f"cannot count the cost of node {again.node.name!r} ({again.node.target}): "
                    f"{type(again.error).__name__}: {again.error}; check that the model runs on "
                    "its example inputs, or use a profiled cost model (pipec.profile)"
                ) from again.error
        self._cache = (traced, counts, saved)
        return counts, saved

    def _walk(self, traced: TracedGraph, *, fake: bool) -> tuple[dict[str, NodeCount], dict[str, int]]:
        counts: dict[str, NodeCount] = {}
        # only on fake tensors: on real ones a data-dependent op's kernels depend on the data
        same_as: dict[Hashable, NodeCount] = {}

        def visit(run: NodeRun) -> None:
            key = count_key(run) if fake else None
            if key is not None and key in same_as:
                counts[run.node.name] = same_as[key].copy()
                return
            count = NodeCount()
            try:
                with torch.enable_grad():
                    args, kwargs = run.fresh_args()
                    with _KernelCounter(self, count.forward):
                        output = run.call(args, kwargs)
                    del output
                    outs, grads = backward_targets(run.output)
                    for wrt, tally in ((run.input_leaves, count.input_grad), (run.params, count.weight_grad)):
                        if outs and wrt:
                            with _KernelCounter(self, tally):
                                torch.autograd.grad(outs, wrt, grads, retain_graph=True, allow_unused=True)
            except Exception as err:
                raise NodeFailure(run.node, err) from err
            counts[run.node.name] = count
            if key is not None:
                same_as[key] = count.copy()

        # the graph's tensors are on the CPU (real, or fake ones made from them): CPU autocast
        with autocast("cpu", self.precision):
            if not fake:
                return counts, walk(traced, visit, device=torch.device("cpu"))
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True)
            cpu = torch.device("cpu")

            def to_fake(t: torch.Tensor) -> torch.Tensor:
                if not t.is_meta:
                    return mode.from_tensor(t)
                # a model built on the meta device: count it as fake CPU tensors, so each op takes
                # the kernel a device would (meta has only reference kernels: attention, for one,
                # would be counted as its unfused math, S x S scores and all)
                fake = mode.fake_tensor_converter.from_meta_and_device(mode, t, cpu)
                return fake.requires_grad_(t.requires_grad) if fake.is_leaf else fake

            meta = any(t.is_meta for t in [*traced.graph_module.parameters(), *traced.graph_module.buffers()]) or any(
                isinstance(x, torch.Tensor) and x.is_meta for x in traced.example_inputs)
            with mode:
                saved = walk(traced, visit, to_fake=to_fake, meta_as=cpu if meta else None)
        return counts, saved

    # -- CostModel protocol ----------------------------------------------------
    def node_costs(self, traced: TracedGraph) -> dict[str, NodeCost]:
        counts, saved = self._counted(traced)
        result: dict[str, NodeCost] = {}
        for info in traced.nodes:
            count = counts.get(info.name, NodeCount())
            result[info.name] = NodeCost(
                forward_time=count.forward.time,
                input_grad_time=count.input_grad.time,
                weight_grad_time=count.weight_grad.time,
                saved_bytes=saved.get(info.name, 0),
                output_bytes=info.output_bytes,
                param_bytes=info.param_bytes,
            )
        return result

    def comm_time(self, num_bytes: int, src_rank: int, dst_rank: int) -> float:
        return link_time(self.spec, num_bytes, src_rank, dst_rank)

    def allreduce_time(self, num_bytes: int, ranks: Sequence[int]) -> float:
        """Seconds for an all-reduce of ``num_bytes`` among ``ranks`` (a ring; see
        :meth:`~pipec.costs.hardware.HardwareSpec.allreduce_time`)."""
        return self.spec.allreduce_time(num_bytes, ranks)


def link_time(spec: HardwareSpec, num_bytes: int, src_rank: int, dst_rank: int) -> float:
    """latency + bytes / bandwidth over the link between two ranks; 0 on the same rank."""
    _check_transfer(num_bytes, src_rank, dst_rank)
    return spec.link_time(num_bytes, src_rank, dst_rank)


def _check_transfer(num_bytes: int, src_rank: int, dst_rank: int) -> None:
    if num_bytes < 0 or src_rank < 0 or dst_rank < 0:
        raise CostModelError(
            f"comm_time: expected num_bytes >= 0 and ranks >= 0, found num_bytes={num_bytes}, "
            f"src_rank={src_rank}, dst_rank={dst_rank}"
        )



def load_cost_model(name_or_path: str | Path, **overrides: Any) -> AnalyticCostModel:
    """An analytic (roofline) cost model for a shipped or custom hardware file.

    ``overrides`` replace fields of the file (``memory_capacity="40GiB"``,
    ``gpus_per_node=4``, ...); ``dtype=`` (which peak to use) and ``precision=``
    (count under autocast) are passed to :class:`~pipec.costs.analytic.AnalyticCostModel`.
    """
    dtype = overrides.pop("dtype", None)
    precision = overrides.pop("precision", "fp32")
    spec = load_hardware(name_or_path)
    if overrides:
        unknown = sorted(set(overrides) - set(HardwareSpec.model_fields))
        if unknown:
            raise CostModelError(
                f"load_cost_model: unknown override(s) {unknown}; "
                f"valid ones are {sorted(HardwareSpec.model_fields)}, 'dtype' and 'precision'"
            )
        spec = spec_from_dict(
            {**spec.model_dump(), **overrides}, where=f"{spec.name!r} with overrides"
        )
    return AnalyticCostModel(spec, dtype=dtype, precision=precision)


__all__ = [
    "AnalyticCostModel",
    "NodeCount",
    "Tally",
    "count_key",
    "link_time",
    "load_cost_model",
]
