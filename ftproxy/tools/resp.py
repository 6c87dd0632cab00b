"""RESP, the Redis protocol, as much as the demo, the benchmark and the tests speak."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

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


Reply = str | int | bytes | None | ErrorReply


class ConnectionLost(Exception):
    """The server closed the connection before the whole reply arrived."""


def encode_command(*args: bytes) -> bytes:
    """Encode one request in RESP's array form, the one every server accepts."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def parse_reply(buffer: bytes | bytearray) -> tuple[Reply, int] | None:
    """The first complete reply in ``buffer`` and the bytes it took, or None if partial.

    Only the reply types GET, SET and INCR produce: simple strings, errors,
    integers and bulk strings (``None`` for the nil bulk string).
    """
    end = buffer.find(b"\r\n")
    if end < 0:
        return None
    kind, body = buffer[:1], bytes(buffer[1:end])
    if kind == b"+":
        return body.decode(), end + 2
    if kind == b"-":
        return ErrorReply(body.decode("utf-8", "replace")), end + 2
    if kind == b":":
        return int(body), end + 2
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buffer) < stop + 2:
            return None
        return bytes(buffer[end + 2 : stop]), stop + 2
    raise ValueError(f"unexpected RESP reply type {bytes(kind)!r}")


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
