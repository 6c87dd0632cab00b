"""A small blocking RESP client: probes, the failover load, leader look-ups, checks.

The throughput and latency figures come from redis-benchmark, not from here:
this client serves where correctness matters more than speed (which writes were
acknowledged, and are they still there after a failover).
"""

from __future__ import annotations

import socket

from bench.procs import HOST

Reply = bytes | int | str | None


class ReplyError(Exception):
    """The server answered with a RESP error (``-ERR ...``)."""


def encode(*args: str | bytes) -> bytes:
    """One command in the RESP array form, as redis-cli and redis-benchmark send it."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class Connection:
    """One TCP connection to a RESP server, one command at a time."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def call(self, *args: str | bytes) -> Reply:
        """Send one command and return its reply; raise ReplyError for an error reply.

        OSError (including a reset or a timeout) means the reply never came.
        """
        self.sock.sendall(encode(*args))
        return self._read_reply()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            self._fill()
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        self._buffer += chunk

    def _read_reply(self) -> Reply:
        line = self._read_line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise ReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self._buffer) < size + 2:
                self._fill()
            data, self._buffer = self._buffer[:size], self._buffer[size + 2 :]
            return data
        if kind == b"*":
            # Not needed by the benchmark; consume and summarise.
            return b" ".join(repr(self._read_reply()).encode() for _ in range(int(rest)))
        raise ReplyError(f"not a RESP reply: {line[:40]!r}")


def call_once(port: int, *args: str | bytes, timeout: float = 2.0) -> Reply:
    """Connect, send one command, return its reply, disconnect."""
    with Connection(port, timeout) as conn:
        return conn.call(*args)
