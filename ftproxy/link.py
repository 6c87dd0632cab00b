"""The log channel over trio: ``ftproxy.channel`` speaks events, this moves bytes."""

from __future__ import annotations

import contextlib

import structlog
import trio

from ftproxy.channel import (
    BACKUP,
    NEED_DATA,
    PRIMARY,
    Ack,
    Authenticated,
    Channel,
    ChannelEvent,
    ConnectionClosed,
    Entries,
    Error,
    Heartbeat,
    Join,
    LocalProtocolError,
    Protected,
    RemoteProtocolError,
    Welcome,
)

log = structlog.get_logger()
HANDSHAKE_TIMEOUT_S = 10.0


class LinkRefused(Exception):
    """The handshake failed; the message says why (and the peer was told)."""


class LogLink:
    """One authenticated log channel connection."""

    def __init__(self, stream: trio.SocketStream, channel: Channel) -> None:
        self.stream = stream
        self.channel = channel
        self._send_lock = trio.StrictFIFOLock()
        self.peer = _peer_name(stream)

    async def send(
        self, message: Join | Welcome | Entries | Ack | Heartbeat | Protected | Error
    ) -> None:
        """Send one message; ClosedResourceError once the conversation has ended."""
        async with self._send_lock:
            try:
                data = self.channel.send(message)
            except LocalProtocolError:
                # The peer hung up (or broke the protocol) while we had this to say.
                raise trio.ClosedResourceError("the log channel is closed") from None
            await self.stream.send_all(data)

    async def next_event(self) -> ChannelEvent:
        """The next event; ConnectionClosed when the peer went away, however it did."""
        while True:
            event = self.channel.next_event()
            pending = self.channel.data_to_send()
            if pending:
                async with self._send_lock:
                    await self.stream.send_all(pending)
            if event is not NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(1024 * 1024)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.channel.receive_data(data)

    async def refuse(self, reason: str) -> None:
        """Tell the peer why, then close."""
        with contextlib.suppress(Exception):
            with trio.move_on_after(1):
                await self.send(Error(reason))
        await self.aclose()

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.aclose()


def argv_mismatch(theirs: list[str], ours: list[str]) -> str:
    """Why a backup running ``theirs`` cannot replicate a guest running ``ours`` ("" if it can)."""
    if theirs == ours:
        return ""
    return (
        f"the backup runs {' '.join(theirs)!r} but the primary runs "
        f"{' '.join(ours)!r}: both must run the same guest command line"
    )


def _peer_name(stream: trio.SocketStream) -> str:
    with contextlib.suppress(OSError):
        host, port, *_ = stream.socket.getpeername()
        return f"{host}:{port}"
    return "?"


async def _handshake(link: LogLink) -> None:
    event = await link.next_event()
    if isinstance(event, ConnectionClosed):
        raise LinkRefused(f"{link.peer} closed the connection during the handshake")
    if not isinstance(event, Authenticated):
        raise LinkRefused(f"{link.peer} sent {type(event).__name__} before authenticating")


async def accept_backup(
    stream: trio.SocketStream,
    secret: bytes | None,
    argv: list[str],
    welcome: Welcome,
) -> LogLink:
    """The primary's side of a new connection: authenticate, check, welcome."""
    link = LogLink(stream, Channel(PRIMARY, secret))
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            await _handshake(link)
            join = await link.next_event()
        if not isinstance(join, Join):
            raise LinkRefused(f"{link.peer} sent {type(join).__name__} instead of Join")
        reason = argv_mismatch(join.argv, argv)
        if reason:
            await link.refuse(reason)
            raise LinkRefused(reason)
        await link.send(welcome)
    except RemoteProtocolError as exc:
        await link.refuse(str(exc))
        raise LinkRefused(str(exc)) from None
    except trio.TooSlowError:
        await link.aclose()
        raise LinkRefused(f"{link.peer} did not finish the handshake in time") from None
    except LinkRefused:
        await link.aclose()
        raise
    return link


async def join_primary(
    stream: trio.SocketStream, secret: bytes | None, argv: list[str]
) -> tuple[LogLink, Welcome]:
    """The backup's side: authenticate, ask to join, get the pair and the log header."""
    link = LogLink(stream, Channel(BACKUP, secret))
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            await _handshake(link)
            await link.send(Join(argv))
            welcome = await link.next_event()
    except RemoteProtocolError as exc:
        await link.refuse(str(exc))
        raise LinkRefused(str(exc)) from None
    except trio.TooSlowError:
        await link.aclose()
        raise LinkRefused("the primary did not finish the handshake in time") from None
    if not isinstance(welcome, Welcome):
        await link.aclose()
        raise LinkRefused(f"the primary sent {type(welcome).__name__} instead of Welcome")
    return link, welcome
