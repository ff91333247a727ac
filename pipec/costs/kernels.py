"""Kernel micro-benchmarks: achieved matmul FLOP/s, copy bandwidth, launch overhead.

Phase: cost model (calibration, :func:`pipec.runtime.calibrate.calibrate`).
Input: a device and sizes. Output: seconds, FLOP/s or bytes/s -- the median
over repeats after one warm-up call, synchronising CUDA around each.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

CPU_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}
CUDA_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "tf32": torch.float32,
                "bf16": torch.bfloat16, "fp16": torch.float16}


def _seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int, *, tf32: bool = False) -> float:
    """Achieved FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        seconds = _seconds(lambda: torch.matmul(a, b), device, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2.0 * n**3 / max(seconds, 1e-9)


def copy_bandwidth(device: torch.device, num_bytes: int, repeats: int) -> float:
    """Bytes/s of a tensor copy, counting bytes read and bytes written."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _seconds(lambda: dst.copy_(src), device, repeats)
    return 2.0 * src.numel() * 4 / max(seconds, 1e-9)


def launch_overhead(device: torch.device, calls: int) -> float:
    """Seconds per back-to-back launch of a trivial kernel."""
    x = torch.zeros(1, device=device)

    def burst() -> None:
        for _ in range(calls):
            x.add_(1.0)

    return _seconds(burst, device, 3) / calls


__all__ = ["CPU_DTYPES", "CUDA_DTYPES", "copy_bandwidth", "launch_overhead", "matmul_flops"]
