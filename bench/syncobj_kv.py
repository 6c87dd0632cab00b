"""A Redis-protocol key-value store replicated with PySyncObj (Raft), for the comparison.

PySyncObj is a library, not a server: using it means rewriting the store around
a ``SyncObj`` subclass whose writes are ``@replicated`` methods, plus a network
front. This is that rewrite, kept as small as a user would write it: a
thread-per-connection ``socketserver`` front (TCP_NODELAY, backlog 128) that
parses requests with ``examples/kv.py``'s own parser, and blocks each
connection on a synchronous replicated call (the reply leaves once the write is
committed by a majority and applied). Reads are served from the local copy.

``appendEntriesUseBatch=False``: with PySyncObj's default batching a
synchronous write takes ~100 ms; without it ~0.5 ms (see shared/PEERS.md).

Run: ``python bench/syncobj_kv.py --port P --raft 127.0.0.1:R --partner 127.0.0.1:R2 ...``
(PySyncObj importable). ``INFO`` answers JSON with ``"state": "l"`` on the leader, as pyraft does.
"""

from __future__ import annotations

import argparse
import json
import socket
import socketserver
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from kv import (
    OK,
    ProtocolError,
    RequestParser,
    bulk_string,
    error_reply,
    integer,
    parse_int,
)
from pysyncobj import SyncObj, SyncObjConf, SyncObjException, replicated

LEADER = 2  # PySyncObj's _RAFT_STATE.LEADER
PARTNER = "partner_node_status_server_"  # getStatus(): 2 when connected
WRITE_TIMEOUT_S = 5.0


class ReplicatedStore(SyncObj):  # type: ignore[misc]
    """The key-value state; every change goes through the Raft log."""

    def __init__(self, self_address: str, partners: list[str], conf: SyncObjConf) -> None:
        super().__init__(self_address, partners, conf)
        self._data: dict[bytes, bytes] = {}

    @replicated  # type: ignore[misc]
    def set(self, key: bytes, value: bytes) -> bool:
        self._data[key] = value
        return True

    @replicated  # type: ignore[misc]
    def incr(self, key: bytes) -> int | None:
        current = parse_int(self._data.get(key, b"0"))
        if current is None:
            return None
        self._data[key] = b"%d" % (current + 1)
        return current + 1

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def info(self) -> bytes:
        """``INFO``: JSON with ``state`` ("l" on the leader) and ``connected_partners``."""
        status = self.getStatus()
        connected = sum(1 for k, v in status.items() if k.startswith(PARTNER) and v == 2)
        state = "l" if status["state"] == LEADER else "f"
        return json.dumps({"state": state, "connected_partners": connected}).encode()


def execute(store: ReplicatedStore, args: list[bytes]) -> bytes:
    """One command's reply."""
    name = args[0].upper()
    try:
        if name == b"SET" and len(args) == 3:
            store.set(args[1], args[2], sync=True, timeout=WRITE_TIMEOUT_S)
            return OK
        if name == b"INCR" and len(args) == 2:
            value = store.incr(args[1], sync=True, timeout=WRITE_TIMEOUT_S)
            if value is None:
                return error_reply("ERR value is not an integer or out of range")
            return integer(value)
    except SyncObjException as exc:
        return error_reply(f"ERR not committed: {exc}")
    if name == b"GET" and len(args) == 2:
        return bulk_string(store.get(args[1]))
    if name == b"PING":
        return b"+PONG\r\n"
    if name == b"INFO":
        return bulk_string(store.info())
    return error_reply(f"ERR unknown command '{args[0].decode(errors='replace')}'")


class Handler(socketserver.BaseRequestHandler):
    """One client connection, on its own thread."""

    server: Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        parser = RequestParser()
        while True:
            data = sock.recv(65536)
            if not data:
                return
            parser.feed(data)
            replies = []
            try:
                while (command := parser.next_command()) is not None:
                    if command:
                        replies.append(execute(self.server.store, command))
            except ProtocolError as exc:
                sock.sendall(b"".join(replies) + error_reply(f"ERR Protocol error: {exc}"))
                return
            if replies:
                sock.sendall(b"".join(replies))


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, port: int, store: ReplicatedStore) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.store = store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="RESP port for clients")
    parser.add_argument("--raft", required=True, help="this node's Raft address HOST:PORT")
    parser.add_argument("--partner", action="append", default=[], help="another node's Raft")
    args = parser.parse_args(argv)
    conf = SyncObjConf(appendEntriesUseBatch=False, dynamicMembershipChange=False)
    store = ReplicatedStore(args.raft, args.partner, conf)
    with Server(args.port, store) as server:
        print(f"syncobj-kv listening on 127.0.0.1:{args.port}", flush=True)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
