"""Real faults for the failure tests, injected through the operating system and
torch's public API -- never by replacing pipec's own functions."""

from __future__ import annotations

import contextlib
import resource
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist


@contextlib.contextmanager
def files_cannot_grow(*, kill: bool = False) -> Iterator[None]:
    """Inside, no file of this process can grow (``RLIMIT_FSIZE`` 0): a write fails
    with ``EFBIG`` "File too large", as one on a full disk fails -- or, with
    ``kill``, the kernel kills the process (``SIGXFSZ``, no core file) at its
    first write. Restored on exit."""
    fsize = resource.getrlimit(resource.RLIMIT_FSIZE)
    core = resource.getrlimit(resource.RLIMIT_CORE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_DFL if kill else signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_CORE, (0, core[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, fsize[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, fsize)
        resource.setrlimit(resource.RLIMIT_CORE, core)
        signal.signal(signal.SIGXFSZ, handler)


def fail_all_reduce(when: Callable[[], bool], fault: Callable[[], Any]) -> None:
    """From now on, ``torch.distributed.all_reduce`` in this process calls ``fault()``
    (which raises or kills) whenever ``when()`` holds: a collective that fails."""
    all_reduce = dist.all_reduce

    def failing(*args: Any, **kwargs: Any) -> Any:
        if when():
            fault()
        return all_reduce(*args, **kwargs)

    dist.all_reduce = failing
