"""RESP, the Redis protocol, as much as the demo, the benchmark and the tests speak."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

import trio

HOST: Final = "127.0.0.1"
RECEIVE_SIZE: Final = 65536
REQUEST_TIMEOUT_S: Final = 2.0  # a reply later than this counts as a broken connection
CONNECT_TIMEOUT_S: Final = 1.0
BACKOFF_FIRST_S: Final = 0.005
BACKOFF_MAX_S: Final = 0.05
_TCP_INFO_TOTAL_RETRANS: Final = 100  # offset of tcpi_total_retrans in struct tcp_info


@dataclass(frozen=True)
class ErrorReply:
    """A ``-ERR ...`` reply: the server understood the request and refused it."""

    message: str


Reply: TypeAlias = "str | int | bytes | ErrorReply | list[Reply] | None"


class ReplyError(Exception):
    """The server answered with an error reply (``-ERR ...``), raised by :class:`RespClient`."""


class ConnectionLost(ConnectionResetError):
    """The server closed the connection before the whole reply arrived."""


def encode_command(*args: bytes | str) -> bytes:
    """Encode one request in RESP's array form, the one every server accepts."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def parse_reply(buffer: bytes | bytearray, start: int = 0) -> tuple[Reply, int] | None:
    """The first complete reply in ``buffer[start:]`` and the bytes it took, or None if
    partial: simple strings, errors (:class:`ErrorReply`), integers, bulk strings
    (``None`` for the nil one) and arrays (lists; ``None`` for the nil one).
    """
    end = buffer.find(b"\r\n", start)
    if end < 0:
        return None
    kind, body = buffer[start : start + 1], bytes(buffer[start + 1 : end])
    used = end + 2 - start
    if kind == b"+":
        return body.decode(), used
    if kind == b"-":
        return ErrorReply(body.decode("utf-8", "replace")), used
    if kind == b":":
        return int(body), used
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None, used
        stop = end + 2 + size
        if len(buffer) < stop + 2:
            return None
        return bytes(buffer[end + 2 : stop]), stop + 2 - start
    if kind == b"*":
        count = int(body)
        if count < 0:
            return None, used
        items: list[Reply] = []
        for _ in range(count):
            parsed = parse_reply(buffer, start + used)
            if parsed is None:
                return None
            items.append(parsed[0])
            used += parsed[1]
        return items, used
    raise ValueError(f"unexpected RESP reply type {bytes(kind)!r}")


def receive_reply(sock: socket.socket, buffer: bytearray) -> Reply:
    """The next reply on a blocking ``sock``: from ``buffer`` (what was received and not
    yet parsed, consumed here) and what more arrives; ConnectionLost if it closes first."""
    while (parsed := parse_reply(buffer)) is None:
        data = sock.recv(RECEIVE_SIZE)
        if not data:
            raise ConnectionLost("the server closed the connection")
        buffer += data
    reply, used = parsed
    del buffer[:used]
    return reply


class RespClient:
    """A blocking client on one TCP connection, one reply per request, in order.

    For probes, checks and load where correctness matters more than speed (the
    throughput figures come from redis-benchmark). OSError (a reset, a timeout,
    :class:`ConnectionLost`) means the reply never came.
    """

    def __init__(self, port: int, host: str = HOST, timeout: float | None = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()

    def send(self, *commands: Sequence[bytes | str]) -> None:
        """Send several requests in one write (pipelining)."""
        self.sock.sendall(b"".join(encode_command(*c) for c in commands))

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are: part of a request, inline commands, a malformed one
        (how a test probes a server's parser)."""
        self.sock.sendall(data)

    def read_reply(self) -> Reply:
        """The next reply as it came, an error reply included (:class:`ErrorReply`)."""
        return receive_reply(self.sock, self._buffer)

    def read_rest(self) -> bytes:
        """Everything the server still sends until it closes the connection (b"": it
        closed with nothing more to say)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        while data := self.sock.recv(RECEIVE_SIZE):
            rest += data
        return rest

    def request(self, *args: bytes | str) -> Reply:
        """Send one request and return its reply as it came (:class:`ErrorReply` too)."""
        self.send(args)
        return self.read_reply()

    def call(self, *args: bytes | str) -> Reply:
        """Send one request and return its reply; ReplyError for an error reply."""
        reply = self.request(*args)
        if isinstance(reply, ErrorReply):
            raise ReplyError(reply.message)
        return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RespClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call_once(port: int, *args: bytes | str, host: str = HOST, timeout: float = 2.0) -> Reply:
    """Connect, send one command, return its reply (ReplyError for an error), disconnect."""
    with RespClient(port, host, timeout) as client:
        return client.call(*args)


class RespConnection:
    """One client connection to the service: requests out, replies in, in order."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    @classmethod
    async def open(cls, port: int, host: str = HOST) -> RespConnection:
        """Connect once; OSError if nobody listens (trio sets TCP_NODELAY)."""
        with trio.fail_after(CONNECT_TIMEOUT_S):
            return cls(await trio.open_tcp_stream(host, port))

    @property
    def local_address(self) -> str:
        """The client's end of the connection, ``IP:PORT``."""
        host, port = self._stream.socket.getsockname()[:2]
        return f"{host}:{port}"

    def retransmissions(self) -> int | None:
        """Segments the client's kernel retransmitted on this connection (TCP_INFO)."""
        try:
            info = self._stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except OSError:
            return None
        if len(info) < _TCP_INFO_TOTAL_RETRANS + 4:
            return None
        return int(struct.unpack_from("I", info, _TCP_INFO_TOTAL_RETRANS)[0])

    async def send(self, commands: Sequence[Sequence[bytes]]) -> None:
        """Send several requests in one write: pipelining, for reading back quickly."""
        await self._stream.send_all(b"".join(encode_command(*c) for c in commands))

    async def receive(self) -> Reply:
        """The next reply; ConnectionLost if the server closed the connection first."""
        while (parsed := parse_reply(self._buffer)) is None:
            data = await self._stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise ConnectionLost("the server closed the connection")
            self._buffer += data
        reply, used = parsed
        del self._buffer[:used]
        return reply

    async def call(self, *args: bytes, timeout: float = REQUEST_TIMEOUT_S) -> Reply:
        """One request and its reply, within ``timeout`` seconds."""
        with trio.fail_after(timeout):
            await self.send([args])
            return await self.receive()

    async def aclose(self) -> None:
        """Close the connection; never raises, the connection is being dropped anyway."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stream.aclose()


# What a client sees of a dying or not yet listening server: it reconnects on all of them.
CONNECTION_ERRORS: Final = (
    OSError,
    ConnectionLost,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


async def connect_retrying(port: int, host: str = HOST) -> RespConnection:
    """Connect, retrying with a short backoff until the service accepts (or cancelled)."""
    delay = BACKOFF_FIRST_S
    while True:
        try:
            return await RespConnection.open(port, host)
        except (OSError, trio.TooSlowError):
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
