"""The log channel's trio shell (ftproxy.shell.link) on in-memory streams, in-process.

``LogLink`` takes any ``trio.abc.Stream``; these drive it on
``trio.testing.memory_stream_pair`` (no socket, so no fast path: the plain
``send_all``/``receive_some`` path) and, where the fast path is the point, on a
socketpair.
"""

from __future__ import annotations

import itertools
import os

import pytest
import trio
import trio.testing

from ftproxy.core.channel import (
    BACKUP,
    Ack,
    Channel,
    ConnectionClosed,
    Entries,
    Heartbeat,
    RemoteProtocolError,
    Welcome,
)
from ftproxy.core.records import Entry, Header, Policy
from ftproxy.shell.link import (
    _SENDS_BETWEEN_YIELDS,
    HANDSHAKE_TIMEOUT_S,
    LinkRefused,
    LogLink,
    accept_backup,
    join_primary,
)

ARGV = ["kv.py"]
SECRET = b"s" * 32
HEADER = Header(2, ARGV, {}, "/", "3.11", Policy(200, 1000), 0)
WELCOME = Welcome("pair", 1, HEADER)


async def linked(
    stream_pair: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
    backup_argv: list[str] = ARGV,
) -> tuple[LogLink, LogLink, Welcome]:
    """A primary's and a backup's LogLink after the real handshake on a memory stream pair."""
    primary_end, backup_end = stream_pair or trio.testing.memory_stream_pair()
    links: dict[str, LogLink] = {}
    welcomes: list[Welcome] = []

    async def primary() -> None:
        links["primary"] = await accept_backup(
            primary_end, SECRET, ARGV, WELCOME, peer="backup-end"
        )

    async def backup() -> None:
        link, welcome = await join_primary(backup_end, SECRET, backup_argv, peer="primary-end")
        links["backup"] = link
        welcomes.append(welcome)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(primary)
        nursery.start_soon(backup)
    return links["primary"], links["backup"], welcomes[0]


async def test_the_handshake_runs_on_memory_streams_with_the_peer_names_given() -> None:
    primary, backup, welcome = await linked()
    assert welcome == WELCOME
    assert (primary.peer, backup.peer) == ("backup-end", "primary-end")


async def test_entries_and_acks_cross_a_memory_stream_in_order() -> None:
    primary, backup, _ = await linked()
    batches = [[Entry(seq, 100 + seq, 1, seq, b"r%d" % seq)] for seq in range(1, 6)]
    for batch in batches:
        await primary.send(Entries(batch))
    for batch in batches:
        assert await backup.next_event() == Entries(batch)
        await backup.send(Ack(batch[-1].seq, 0))
    for seq in range(1, 6):
        assert await primary.next_event() == Ack(seq, 0)


async def test_send_now_without_a_socket_leaves_the_message_pending_until_flushed() -> None:
    primary, backup, _ = await linked()
    assert primary.send_now(Heartbeat())
    assert primary.pending  # a memory stream cannot be written without an await
    assert not primary.send_now(Heartbeat())  # one message waits: nothing changes
    await primary.flush()
    assert not primary.pending
    assert await backup.next_event() == Heartbeat()


async def test_unread_counts_the_channels_buffer_on_a_memory_stream() -> None:
    primary, backup, _ = await linked()
    await primary.send(Heartbeat())
    await primary.send(Heartbeat())
    assert backup.unread() == 0  # still in the stream: only a socket can say how much
    assert await backup.next_event() == Heartbeat()  # one read took both frames
    assert backup.unread() > 0
    assert await backup.next_event() == Heartbeat()
    assert backup.unread() == 0


async def test_on_a_socket_stream_the_peer_is_named_and_unread_bytes_counted_in_the_kernel() -> (
    None
):
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        client = await trio.testing.open_stream_to_socket_listener(listener)
        server = await listener.accept()
        async with client, server:
            assert isinstance(server, trio.SocketStream)
            link = LogLink(server, Channel(BACKUP, None))
            assert link.peer == f"127.0.0.1:{client.socket.getsockname()[1]}"
            await client.send_all(b"x" * 10)
            await trio.testing.wait_all_tasks_blocked()
            assert link.unread() == 10


async def test_a_backup_running_another_program_is_refused_on_both_sides() -> None:
    primary_end, backup_end = trio.testing.memory_stream_pair()
    reasons: dict[str, str] = {}

    async def primary() -> None:
        with pytest.raises(LinkRefused) as refused:
            await accept_backup(primary_end, SECRET, ARGV, WELCOME, peer="b")
        reasons["primary"] = str(refused.value)

    async def backup() -> None:
        with pytest.raises(LinkRefused) as refused:
            await join_primary(backup_end, SECRET, ["other.py"], peer="p")
        reasons["backup"] = str(refused.value)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(primary)
        nursery.start_soon(backup)
    assert "both must run the same guest command line" in reasons["primary"]
    assert "both must run the same guest command line" in reasons["backup"]


async def test_a_wrong_secret_fails_the_handshake_with_a_reason() -> None:
    primary_end, backup_end = trio.testing.memory_stream_pair()
    refused: list[LinkRefused] = []

    async def primary() -> None:
        try:
            await accept_backup(primary_end, SECRET, ARGV, WELCOME, peer="b")
        except LinkRefused as exc:
            refused.append(exc)

    async def backup() -> None:
        try:
            await join_primary(backup_end, b"w" * 32, ARGV, peer="p")
        except LinkRefused as exc:
            refused.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(primary)
        nursery.start_soon(backup)
    assert len(refused) == 2
    assert all(str(exc) for exc in refused)


async def test_a_silent_peer_times_the_handshake_out(autojump_clock: trio.abc.Clock) -> None:
    primary_end, _silent = trio.testing.memory_stream_pair()
    started = trio.current_time()
    with pytest.raises(LinkRefused, match="did not finish the handshake in time"):
        await accept_backup(primary_end, SECRET, ARGV, WELCOME, peer="b")
    assert trio.current_time() - started == pytest.approx(HANDSHAKE_TIMEOUT_S)


async def test_a_closed_peer_is_a_connection_closed_event() -> None:
    primary, backup, _ = await linked()
    await backup.aclose()
    assert isinstance(await primary.next_event(), ConnectionClosed)
    with pytest.raises(trio.ClosedResourceError):
        await primary.send(Heartbeat())


async def socket_linked() -> tuple[LogLink, LogLink]:
    """A primary's and a backup's LogLink over a real socketpair (the fast path)."""
    primary_end, backup_end = trio.socket.socketpair()
    primary, backup, _ = await linked(
        (trio.SocketStream(primary_end), trio.SocketStream(backup_end))
    )
    return primary, backup


class Receiver:
    """The task that waits in ``next_event`` (as the primary's receive task does)."""

    def __init__(self, link: LogLink) -> None:
        self.link = link
        self.events: list[object] = []
        self.error: RemoteProtocolError | None = None

    async def run(self) -> None:
        try:
            while not isinstance(event := await self.link.next_event(), ConnectionClosed):
                self.events.append(event)
        except RemoteProtocolError as exc:
            self.error = exc
            return
        self.events.append(event)


async def test_a_sender_whose_every_frame_the_socket_takes_still_lets_other_tasks_run() -> None:
    # A catch-up streams batch after batch; a socket that takes each at once must not
    # let that loop hold the replica's other tasks (acks, the silence watch) off.
    primary, backup = await socket_linked()
    total = 3 * _SENDS_BETWEEN_YIELDS  # more would fill the socketpair: no one reads
    sends = 0
    runs_of_the_other_task: list[int] = []

    async def other_task() -> None:
        while True:
            runs_of_the_other_task.append(sends)
            await trio.lowlevel.checkpoint()

    async def sender() -> None:
        nonlocal sends
        for _ in range(total):
            await primary.send(Heartbeat())
            sends += 1
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        nursery.start_soon(other_task)
    # Each heartbeat is a few bytes: the socket takes every one without blocking.
    assert backup.unread() > 0
    # The other task runs once per pass of trio's loop, before or after the sender
    # (trio shuffles each pass's order), so between two of its runs, and from the
    # start and to the end, the sender made at most two stretches of sends; without
    # the yields it would make all of them at once.
    points = [0, *(count for count in runs_of_the_other_task if count < total), total]
    gaps = [later - earlier for earlier, later in itertools.pairwise(points)]
    assert max(gaps) <= 2 * _SENDS_BETWEEN_YIELDS, points


async def test_take_ready_hands_over_the_acks_in_the_socket_while_the_receiver_waits() -> None:
    primary, backup = await socket_linked()
    await primary.send(Entries([Entry(seq, seq, 1, seq, b"r") for seq in (1, 2)]))
    assert isinstance(await backup.next_event(), Entries)
    receiver = Receiver(primary)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver.run)
        await trio.testing.wait_all_tasks_blocked()
        await backup.send(Ack(1, 0))
        await backup.send(Ack(2, 0))
        # No checkpoint since: the receiver has not run, the acks are in the socket.
        assert primary.take_ready((Ack, Heartbeat)) == [Ack(1, 0), Ack(2, 0)]
        assert primary.take_ready((Ack, Heartbeat)) == []  # nothing more: nothing waits
        await backup.send(Heartbeat())
        await backup.aclose()
    assert receiver.events == [Heartbeat(), ConnectionClosed()]  # the acks came only once


async def test_an_event_take_ready_was_not_asked_for_wakes_the_receiver_in_order() -> None:
    primary, backup = await socket_linked()
    await primary.send(Entries([Entry(seq, seq, 1, seq, b"r") for seq in (1, 2)]))
    receiver = Receiver(primary)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver.run)
        await trio.testing.wait_all_tasks_blocked()
        await backup.send(Ack(1, 0))
        await backup.send(Heartbeat())
        await backup.send(Ack(2, 0))
        assert primary.take_ready((Ack,)) == [Ack(1, 0)]
        await trio.testing.wait_all_tasks_blocked()
        # The heartbeat, then the ack after it, reached the receiver with nothing new
        # in the socket: take_ready woke it.
        assert receiver.events == [Heartbeat(), Ack(2, 0)]
        await backup.aclose()
    assert receiver.events[-1] == ConnectionClosed()


async def test_take_ready_reads_nothing_unless_a_receiver_waits_on_an_empty_socket() -> None:
    primary, backup = await socket_linked()
    await primary.send(Entries([Entry(1, 1, 1, 1, b"r")]))
    await backup.send(Ack(1, 0))
    assert primary.take_ready((Ack,)) == []  # nobody waits: the bytes stay for next_event
    assert await primary.next_event() == Ack(1, 0)


async def test_a_peer_that_closes_or_breaks_the_protocol_is_reported_by_the_receiver() -> None:
    for misbehave in ("close", "garbage"):
        primary, backup = await socket_linked()
        receiver = Receiver(primary)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver.run)
            await trio.testing.wait_all_tasks_blocked()
            # Sync calls, no checkpoint: the receiver has not run when take_ready does.
            assert isinstance(backup.stream, trio.SocketStream)
            if misbehave == "close":
                backup.stream.socket.close()
                assert primary.take_ready((Ack,)) == []
            else:
                os.write(backup.stream.socket.fileno(), backup.channel.forge(b"\xc1 not msgpack"))
                with pytest.raises(RemoteProtocolError, match="malformed message"):
                    primary.take_ready((Ack,))  # the caller hears it first
        if misbehave == "close":
            assert receiver.events == [ConnectionClosed()]
        else:
            assert receiver.error is not None
            assert "malformed message" in str(receiver.error)


async def test_a_send_that_finds_the_channel_broken_reports_the_reason_the_peer_gave() -> None:
    primary, backup = await socket_linked()
    # Entries the backup has not read yet, then the primary lets it go, saying why.
    await primary.send(Entries([Entry(seq, seq, 1, seq, b"r") for seq in (1, 2, 3)]))
    await primary.refuse("let go: no word from the backup for 5s")
    with pytest.raises(trio.BrokenResourceError):
        await backup.send(Ack(3, 0))
    assert backup.why_broken() == (
        "the primary aborted the connection, saying: let go: no word from the backup for 5s"
    )


async def test_a_peer_that_closed_without_a_word_is_a_channel_broken_while_sending() -> None:
    primary, backup = await socket_linked()
    await primary.aclose()
    assert backup.why_broken() == "the log channel broke while sending"
    assert await backup.next_event() == ConnectionClosed()
    # Once the end has been seen the channel says so for ever: asked again, it still ends.
    assert backup.why_broken("sending the Handover") == (
        "the log channel broke while sending the Handover"
    )
