"""Point-to-point and all-reduce latency and bandwidth between two local processes.

Phase: calibration (called by :func:`pipec.runtime.calibrate.calibrate`); it
lives in ``pipec/runtime/`` because only the runtime imports
``torch.distributed``.

Input: a backend (``"gloo"`` on CPU, ``"nccl"`` between two local GPUs) and
message sizes. Two processes are spawned on 127.0.0.1; rank 0 and rank 1
ping-pong a buffer of each size ``iters`` times, and the one-way time is half
a round trip (the method of the OSU and nccl-tests point-to-point latency
benchmarks). Then both all-reduce (sum) the largest buffer, as float32,
``iters`` times: the tied-gradient exchange the runtime does once per step.
Output: :class:`P2PResult` -- latency (one-way time of the smallest message)
and bandwidth (largest message's bytes over its one-way time net of the
latency), the alpha-beta link model; and the all-reduce's *bus bandwidth*
(nccl-tests' definition: ``2 (n - 1) / n * bytes / time``, which is ``bytes /
time`` for two ranks, net of the two latencies of a two-step ring), the figure
a link must reach for a ring all-reduce to take that long. NCCL's all-reduce
runs near the link's bandwidth; Gloo's over loopback, which also copies and
sums on the CPU, well below it (0.4 of it on a 2-vCPU VM).

Every wait is bounded: the process group has a timeout, the parent waits at
most ``timeout`` seconds for a result, then kills what is left.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipec.errors import ProfileError
from pipec.runtime.gloo_io import calm_gloo_io_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class P2PResult:
    backend: str
    latency: float  # seconds, one way, smallest message
    bandwidth: float  # bytes/s, one way, largest message
    one_way_time: dict[int, float]  # message bytes -> seconds
    allreduce_bandwidth: float | None = None  # bytes/s, bus bandwidth of a two-rank all-reduce
    allreduce_time: float | None = None  # seconds, one all-reduce of allreduce_bytes
    allreduce_bytes: int = 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_two_ranks(worker: Callable[..., None], args: tuple[Any, ...], timeout: float) -> tuple[str, Any]:
    """Run ``worker(rank, port, *args, results)`` in two spawned local processes (a free
    port on 127.0.0.1 for their rendezvous) and return the first ``(status, payload)``
    one puts on ``results`` -- ``("error", why)`` when none does within ``timeout``
    seconds. Both processes are gone when it returns (joined, or killed)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, *args, results), daemon=True) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        status, payload = results.get(timeout=timeout)
    except queue.Empty:
        status, payload = "error", f"no result within {timeout:.0f} s"
    finally:
        for p in procs:
            p.join(timeout=5.0)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        results.close()
    return status, payload


def _worker(rank: int, port: int, backend: str, sizes: tuple[int, ...], iters: int,
            timeout: float, results: Any) -> None:
    try:
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2, timeout=timedelta(seconds=timeout))
        if backend == "gloo":
            calm_gloo_io_threads()  # as the runtime runs Gloo (pipec.runtime.gloo_io)
        peer = 1 - rank
        times: dict[int, float] = {}
        for size in sizes:
            buf = torch.zeros(size, dtype=torch.uint8, device=device)

            def ping_pong(buf: torch.Tensor = buf) -> None:
                if rank == 0:
                    dist.send(buf, peer)
                    dist.recv(buf, peer)
                else:
                    dist.recv(buf, peer)
                    dist.send(buf, peer)

            for _ in range(2):
                ping_pong()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                ping_pong()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[size] = (time.perf_counter() - start) / (2 * iters)
        # the largest buffer as float32 (rounded down to whole floats), summed across both
        grad = torch.ones(max(1, sizes[-1] // 4), dtype=torch.float32, device=device)
        for _ in range(2):
            dist.all_reduce(grad)
        samples = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(grad)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - start)
        allreduce = (grad.numel() * 4, sorted(samples)[len(samples) // 2])
        if rank == 0:
            results.put(("ok", (times, allreduce)))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as err:  # reported to the parent, which raises ProfileError
        results.put(("error", f"rank {rank}: {type(err).__name__}: {err}"))


def measure_p2p(
    *,
    backend: str = "gloo",
    sizes: tuple[int, ...] = (4, 1 << 20, 32 << 20),
    iters: int = 10,
    timeout: float = 60.0,
) -> P2PResult:
    """Ping-pong between two spawned processes; see the module docstring."""
    if backend not in ("gloo", "nccl"):
        raise ProfileError(f"backend: expected 'gloo' or 'nccl', found {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < 2:
        raise ProfileError(
            f"backend 'nccl' needs two local GPUs, found {torch.cuda.device_count()}; use backend='gloo'"
        )
    sizes = tuple(sorted(set(sizes)))
    status, payload = run_two_ranks(_worker, (backend, sizes, iters, timeout), timeout)
    if status != "ok":
        raise ProfileError(
            f"point-to-point measurement with {backend} on 127.0.0.1 failed: {payload}; "
            "check that two local processes can open TCP ports (firewall), "
            "or set GLOO_SOCKET_IFNAME=lo for gloo"
        )
    times: dict[int, float] = payload[0]
    reduce_bytes, reduce_time = payload[1]
    latency = times[sizes[0]]
    largest = sizes[-1]
    bandwidth = largest / max(times[largest] - latency, times[largest] * 1e-3)
    # two ranks: a two-step ring, each step half the bytes; bus bandwidth = bytes / time
    allreduce_bandwidth = reduce_bytes / max(reduce_time - 2 * latency, reduce_time * 1e-3)
    log.info("%s p2p: latency %.3g s, bandwidth %.3g B/s; all-reduce of %d bytes %.3g s (bus bandwidth %.3g B/s)",
             backend, latency, bandwidth, reduce_bytes, reduce_time, allreduce_bandwidth)
    return P2PResult(backend=backend, latency=latency, bandwidth=bandwidth, one_way_time=times,
                     allreduce_bandwidth=allreduce_bandwidth, allreduce_time=reduce_time,
                     allreduce_bytes=reduce_bytes)


__all__ = ["P2PResult", "measure_p2p"]
