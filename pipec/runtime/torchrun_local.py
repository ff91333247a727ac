"""torchrun whose rendezvous store listens on ``--master-addr`` only.

Phase: stage runtime (launcher). ``python -m torch.distributed.run`` creates
its c10d ``TCPStore`` server on ``--master-port`` of *every* interface: the
store ignores ``--master-addr`` for the socket it listens on, so anyone who
can reach the machine could talk to it. ``pipec run`` starts torchrun through
this module instead, which binds that socket itself, to ``--master-addr``
(127.0.0.1 by default), and hands it to the store (``master_listen_fd``),
then runs torchrun unchanged. It dies with its parent (``pipec run``):
:func:`pipec.runtime.parent_death.die_with_parent`. ``--master-port 0`` takes a port the kernel
chooses, bound at once (a port found free and bound later may be taken in
between). If the torch version lays torchrun out
differently, it warns and runs torchrun as is.

    python -m pipec.runtime.torchrun_local [torchrun arguments]
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


def _option(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def bind_store_socket(addr: str, port: int) -> socket.socket:
    """A listening TCP socket on ``addr:port`` (IPv4 or IPv6)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(1024)
    sock.set_inheritable(False)
    return sock


def _patch_static_rendezvous(sock: socket.socket) -> bool:
    try:
        from torch.distributed.elastic.rendezvous import static_tcp_rendezvous as rdzv
    except ImportError:
        return False
    original = getattr(rdzv, "TCPStore", None)
    if original is None:
        return False

    def store_on_socket(*args: Any, **kwargs: Any) -> Any:
        is_master = kwargs.get("is_master", args[3] if len(args) > 3 else False)
        if is_master:
            kwargs["master_listen_fd"] = sock.fileno()
            kwargs["use_libuv"] = True
        return original(*args, **kwargs)

    rdzv.TCPStore = store_on_socket  # type: ignore[attr-defined,assignment]
    return True


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    addr, port = _option(args, "--master-addr"), _option(args, "--master-port")
    sock = None
    if addr is not None and port is not None and port.isdigit():
        sock = bind_store_socket(addr, int(port))
        if port == "0":  # the port the kernel chose, held from now on: no race for it
            chosen = str(sock.getsockname()[1])
            args = [chosen if a == "0" and i and args[i - 1] == "--master-port" else a for i, a in enumerate(args)]
            args = [f"--master-port={chosen}" if a == "--master-port=0" else a for a in args]
        if not _patch_static_rendezvous(sock):
            sock.close()
            log.warning("this torch has no static rendezvous to patch; the store listens on every interface")
    from torch.distributed.run import main as torchrun_main

    from pipec.runtime.parent_death import die_with_parent

    die_with_parent()  # torchrun (and, through the ranks' own arming, every rank) ends with `pipec run`

    sys.argv = [sys.argv[0], *args]
    torchrun_main(args)


if __name__ == "__main__":
    main()
