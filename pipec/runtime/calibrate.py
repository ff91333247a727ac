"""Measure this machine and write a hardware file for ``cost_models/``.

Phase: cost model (calibration; ``pipec calibrate -o cost_models/NAME.json``).
It lives in ``pipec/runtime/`` because it measures the link between two
processes over ``torch.distributed``; the kernel figures come from
:mod:`pipec.costs.kernels`.

Input: where to write, and how hard to measure (``quick`` uses tiny sizes:
seconds, for tests). Output: the :class:`~pipec.costs.hardware.HardwareSpec`
written (atomically: a temporary file, then a rename).

What is measured, on the first GPU if there is one, else on the CPU:

- peak FLOP/s per dtype: square ``torch.matmul`` (2 n^3 FLOPs each), median
  over repeats; on CUDA fp32 with TF32 off and ``tf32`` with it on;
- memory bandwidth: a large tensor copy (bytes read + written);
- kernel launch overhead: a one-element in-place add, many back to back;
- the link: ping-pong between two local processes on 127.0.0.1
  (:mod:`pipec.runtime.p2p_bench`; NCCL with two GPUs, else Gloo), and an
  all-reduce of the largest message between the same two (its bus
  bandwidth: the tied-gradient exchange once per step). There is
  no second node to measure, so the inter-node figures repeat the local ones;
- the runtime's own overhead per action kind (F, B, I, W, SEND, RECV) and per
  step: :class:`~pipec.runtime.runtime.PipelineRuntime` on a tiny two-stage
  model over the same backend (:mod:`pipec.runtime.overhead_bench`), which
  the simulator adds to every action (``runtime_overhead``).

The figures are what kernels achieve, so both efficiency factors are 1.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipec.costs.hardware import HardwareSpec, spec_from_dict
from pipec.costs.kernels import (
    CPU_DTYPES,
    CUDA_DTYPES,
    copy_bandwidth,
    launch_overhead,
    matmul_flops,
)
from pipec.costs.timer import progress_bar
from pipec.errors import ConfigError, ProfileError
from pipec.runtime.overhead_bench import measure_overhead
from pipec.runtime.p2p_bench import measure_p2p

log = logging.getLogger(__name__)

def _memory_capacity(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def calibrate(
    output_path: str | Path,
    *,
    name: str | None = None,
    backend: str | None = None,
    quick: bool = False,
) -> HardwareSpec:
    """Measure this machine and write a hardware file to ``output_path``."""
    path = Path(output_path)
    if path.suffix != ".json":
        raise ConfigError(f"output_path: expected a .json file, found {str(path)!r}")
    if not path.parent.is_dir():
        raise ConfigError(f"output_path: folder {str(path.parent)!r} does not exist; create it first")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if backend is None:
        backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    device_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    n = (1024 if quick else 8192) if cuda else (128 if quick else 1024)
    copy_bytes = (64 << 20 if quick else 1 << 30) if cuda else (8 << 20 if quick else 256 << 20)
    repeats = 3 if quick else 5
    dtypes = CUDA_DTYPES if cuda else CPU_DTYPES

    peak_flops: dict[str, float] = {}
    with progress_bar("calibrating", total=len(dtypes) + 4, enabled=None) as advance:
        for key, dtype in dtypes.items():
            try:
                peak_flops[key] = matmul_flops(device, dtype, n, repeats, tf32=key == "tf32")
            except RuntimeError as err:  # a dtype this device cannot multiply
                log.info("no %s matmul on %s: %s", key, device, err)
            advance()
        bandwidth = copy_bandwidth(device, copy_bytes, repeats)
        advance()
        overhead = launch_overhead(device, 200 if quick else 2000)
        advance()
        sizes = (4, 1 << 20) if quick else (4, 1 << 20, 32 << 20)
        link = measure_p2p(backend=backend, sizes=sizes, iters=5 if quick else 20,
                           timeout=60.0 if quick else 120.0)
        advance()
        runtime = measure_overhead(backend=backend, steps=5 if quick else 30, timeout=120.0 if quick else 300.0)
        advance()
    if not peak_flops:
        raise ProfileError(f"no matmul ran on {device}; check the torch installation")

    stamp = (f"measured by pipec calibrate{' --quick' if quick else ''} on {device_name} "
             f"({device}), torch {torch.__version__}, {datetime.date.today().isoformat()}")
    data: dict[str, Any] = {
        "name": name or path.stem,
        "description": f"This machine as measured by pipec calibrate: {device_name}, {backend} point-to-point.",
        "peak_flops": peak_flops,
        "memory_bandwidth": bandwidth,
        "memory_capacity": _memory_capacity(device),
        "gpus_per_node": max(1, torch.cuda.device_count() if cuda else (os.cpu_count() or 1)),
        "intra_node_bandwidth": link.bandwidth,
        "intra_node_latency": link.latency,
        "inter_node_bandwidth": link.bandwidth,
        "inter_node_latency": link.latency,
        "kernel_launch_overhead": overhead,
        "allreduce_bandwidth": link.allreduce_bandwidth,
        "runtime_overhead": runtime.model_dump(),
        "source": {
            "peak_flops": f"{stamp}: median FLOP/s of {n}x{n}x{n} torch.matmul",
            "memory_bandwidth": f"{stamp}: copy of {copy_bytes} bytes, bytes read + written",
            "memory_capacity": f"{stamp}: {'torch.cuda total_memory' if cuda else 'physical memory (sysconf)'}",
            "gpus_per_node": f"{stamp}: {'CUDA devices' if cuda else 'CPU cores'} on this machine",
            "intra_node_bandwidth": f"{stamp}: {backend} ping-pong between two processes, largest message",
            "intra_node_latency": f"{stamp}: {backend} ping-pong, one-way time of a 4-byte message",
            "inter_node_bandwidth": "not measured (one machine): copied from intra_node_bandwidth",
            "inter_node_latency": "not measured (one machine): copied from intra_node_latency",
            "kernel_launch_overhead": f"{stamp}: one-element in-place add, back to back",
            "allreduce_bandwidth": f"{stamp}: {backend} all-reduce (sum) of {link.allreduce_bytes} bytes of "
                                   "float32 between two processes, bus bandwidth (bytes / time for two ranks)",
            "runtime_overhead": f"{stamp}: PipelineRuntime on a tiny two-stage model, {backend}, 1f1b and "
                                "zb-h1, 8 micro-batches: per action kind the median span less the profiled "
                                "compute; RECV the lower quartile (no waiting) plus posting; step: before the "
                                "first action and after the last",
            "compute_efficiency": "1: the peak figures are achieved (measured) rates",
            "memory_efficiency": "1: the bandwidth figure is an achieved (measured) rate",
        },
    }
    spec = spec_from_dict(data, where="measured by calibrate")
    _write_atomically(path, json.dumps(spec.model_dump(mode="json"), indent=2) + "\n")
    log.info("wrote %s", path)
    return spec


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["calibrate"]
