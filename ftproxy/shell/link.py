"""The log channel over trio: ``ftproxy.core.channel`` speaks events, this moves bytes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import termios
from collections import deque
from collections.abc import Callable

import structlog
import trio

from ftproxy.core.channel import (
    BACKUP,
    NEED_DATA,
    PRIMARY,
    Authenticated,
    Channel,
    ChannelEvent,
    ConnectionClosed,
    Error,
    Join,
    LocalProtocolError,
    PeerAborted,
    RemoteProtocolError,
    Sendable,
    State,
    Switchover,
    SwitchoverOutcome,
    Welcome,
)
from ftproxy.shell.admission import (
    OPENING_TIMEOUT_S,
    Admission,
    Gate,
    RejectionLog,
    peer_name,
    serve_with_limits,
)
from ftproxy.shell.pump import pump_event
from ftproxy.shell.spin import spinner

log = structlog.get_logger()
HANDSHAKE_TIMEOUT_S = OPENING_TIMEOUT_S
_READ_SIZE = 1024 * 1024
# Reads that found data without waiting, after which next_event yields once
# anyway, so that a peer that never lets the socket run dry cannot starve the
# replica's other tasks.
_READS_BETWEEN_YIELDS = 32
# The same for sends the socket took whole at once: a sender that loops (a catch-up
# streaming a long log to a fast joiner) yields now and then all the same.
_SENDS_BETWEEN_YIELDS = 32


class _Stashed(Exception):
    """``take_ready`` left an event (or a protocol error) for ``next_event``'s waiting task."""


class LinkRefused(Exception):
    """The handshake failed; the message says why (and the peer was told).

    ``retry``: the peer did not refuse us, it went quiet or away during the
    opening (a busy primary, or one that shed us under a flood): trying again
    may well work. Otherwise it said no, and asking again gets the same answer.
    """

    def __init__(self, reason: str, *, retry: bool = False) -> None:
        super().__init__(reason)
        self.retry = retry


NOT_YET_PAIRED = SwitchoverOutcome(
    done=False, refused=True, reason="no backup has joined this primary yet: nothing to hand over"
)


class SwitchoverRequested(Exception):
    """Not a backup: a control client that proved the secret asks for a switchover on
    ``link`` (the replica answers it with a SwitchoverOutcome)."""

    def __init__(self, link: LogLink) -> None:
        super().__init__(f"{link.peer} asks for a switchover")
        self.link = link


class LogLink:
    """One authenticated log channel connection.

    Bytes go to the socket at once when it has room and nobody else is
    sending, and are read before waiting for more: trio's lock and stream
    methods would each yield a full pass of its loop (an epoll_wait and a task
    switch) per message, and on the 1-client path every entry and every ack is
    such a message. What the socket does not take at once waits in
    ``_pending`` and goes out, in order, before anything sent after it.

    Any ``trio.abc.Stream`` works (tests drive links on memory streams): the
    fast path and the kernel's count of unread bytes are for a
    ``trio.SocketStream``; another stream gets the plain ``send_all`` and
    ``receive_some``, and ``send_now`` leaves the whole message pending.
    ``peer``: the peer's name, derived from the socket when not given.
    """

    def __init__(self, stream: trio.abc.Stream, channel: Channel, peer: str | None = None) -> None:
        self.stream = stream
        self.channel = channel
        self._send_lock = trio.StrictFIFOLock()
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        if peer is None:
            peer = peer_name(self._socket) if self._socket is not None else "?"
        self.peer = peer
        self._pending = b""
        self._unyielded = 0
        self._unyielded_sends = 0
        # Events ``take_ready`` read but was not asked for: ``next_event`` returns them first.
        self._stashed: deque[ChannelEvent] = deque()
        # Set while next_event's task waits for the socket holding no bytes read: only
        # then may take_ready read (the bytes reach the channel in the socket's order).
        self._parked: trio.CancelScope | None = None
        # Set while next_event's task holds bytes read but not yet given to the channel.
        self._holding = False
        if self._socket is not None:
            spinner.watch(self._socket.fileno())

    def unread(self) -> int:
        """Bytes from the peer that nobody has turned into events yet (socket and buffer)."""
        waiting = 0
        if self._socket is not None:
            with contextlib.suppress(OSError, ValueError):
                waiting = int.from_bytes(
                    fcntl.ioctl(self._socket.fileno(), termios.FIONREAD, b"\0" * 4), "little"
                )
        return waiting + self.channel.buffered

    @property
    def pending(self) -> bool:
        """Bytes of a message sent with ``send_now`` still wait for the socket (``flush``)."""
        return bool(self._pending)

    def send_now(self, message: Sendable) -> bool:
        """Send ``message`` without waiting, if no other send is under way (False: it was
        not sent, nothing changed). What the socket does not take now stays pending:
        ``flush`` (or any later send) puts it out first."""
        if self._send_lock.locked() or self._pending:
            return False
        try:
            data = self.channel.send(message)
        except LocalProtocolError:
            raise trio.ClosedResourceError("the log channel is closed") from None
        self._write_now(data)
        return True

    def _write_now(self, data: bytes) -> None:
        if self._socket is None:
            self._pending = data  # no write without an await: flush puts it out
            return
        try:
            # -1 once closed (never a stale number that a new socket may have taken).
            written = os.write(self._socket.fileno(), data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError:
            written = 0  # broken: the stream's send_all reports it, from flush
        if written < len(data):
            self._pending = data[written:]

    async def flush(self) -> None:
        """Put out what ``send_now`` left pending."""
        async with self._send_lock:
            await self._flush_pending()

    async def _flush_pending(self) -> None:
        if self._pending:
            data, self._pending = self._pending, b""
            await self.stream.send_all(data)

    async def send(self, message: Sendable) -> None:
        """Send one message; ClosedResourceError once the conversation has ended."""
        if self.send_now(message):
            if self._pending:
                await self.flush()
                return
            self._unyielded_sends += 1
            if self._unyielded_sends >= _SENDS_BETWEEN_YIELDS:
                self._unyielded_sends = 0
                await trio.lowlevel.checkpoint()
            return
        async with self._send_lock:
            await self._flush_pending()
            try:
                data = self.channel.send(message)
            except LocalProtocolError:
                # The peer hung up (or broke the protocol) while we had this to say.
                raise trio.ClosedResourceError("the log channel is closed") from None
            await self.stream.send_all(data)

    async def next_event(self) -> ChannelEvent:
        """The next event; ConnectionClosed when the peer went away, however it did."""
        while True:
            if self._stashed:
                return self._stashed.popleft()
            try:
                return await pump_event(self.channel, self._receive_some, self._send_after_pending)
            except _Stashed:
                continue  # take_ready read what we waited for: its leftovers come first

    def take_ready(self, wanted: tuple[type[ChannelEvent], ...]) -> list[ChannelEvent]:
        """The events of the kinds ``wanted`` that the socket already holds, read now,
        without waiting, in order, while the task in ``next_event`` waits for them.

        The first event of another kind (and what follows it) is left to that task,
        which is woken for it. A peer that broke the protocol raises
        RemoteProtocolError here (and in that task, woken too). So a
        caller that acts on acks where it stands (the primary, holding an output)
        need not wait for a pass of trio's loop to let the receiving task read them.
        Nothing is read unless that task is parked on an empty read (it holds no
        bytes the channel has not seen), nor before the channel streams (the
        opening's own replies are that task's to send).
        """
        if (
            self._socket is None
            or self._parked is None
            or self._stashed
            or self.channel.state is not State.STREAMING
        ):
            return []
        try:
            data = os.read(self._socket.fileno(), _READ_SIZE)
        except OSError:
            return []  # nothing yet (the common case), or broken: the waiting task finds out
        taken: list[ChannelEvent] = []
        try:
            self.channel.receive_data(data)
            while (event := self.channel.next_event()) is not NEED_DATA:
                if not isinstance(event, wanted):
                    self._stashed.append(event)
                    break
                taken.append(event)
        except RemoteProtocolError:
            self._parked.cancel()  # it raises again there; the caller reports it first
            raise
        if self._stashed:
            self._parked.cancel()
        return taken

    def why_broken(self, doing: str = "sending") -> str:
        """Why a send found the channel broken: the peer's own reason when its
        ``Error`` is already in the socket (it said why, then closed: a live replica
        letting a joiner go, say), else only that it broke. What is read here is not
        handed on: the channel is over."""
        said = self._parting_words() if self._socket is not None else None
        return said or f"the log channel broke while {doing}"

    def _parting_words(self) -> str | None:
        assert self._socket is not None
        if self._holding:
            return None  # the receiving task holds bytes the channel has not seen
        while True:
            try:
                data = os.read(self._socket.fileno(), _READ_SIZE)
            except OSError:
                break  # all read (EAGAIN), or the socket already gone
            if not data:
                break
            try:
                self.channel.receive_data(data)
            except LocalProtocolError:
                break  # the channel had already seen the end
        try:
            while (event := self.channel.next_event()) is not NEED_DATA:
                if isinstance(event, ConnectionClosed):
                    break  # the peer closed without a word (the channel repeats this)
        except PeerAborted as exc:
            return str(exc)
        except RemoteProtocolError:
            pass
        return None

    async def _send_after_pending(self, data: bytes) -> None:
        async with self._send_lock:
            await self._flush_pending()
            await self.stream.send_all(data)

    async def _receive_some(self) -> bytes:
        """What the peer sent since the last read; b"" once the connection is closed."""
        if self._socket is None:
            try:
                return bytes(await self.stream.receive_some(_READ_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        try:
            while True:
                fd = self._socket.fileno()  # -1 once closed: EBADF, the end
                try:
                    data = os.read(fd, _READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    self._unyielded = 0
                    with trio.CancelScope() as self._parked:
                        await spinner.wait_readable(fd)
                    self._parked = None
                    if self._stashed or self.channel.failed:
                        raise _Stashed from None
                    continue
                self._unyielded += 1
                if self._unyielded >= _READS_BETWEEN_YIELDS:
                    self._unyielded = 0
                    self._holding = True  # read, not yet in the channel
                    try:
                        await trio.lowlevel.checkpoint()
                    finally:
                        self._holding = False
                return data
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def refuse(self, reason: str) -> None:
        """Tell the peer why, then close."""
        with contextlib.suppress(Exception):
            with trio.move_on_after(1):
                await self.send(Error(reason))
        await self.aclose()

    async def aclose(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                spinner.unwatch(self._socket.fileno())
        with contextlib.suppress(Exception):
            await self.stream.aclose()


def peer_failure(peer: str, exc: RemoteProtocolError) -> str:
    """Why the log channel with ``peer`` ("the backup") ended on ``exc``: the peer's own
    reason when it gave up (an ``Error``), else that it broke the protocol."""
    if isinstance(exc, PeerAborted):
        return str(exc)
    return f"{peer} broke the protocol: {exc}"


def argv_mismatch(theirs: list[str], ours: list[str]) -> str:
    """Why a backup running ``theirs`` cannot replicate a guest running ``ours`` ("" if it can)."""
    if theirs == ours:
        return ""
    return (
        f"the backup runs {' '.join(theirs)!r} but the primary runs "
        f"{' '.join(ours)!r}: both must run the same guest command line"
    )


async def _handshake(link: LogLink) -> None:
    event = await link.next_event()
    if isinstance(event, ConnectionClosed):
        raise LinkRefused(f"{link.peer} closed the connection during the handshake", retry=True)
    if not isinstance(event, Authenticated):
        raise LinkRefused(f"{link.peer} sent {type(event).__name__} before authenticating")


async def accept_backup(
    stream: trio.abc.Stream,
    secret: bytes | None,
    argv: list[str],
    welcome: Welcome | Callable[[], Welcome],
    gate: Gate | None = None,
    *,
    claim: Callable[[str], str] | None = None,
    peer: str | None = None,
) -> LogLink:
    """The primary's side of a new connection: authenticate, check, welcome.

    SwitchoverRequested (with the link) when the peer proved the secret and asks
    for a switchover instead of joining.

    ``gate``: the connection's admission (``ftproxy.shell.admission``), told once the
    backup has proved the secret. ``claim``: called with the peer's name once it
    proved itself and runs the same program, with no await before its Welcome
    (so the next backup sees what it did); it returns why to refuse this backup,
    or "" to take it. ``welcome``: the Welcome, or what makes it once claimed.
    ``peer``: the peer's name (derived from a socket stream when not given)."""
    link = LogLink(stream, Channel(PRIMARY, secret), peer)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            await _handshake(link)
            if gate is not None:
                gate.proved()
            join = await link.next_event()
        if isinstance(join, Switchover):
            raise SwitchoverRequested(link)
        if not isinstance(join, Join):
            raise LinkRefused(f"{link.peer} sent {type(join).__name__} instead of Join")
        reason = argv_mismatch(join.argv, argv) or (claim(link.peer) if claim else "")
        if reason:
            await link.refuse(reason)
            raise LinkRefused(reason)
        try:
            await link.send(welcome if isinstance(welcome, Welcome) else welcome())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise LinkRefused(f"{link.peer} hung up during the handshake", retry=True) from None
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
    stream: trio.abc.Stream, secret: bytes | None, argv: list[str], *, peer: str | None = None
) -> tuple[LogLink, Welcome]:
    """The backup's side: authenticate, ask to join, get the pair and the log header."""
    link = LogLink(stream, Channel(BACKUP, secret), peer)
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
        raise LinkRefused(
            f"the primary did not finish the handshake within {HANDSHAKE_TIMEOUT_S:g} s",
            retry=True,
        ) from None
    except LinkRefused:
        await link.aclose()
        raise
    if isinstance(welcome, ConnectionClosed):
        await link.aclose()
        raise LinkRefused("the primary closed the connection before its Welcome", retry=True)
    if not isinstance(welcome, Welcome):
        await link.aclose()
        raise LinkRefused(f"the primary sent {type(welcome).__name__} instead of Welcome")
    return link, welcome


async def accept_first_backup(
    listeners: list[trio.SocketListener],
    secret: bytes | None,
    argv: list[str],
    welcome: Welcome,
    admission: Admission | None = None,
) -> LogLink:
    """Take the first backup that authenticates and runs the same program.

    Every connection's opening runs in a task of its own under ``admission``'s
    limits (silent or slow strangers cannot hold up a backup that proves itself);
    refusals are logged. A live replica that takes a backup later calls this too.
    """
    if admission is None:
        refusals = RejectionLog("backup_refused", port="log channel", level="error")
        admission = Admission("log channel", rejections=refusals)
    taken: list[LogLink] = []

    async with trio.open_nursery() as nursery:

        async def attempt(stream: trio.SocketStream, gate: Gate) -> None:
            try:
                link = await accept_backup(stream, secret, argv, welcome, gate)
            except SwitchoverRequested as request:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await request.link.send(NOT_YET_PAIRED)
                await request.link.aclose()
                return
            except LinkRefused as exc:
                admission.reject(gate.peer, str(exc))
                return
            if taken:  # another backup won the race
                await link.aclose()
                return
            taken.append(link)
            nursery.cancel_scope.cancel()

        nursery.start_soon(serve_with_limits, listeners, attempt, admission)
    return taken[0]
