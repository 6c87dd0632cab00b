"""The shells' timing, in-process under trio's autojump clock.

Heartbeats, the peer timeout, the output rule and the arbiter's retry pacing,
driven through what ``Primary``, ``Backup`` and ``ReplicaShell`` expose, on
links over ``trio.testing.memory_stream_pair`` (the real handshake, channel and
replication core). Virtual time makes the intervals exact, so the assertions
are on the configured numbers themselves, and nothing here waits in real time.
"""

from __future__ import annotations

import dataclasses
import itertools
import select
from typing import Any

import pytest
import trio
import trio.testing
from support import free_port
from test_link import ARGV, HEADER, SECRET, linked

import arbiter
from ftproxy.core.channel import Ack, Entries, Handover, Heartbeat, Protected, SwitchoverOutcome
from ftproxy.core.records import Entry
from ftproxy.core.replication import ReplicaRole, Timing
from ftproxy.guest.protocol import KIND_CONNECT, KIND_WAIT, OP_SEND
from ftproxy.shell.backup import Backup
from ftproxy.shell.link import LogLink, join_primary
from ftproxy.shell.logstore import LogStore
from ftproxy.shell.primary import Primary
from ftproxy.shell.replica import ArbiterClient, ReplicaOptions, ReplicaShell
from ftproxy.shell.supervisor import Exit

TIMING = Timing(heartbeat_s=0.05, peer_timeout_s=0.5)


def options(arbiter_port: int = 9) -> ReplicaOptions:
    return ReplicaOptions(
        argv=ARGV,
        arbiter=arbiter.BuiltinArbiter(("127.0.0.1", arbiter_port), None),
        secret=None,
        timing=TIMING,
    )


async def arrivals(link: LogLink, kind: type, until: float) -> list[float]:
    """When each message of ``kind`` arrived on ``link``, until virtual time ``until``."""
    times: list[float] = []
    with trio.move_on_at(until):
        while True:
            if isinstance(await link.next_event(), kind):
                times.append(trio.current_time())
    return times


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


async def test_an_idle_primary_heartbeats_at_the_configured_interval(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary_link, backup_link, _ = await linked()
    primary = Primary(options(), HEADER, primary_link, LogStore(HEADER))
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(primary.ship, primary_link)
        times = await arrivals(backup_link, Heartbeat, start + 20 * TIMING.heartbeat_s + 0.001)
        nursery.cancel_scope.cancel()
    assert len(times) == 20
    assert gaps(times) == pytest.approx([TIMING.heartbeat_s] * 19)


async def test_an_idle_backup_heartbeats_at_the_configured_interval(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary_link, backup_link, welcome = await linked()
    backup = Backup(options(), backup_link, welcome, LogStore(HEADER))
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backup.send_acks)
        times = await arrivals(primary_link, Heartbeat, start + 20 * TIMING.heartbeat_s + 0.001)
        nursery.cancel_scope.cancel()
    assert len(times) == 20
    assert gaps(times) == pytest.approx([TIMING.heartbeat_s] * 19)


async def heard_from(shell: ReplicaShell, link: LogLink) -> None:
    """The receiving task's part in liveness: whatever arrives is word from the peer."""
    while True:
        await link.next_event()
        shell.replica.heard(trio.current_time())


async def test_a_heartbeating_peer_stays_alive_and_a_silent_one_dies_after_the_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary_link, backup_link, welcome = await linked()
    primary = Primary(options(), HEADER, primary_link, LogStore(HEADER))
    backup = Backup(options(), backup_link, welcome, LogStore(HEADER))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(primary.ship, primary_link)  # its own heartbeats: the watch's
        nursery.start_soon(primary.watch)  # other deadline
        nursery.start_soon(heard_from, primary, primary_link)
        nursery.start_soon(heard_from, backup, backup_link)
        async with trio.open_nursery() as heartbeats:
            heartbeats.start_soon(backup.send_acks)
            await trio.sleep(20 * TIMING.peer_timeout_s)
            assert not primary.peer_gone.is_set(), primary.board.peer_lost_reason
            heartbeats.cancel_scope.cancel()  # the backup falls silent (its link stays open)
        last_heard = primary.replica.last_heard
        await primary.peer_gone.wait()
        nursery.cancel_scope.cancel()
    assert primary.replica.role is ReplicaRole.PRIMARY  # the shell reports; arbitrating is run()'s
    assert primary.peer_lost_at == pytest.approx(last_heard + TIMING.peer_timeout_s)
    assert primary.board.peer_lost_reason == f"no word from the backup for {TIMING.peer_timeout_s}s"


async def test_frames_waiting_unread_at_the_deadline_are_read_before_the_silence_is_judged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The stopped-replica case of tests/test_watch.py, with virtual time: the clock
    jumps past the deadline while a heartbeat waits unread in the socket."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        client = await trio.testing.open_stream_to_socket_listener(listener)
        server = await listener.accept()
        primary_link, backup_link, _ = await linked((server, client))
    primary = Primary(options(), HEADER, primary_link, LogStore(HEADER))
    read = trio.Event()
    dead_before_read: list[bool] = []

    async def receive() -> None:
        await primary_link.next_event()
        dead_before_read.append(primary.peer_gone.is_set())
        primary.replica.heard(trio.current_time())
        read.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        nursery.start_soon(primary.watch)
        await trio.testing.wait_all_tasks_blocked()
        # Put the frame in the kernel's buffer without a checkpoint, then jump past
        # the deadline: both tasks wake in the same pass, the watcher perhaps first.
        assert backup_link.send_now(Heartbeat()) and not backup_link.pending
        autojump_clock.jump(TIMING.peer_timeout_s * 1.5)
        await read.wait()
        assert not primary.peer_gone.is_set()
        nursery.cancel_scope.cancel()
    await primary_link.aclose()
    await backup_link.aclose()
    assert dead_before_read == [False]


class ReleasedOutputs:
    """What the primary's world is told to send, and when (the world itself runs a guest's
    front: here only its output side is recorded)."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, tuple[Any, ...]]] = []

    def output_later(self, message: tuple[Any, ...]) -> None:
        self.sent.append((trio.current_time(), message))

    apply_output = output_later

    def flush_outputs(self) -> None:
        pass


async def test_a_primary_releases_an_output_only_after_the_ack_for_its_entry(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary_link, backup_link, _ = await linked()
    primary = Primary(options(), HEADER, primary_link, LogStore(HEADER))
    world = ReleasedOutputs()
    primary.world = world  # type: ignore[assignment]
    entry = Entry(1, 1000, 1, 7, b"reply")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(primary.ship, primary_link)
        nursery.start_soon(primary.receive, primary_link)
        nursery.start_soon(primary.watch)
        primary._logged(entry)  # the supervisor logs the exit's entry (then ships it) ...
        primary.output(1, (OP_SEND, 3, b"after entry 1"))  # ... and the guest writes
        assert world.sent == []
        event = await backup_link.next_event()
        while not isinstance(event, Entries):
            event = await backup_link.next_event()
        assert event.entries == [entry]
        await trio.sleep(TIMING.peer_timeout_s / 2)  # the backup holds it, says nothing
        assert world.sent == []
        acked_at = trio.current_time()
        await backup_link.send(Ack(1, 0))
        with trio.fail_after(TIMING.heartbeat_s):
            while not world.sent:
                await trio.sleep(0)
        primary.output(1, (OP_SEND, 3, b"also after entry 1"))  # its entry is acked: at once
        nursery.cancel_scope.cancel()
    assert world.sent == [
        (acked_at, (OP_SEND, 3, b"after entry 1")),
        (acked_at, (OP_SEND, 3, b"also after entry 1")),
    ]


class AnsweringWorld(ReleasedOutputs):
    """Answers every exit at once and logs its entry, noting how many outputs had been
    sent when it was asked."""

    def __init__(self, primary: Primary) -> None:
        super().__init__()
        self.primary = primary
        self.sent_when_asked: list[int] = []

    async def answer(self, seq: int, exit: Exit) -> bytes:
        self.sent_when_asked.append(len(self.sent))
        body = b"reply %d" % seq
        self.primary._logged(Entry(seq, exit.icount, exit.kind, exit.digest, body))
        return body


async def test_a_held_output_goes_out_from_the_next_exit_once_its_ack_is_in_the_socket() -> None:
    # The backup's ack is often in the socket before the guest's output is taken: the
    # exit that follows the output releases it, without a pass of trio's loop for the
    # receiving task (and so does the end of a frame without an exit).
    primary_end, backup_end = trio.socket.socketpair()
    primary_link, backup_link, _ = await linked(
        (trio.SocketStream(primary_end), trio.SocketStream(backup_end))
    )
    primary = Primary(options(), HEADER, primary_link, LogStore(HEADER))
    world = AnsweringWorld(primary)
    primary.world = world  # type: ignore[assignment]

    async def held_output_acked(seq: int) -> None:
        """Entry ``seq`` reaches the backup, an output follows it, its ack is in the socket."""
        assert await backup_link.next_event() == Entries([primary.store.entries[seq - 1]])
        await trio.testing.wait_all_tasks_blocked()  # the receiving task waits
        primary.output(seq, (OP_SEND, 3, b"out %d" % seq))
        await backup_link.send(Ack(seq, 0))  # into the socket, with no checkpoint
        assert len(world.sent) == seq - 1  # held

    async with trio.open_nursery() as nursery:
        nursery.start_soon(primary.receive, primary_link)
        await primary.answer(1, Exit(100, KIND_WAIT, (), 1))  # logs and ships entry 1
        await held_output_acked(1)
        await primary.answer(2, Exit(200, KIND_WAIT, (), 2))  # the guest's next exit
        assert world.sent_when_asked == [0, 1]  # released before the world was asked
        await held_output_acked(2)
        primary.flush()  # a frame of outputs alone ends
        assert len(world.sent) == 2
        nursery.cancel_scope.cancel()
    assert [message for _, message in world.sent] == [
        (OP_SEND, 3, b"out 1"),
        (OP_SEND, 3, b"out 2"),
    ]
    assert primary.replica.received == 2


async def test_a_reprotected_primary_ships_from_the_exit_and_measures_the_round_trip() -> None:
    # A live replica protected again by a later backup ships what an exit logged from
    # that exit, as the first pair's primary does (not a pass of trio's loop later, when
    # its ship task would wake), and each batch's ack is a log round trip in /status.
    primary = Primary(
        dataclasses.replace(options(), secret=SECRET, log_listen=("127.0.0.1", 0)),
        HEADER,
        None,
        LogStore(HEADER),
    )
    world = AnsweringWorld(primary)
    primary.world = world  # type: ignore[assignment]
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(primary.reprotect, listeners)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        backup_link, welcome = await join_primary(stream, SECRET, ARGV)
        assert welcome.generation == primary.options.generation + 1
        await backup_link.send(Ack(0, 0))  # holds all of the (empty) log: caught up
        with trio.fail_after(5):
            while not isinstance(await backup_link.next_event(), Protected):
                pass
        await primary.answer(1, Exit(100, KIND_WAIT, (), 1))  # logs entry 1
        # Blocking: no trio task runs meanwhile, so what arrives came from the exit.
        readable, _, _ = select.select([stream.socket.fileno()], [], [], 5.0)
        assert readable, "entry 1 was not sent by the exit that logged it"
        assert await backup_link.next_event() == Entries([primary.store.entries[0]])
        assert primary.board.channel_rtt_ms.summary()["samples"] == 0
        lags = primary.board.lag_ms.summary()["samples"]  # one per ack
        await backup_link.send(Ack(1, 1))
        with trio.fail_after(5):
            while primary.replica.received < 1:
                await trio.sleep(0)
        assert primary.board.channel_rtt_ms.summary()["samples"] == 1
        assert primary.board.lag_ms.summary()["samples"] == lags + 1
        nursery.cancel_scope.cancel()


class SlowConnect(ReleasedOutputs):
    """A world whose connect takes until ``connected`` is set, then logs its entry (as
    the real world does once the peer answers); other exits are answered at once."""

    def __init__(self, primary: Primary) -> None:
        super().__init__()
        self.primary = primary
        self.connect_started = trio.Event()
        self.connected = trio.Event()

    async def answer(self, seq: int, exit: Exit) -> bytes:
        if exit.kind == KIND_CONNECT:
            self.connect_started.set()
            await self.connected.wait()
        body = b"reply %d" % seq
        self.primary._logged(Entry(seq, exit.icount, exit.kind, exit.digest, body))
        return body


async def test_an_entry_logged_by_an_exit_under_way_when_a_switchover_starts_is_drained(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The switchover holds the guest at its next exit, but the one under way finishes
    # and logs an entry while the primary is handing over: that entry must still go
    # to the backup, or the drain waits for an ack that cannot come.
    primary_link, backup_link, _ = await linked()
    primary = Primary(options(), HEADER, primary_link, LogStore(HEADER))
    world = SlowConnect(primary)
    primary.world = world  # type: ignore[assignment]
    outcomes: list[SwitchoverOutcome] = []

    async def switch_over() -> None:
        outcomes.append(await primary.switchover.ask())

    async def guest() -> None:
        await primary.answer(1, Exit(100, KIND_CONNECT, (), 0))
        await primary.answer(2, Exit(200, KIND_WAIT, (), 0))  # held here: never answered

    async with trio.open_nursery() as nursery:
        primary.switchover.nursery = nursery
        nursery.start_soon(primary.ship, primary_link)
        nursery.start_soon(primary.receive, primary_link)
        nursery.start_soon(primary.watch)
        nursery.start_soon(guest)
        await world.connect_started.wait()
        nursery.start_soon(switch_over)
        while primary.replica.role is not ReplicaRole.HANDING_OVER:
            await trio.sleep(0)
        world.connected.set()
        with trio.fail_after(TIMING.peer_timeout_s):
            event = await backup_link.next_event()
            while not isinstance(event, Entries):
                event = await backup_link.next_event()
        assert [entry.seq for entry in event.entries] == [1]
        await backup_link.send(Ack(1, 1))
        with trio.fail_after(TIMING.peer_timeout_s):
            event = await backup_link.next_event()
            while not isinstance(event, Handover):
                event = await backup_link.next_event()
        assert (event.seq, event.icount, event.kind) == (1, 200, KIND_WAIT)
        assert primary.replica.role is ReplicaRole.RETIRING
        nursery.cancel_scope.cancel()
    assert outcomes == []  # no HandedOver came: the outcome is still open


async def test_arbiter_questions_to_a_stopped_arbiter_are_paced_by_the_timing(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A real connection refused by a port nobody listens on, asked again and again."""
    client = ArbiterClient(options(free_port()), "backup")
    timing = client.timing
    asked: list[float] = []
    real = client.address

    class Counting:
        kind, describe = real.kind, real.describe

        async def test_and_set(self, key: str, candidate: str) -> arbiter.Decision:
            asked.append(trio.current_time())
            return await real.test_and_set(key, candidate)

    client.address = Counting()  # type: ignore[assignment]
    start = trio.current_time()
    with trio.move_on_after(10 * timing.max_backoff_s):
        await client.test_and_set()
    assert client.state == "unreachable"
    pauses = gaps([start, *asked])[1:]
    expected = [min(timing.first_backoff_s * 2**n, timing.max_backoff_s) for n in range(4)]
    assert pauses[:4] == pytest.approx(expected, abs=1e-3)
    assert pauses[4:] == pytest.approx([timing.max_backoff_s] * len(pauses[4:]), abs=1e-3)
