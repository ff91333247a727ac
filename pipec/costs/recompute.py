"""Activation recompute: the policies, and what each costs per node.

Phase: cost model (read by the partitioner and the stage runtime). Input: the
traced graph's nodes and their :class:`~pipec.types.NodeCost`. Output: per
node, the bytes a policy keeps per micro-batch in flight and the seconds it
adds by recomputing.

Policies (one per stage, :attr:`pipec.plan.StageInfo.recompute`):

- ``none``: autograd keeps every saved activation (``NodeCost.saved_bytes``)
  of each micro-batch in flight.
- ``full``: the stage forward runs without autograd and keeps only its inputs
  (and outputs, which the boundary buffers already count); its backward first
  runs the forward again (``forward_time`` of every node) to rebuild the graph.
- ``selective``: as ``full``, but the outputs of matmul-like nodes (``mm``,
  ``addmm``, ``bmm``, ``linear``, convolutions, ``scaled_dot_product_attention``
  ...) are kept and not recomputed (``torch.utils.checkpoint``'s
  selective-checkpoint contexts with a policy, Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", section 4.3): the
  expensive FLOPs are not paid twice, the cheap element-wise rest is.

While a recomputing stage runs one micro-batch's backward, that micro-batch's
activations are all alive again (``saved_bytes``), on top of what the other
micro-batches in flight keep.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from torch import fx

from pipec.errors import ConfigError
from pipec.types import NodeInfo, TracedGraph

MODES = ("none", "selective", "full")  # per stage; also the order "fastest first"
AUTO = "auto"
REQUESTS = (AUTO, *MODES)

# last component of a call_function / call_method target (fx or aten) that does matmul work
_MATMUL_FUNCTIONS = frozenset({
    "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv", "mv", "einsum", "bilinear",
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "multi_head_attention_forward", "__matmul__",
})
_MATMUL_MODULES = frozenset({
    "Linear", "LazyLinear", "Bilinear", "NonDynamicallyQuantizableLinear", "Conv1d", "Conv2d", "Conv3d",
    "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Conv1D", "MultiheadAttention",
})


def check_request(recompute: object) -> str:
    """``recompute`` as given to :func:`pipec.partition`, or a ConfigError naming the choices."""
    if not isinstance(recompute, str) or recompute not in REQUESTS:
        raise ConfigError(
            f"recompute: expected one of {', '.join(repr(r) for r in REQUESTS)}, found {recompute!r}; "
            "'none' keeps every activation, 'full' / 'selective' recompute on every stage, "
            "'auto' lets the partitioner choose per stage under the memory limit"
        )
    return recompute


def options_of(recompute: str) -> tuple[str, ...]:
    """The per-stage policies the search may choose for a request (``auto``: all three)."""
    return MODES if check_request(recompute) == AUTO else (recompute,)


def _last_name(target: str) -> str:
    parts = [p for p in target.split(".") if p not in ("default", "Tensor", "int", "input")]
    return parts[-1] if parts else target


def is_matmul(info: NodeInfo, graph_module: fx.GraphModule | None = None) -> bool:
    """Whether ``info`` does matmul-like work (selective recompute keeps its output)."""
    if info.op in ("call_function", "call_method"):
        return _last_name(info.target) in _MATMUL_FUNCTIONS
    if info.op == "call_module" and graph_module is not None:
        try:
            module = graph_module.get_submodule(info.target)
        except AttributeError:
            return False
        return type(module).__name__ in _MATMUL_MODULES
    return False


def matmul_flags(traced: TracedGraph, names: Sequence[str]) -> tuple[bool, ...]:
    """:func:`is_matmul` for each of ``names`` (nodes of ``traced``)."""
    infos = {n.name: n for n in traced.nodes}
    return tuple(is_matmul(infos[n], traced.graph_module) for n in names)


def node_costs(policy: str, saved_bytes: npt.NDArray[np.int64], output_bytes: npt.NDArray[np.int64],
               forward_time: npt.NDArray[np.float64], matmul: npt.NDArray[np.bool_],
               ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Per node under ``policy``: the bytes it keeps per micro-batch in flight, and the
    seconds recomputing it adds per micro-batch (the one definition the partitioner's
    tables, :mod:`pipec.partitioner.liveness`, are built from).

    ``none`` keeps the saved activations and adds nothing; ``selective`` keeps the
    output of a matmul-like node and recomputes the forward of the others; ``full``
    keeps nothing and recomputes every forward. The bytes a policy saves are
    ``saved_bytes - kept``."""
    if policy == "none":
        return saved_bytes.astype(np.int64), np.zeros(len(saved_bytes))
    if policy == "selective":
        return (np.where(matmul, output_bytes, 0).astype(np.int64),
                np.where(matmul, 0.0, forward_time).astype(np.float64))
    if policy == "full":
        return np.zeros(len(saved_bytes), dtype=np.int64), forward_time.astype(np.float64)
    raise ConfigError(f"recompute policy: expected one of {', '.join(MODES)}, found {policy!r}")


__all__ = [
    "AUTO",
    "MODES",
    "REQUESTS",
    "check_request",
    "is_matmul",
    "matmul_flags",
    "node_costs",
    "options_of",
]
