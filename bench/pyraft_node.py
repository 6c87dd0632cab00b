"""Start one pyraft node, as ``python -m pyraft.run_raft ARGS`` would, tuned in its favour.

pyraft listens with a backlog of 1, so 50 clients connecting at once hang or get
resets; and it does not set TCP_NODELAY, so pipelined replies stall ~40 ms on
delayed ACKs. Both are fixed here, before pyraft is imported, by wrapping
``socket.socket.listen`` (backlog at least 128) and ``accept`` (NODELAY on every
accepted connection). Nothing else of pyraft changes.

Run by the benchmark with pyraft importable (its own install directory on
PYTHONPATH): ``python bench/pyraft_node.py -i 1 -a 127.0.0.1:P -e 2/...,3/...``.
"""

from __future__ import annotations

import contextlib
import runpy
import socket
import sys

MIN_BACKLOG = 128

_listen = socket.socket.listen
_accept = socket.socket.accept


def _listen_wide(self: socket.socket, backlog: int = MIN_BACKLOG) -> None:
    _listen(self, max(backlog, MIN_BACKLOG))


def _accept_nodelay(self: socket.socket) -> tuple[socket.socket, object]:
    conn, address = _accept(self)
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn, address


def main() -> None:
    socket.socket.listen = _listen_wide  # type: ignore[method-assign,assignment]
    socket.socket.accept = _accept_nodelay  # type: ignore[method-assign,assignment]
    sys.argv = ["pyraft", *sys.argv[1:]]
    runpy.run_module("pyraft.run_raft", run_name="__main__")


if __name__ == "__main__":
    main()
