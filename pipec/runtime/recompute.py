"""A stage forward under an activation-recompute policy, and its replay at backward.

Phase: stage runtime. Policies (:mod:`pipec.costs.recompute`): ``full`` runs the
stage's forward without autograd, keeping only its inputs (and outputs, which
are sent on); ``selective`` does the same but also keeps the outputs of
matmul-like ATen ops (``torch.utils.checkpoint``'s
``create_selective_checkpoint_contexts`` with :func:`policy`). The backward
action (``B``, or ``I`` under the zero-bubble split) first replays the forward
with autograd on -- once: the replayed graph then serves ``I`` and ``W`` alike,
which ``torch.utils.checkpoint``'s lazy recompute cannot do (it reruns the
forward for every autograd call, and refuses a second backward through a
selective region).

The replay reproduces the forward bit for bit: the same inputs; pipec's own
seeded random nodes draw from ``(seed, step, micro-batch, node)`` (the executor
opens the same :func:`~pipec.split.randomness.random_scope` around both), and
the global CPU/CUDA generator states are put back to those of the first run for
anything else random, then restored; the replay runs on copies of the buffers
(BatchNorm's running statistics), so they are updated once per micro-batch, as
without recompute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_aten = torch.ops.aten
# outputs kept by ``selective``: the ATen ops matmul-like fx nodes lower to
SAVED_OPS = frozenset(
    getattr(_aten, name) for name in (
        "mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "convolution", "_convolution",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    ) if hasattr(_aten, name)
)


def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective recompute: keep matmul-like outputs, recompute the rest."""
    del ctx, args, kwargs
    packet = getattr(op, "overloadpacket", op)
    return CheckpointPolicy.MUST_SAVE if packet in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@dataclass
class Replay:
    """What a recomputing forward keeps to replay itself at backward."""

    values: list[Any]  # the stage's inputs, the very objects (leaves keep their .grad)
    cpu_rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    cuda_device: torch.device | None
    recompute_context: contextlib.AbstractContextManager[Any] | None  # selective: serves the kept outputs


def _cuda_device(values: Sequence[Any], module: nn.Module) -> torch.device | None:
    for v in (*values, *module.parameters()):
        if isinstance(v, torch.Tensor) and v.device.type == "cuda":
            return v.device
    return None


def forward_kept(module: nn.Module, values: list[Any], mode: str) -> tuple[Any, Replay]:
    """Run ``module(*values)`` without autograd under ``mode`` (``full`` | ``selective``)."""
    device = _cuda_device(values, module)
    replay = Replay(values, torch.get_rng_state(),
                    torch.cuda.get_rng_state(device) if device is not None else None, device, None)
    context: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if mode == "selective":
        forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(policy)  # type: ignore[no-untyped-call]
        context = forward_ctx
        replay.recompute_context = recompute_ctx
    with torch.no_grad(), context:
        result = module(*values)
    return result, replay


@contextlib.contextmanager
def _rng_as(replay: Replay) -> Iterator[None]:
    device = replay.cuda_device
    with torch.random.fork_rng(devices=[] if device is None else [device]):
        torch.set_rng_state(replay.cpu_rng)
        if replay.cuda_rng is not None and device is not None:
            torch.cuda.set_rng_state(replay.cuda_rng, device)
        yield


def replay_forward(module: nn.Module, replay: Replay) -> Any:
    """``module(*values)`` again, with autograd, as the first run drew and computed it.

    The replay runs on copies of the buffers, which are put back afterwards: a forward
    that updates them in place (BatchNorm's running statistics) updates them once, as
    without recompute; copying the old values back in place instead would change the
    version of tensors the replayed graph saved (BatchNorm's backward reads them)."""
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                swapped.append((sub, name, buf))
                sub._buffers[name] = buf.detach().clone()
    context = replay.recompute_context if replay.recompute_context is not None else contextlib.nullcontext()
    try:
        with _rng_as(replay), torch.enable_grad(), context:
            return module(*replay.values)
    finally:
        for sub, name, buf in swapped:
            sub._buffers[name] = buf


__all__ = ["SAVED_OPS", "Replay", "forward_kept", "policy", "replay_forward"]
