"""The backup: replay mode fed by the log channel, and go-live when the primary dies.

Entries are acknowledged on receipt (not after replay), so the primary's
outputs wait only for the network. The guest replays behind, answered from the
received entries and checked against them. When the primary falls silent, the
backup replays everything it holds, then asks the arbiter; if it wins it goes
live: the guest's next exit is answered from the world (it cannot tell), the
service addresses are bound here, connection ids continue from the log's, and
every connection the guest held reads as reset, as a logged input (see
``ftproxy.shell.takeover``).

A backup may go live only once its primary said ``Protected``: a backup that
joined a live replica (re-protection) and loses it while still catching up
halts, since it lacks what that replica released alone. Once live, it takes
the next backup on its ``--log-listen`` (``ftproxy.shell.reprotect``).

A planned switchover ends the same way: the primary, its guest held, sends
``Handover`` once this backup holds and has replayed every entry; the guest
reaches the exit the primary's waits at (checked like ``Waiting``), the backup
claims the pair through the arbiter as at a failover, says ``HandedOver``, and
goes live there. The old primary then exits and frees the service address.
Once live and protected again by a backup of its own, this replica hands over
the same way, as any primary does (``ftproxy.shell.handover``), and retires.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import sys
from collections import deque
from typing import Any

import structlog
import trio

from ftproxy.core.channel import (
    Ack,
    ConnectionClosed,
    Diverged,
    Entries,
    HandedOver,
    Handover,
    Heartbeat,
    Protected,
    RecordedOutputs,
    RemoteProtocolError,
    Waiting,
    Welcome,
)
from ftproxy.core.records import Entry, Header, Output
from ftproxy.core.replication import Event, ReplicaRole
from ftproxy.guest import _trace
from ftproxy.shell.admin import admin_endpoint
from ftproxy.shell.arbiter_client import ArbiterClient
from ftproxy.shell.checks import check_data_dir, check_program
from ftproxy.shell.exits import (
    EXIT_DIVERGED,
    EXIT_FAILED,
    EXIT_HALTED,
    EXIT_OK,
    EXIT_USAGE,
    Halted,
    Retired,
)
from ftproxy.shell.fence import Fencer
from ftproxy.shell.front import PacketConfig, format_mac
from ftproxy.shell.guestproc import GuestProcess, start_guest
from ftproxy.shell.handover import PlannedSwitchover
from ftproxy.shell.hooks import RoleHooks, role_hooks
from ftproxy.shell.link import LinkRefused, LogLink, join_primary, peer_failure
from ftproxy.shell.logstore import DataDirError, LogStore, open_data_dir
from ftproxy.shell.options import ReplicaOptions
from ftproxy.shell.replay import check_entry, first_difference
from ftproxy.shell.replica import ReplicaShell
from ftproxy.shell.reprotect import Reprotector, throttle_for_catch_up
from ftproxy.shell.startfiles import start_files_problem
from ftproxy.shell.status import StatusBoard
from ftproxy.shell.supervisor import Divergence, Exit, GuestFailure, Supervisor
from ftproxy.shell.sync import Doorbell
from ftproxy.shell.takeover import TakeoverState
from ftproxy.shell.world import Front, WorldAnswers, open_front, output_record

log = structlog.get_logger()

TAKEOVER_BIND_RETRY_S = 0.1
# How long a diverged backup waits for the primary's outputs to compare with its own.
RECORDED_OUTPUTS_WAIT_S = 2.0
FENCE_AFTER_S = 0.2  # how long the address may stay held before its holder is fenced
FENCE_GRACE_S = 1.0  # how long a fenced primary's address may take to come free
REPLAY_ACK_INTERVAL_S = 0.001
# A caught-up backup replays in batches: the first entry after a pause waits
# this long for others (or for a batch of REPLAY_BATCH_ENTRIES) before its guest
# runs, so one wake-up of the guest and of this loop replays many entries instead
# of each entry costing both on a machine the primary shares. Entries are acked
# on receipt, never delayed: only replay lags, by at most this.
REPLAY_DELAY_S = float(os.environ.get("FTPROXY_REPLAY_DELAY_US", "10000")) / 1e6
REPLAY_BATCH_ENTRIES = 64


class Backup(ReplicaShell):
    """The backup's state and tasks around one guest and one primary."""

    def __init__(
        self,
        options: ReplicaOptions,
        link: LogLink,
        welcome: Welcome,
        store: LogStore,
        board: StatusBoard | None = None,
        hooks: RoleHooks | None = None,
    ) -> None:
        super().__init__(options, ReplicaRole.BACKUP, link, board, hooks)
        self.welcome = welcome
        self.store = store
        self.went_live = trio.Event()
        self._flow = Doorbell()  # acks of our own backup, once live: input flow control
        # Live, with --log-listen: what takes later backups and ships them the log.
        self._serving_joiners: Reprotector | None = None
        # Once live and protected again: planned switchovers, as any primary's.
        self.switchover = PlannedSwitchover(
            replica=self.replica,
            acked=self._flow,
            board=self.board,
            role_changed=self.role_changed,
            bound_log=self.log,
        )
        self.board.log_store = store.status
        self.board.protection = lambda: (
            self.protected and not self.peer_gone.is_set() and store.on_disk
        )
        self._entries: deque[Entry] = deque()
        self._first_arrival = 0.0  # when the oldest entry in _entries arrived
        self._replaying = False  # a batch was gathered and is being replayed
        self._arrived = Doorbell()
        self._ack_due = Doorbell()
        self._acked = (0, 0)  # the (received, replayed) the last ack said
        self._takeover = TakeoverState(welcome.header.policy.clock_step_ns)
        # The replaying guest's outputs since its last replayed entry: what a
        # divergence at the next entry compares with the primary's.
        self._since_entry: list[Output] = []
        self._recorded: RecordedOutputs | None = None
        self._recorded_arrived = trio.Event()
        self._primary_waiting: Waiting | None = None
        # A planned switchover: the primary said no entry comes after this one.
        self._handover: Handover | None = None
        self._handed_over = False  # HandedOver said: the old primary goes away by itself
        self.world: WorldAnswers | None = None
        self.nursery: trio.Nursery | None = None
        self.guest_pid = 0
        self.fencer = Fencer(options.fence, welcome.primary)
        self.board.address_busy = lambda: sorted(self.fencer.busy)

    # -- the supervisor's mode --------------------------------------------------

    async def answer(self, seq: int, exit: Exit) -> bytes:
        self.board.counters["exits_total"] += 1
        if self.world is None:
            while not self._entries and not self.peer_gone.is_set() and self._handover is None:
                waiting = self._primary_waiting
                if waiting is not None and waiting.seq == seq:
                    # Where the primary's guest waits: check it before the entry comes.
                    check_entry(
                        seq, Entry(seq, waiting.icount, waiting.kind, waiting.digest, b""), exit
                    )
                    self._primary_waiting = None
                await self._arrived.wait()
            if not self._replaying:
                await self._gather_batch()  # once per batch: the rest of it goes at once
                self._replaying = True
            if self.peer_gone.is_set() and not self.protected:
                raise Halted(self._unprotected())
            if self._entries:
                entry = self._entries.popleft()
                self._replaying = bool(self._entries)
                check_entry(seq, entry, exit)
                # Stored as replayed, not as received: on disk, each output then
                # follows the entry it came after, as ``ftproxy replay`` reads it.
                self.store.append_entry(entry)
                self._since_entry.clear()
                self._takeover.follow_entry(exit, entry)
                self.replica.entry_replayed(entry.seq)
                self._ack_due.ring()
                return entry.reply
            if self._handover is not None:
                self._check_handover_point(seq, exit)
            await self.take_over()
        assert self.world is not None
        joiners = self._serving_joiners
        if joiners is None:
            return await self.switchover.answer(seq, exit, self.world)
        self.take_ready_acks()
        body = await self.switchover.answer(seq, exit, self.world)
        joiners.ship_now()  # what this exit logged, to this live replica's own backup
        return body

    async def _gather_batch(self) -> None:
        """Entries are here, but few and fresh: wait a little for more (REPLAY_DELAY_S)."""
        deadline = self._first_arrival + REPLAY_DELAY_S
        while (
            0 < len(self._entries) < REPLAY_BATCH_ENTRIES
            and not self.peer_gone.is_set()
            and self._handover is None
            and trio.current_time() < deadline
        ):
            with trio.move_on_at(deadline):
                await self._arrived.wait()

    def reply_ahead(self, seq: int) -> Entry | None:
        """The entry that will answer exit ``seq``, if it is here already (the
        supervisor writes its reply ahead of the guest's request)."""
        entries = self._entries
        if self.world is not None or not entries:
            return None
        index = seq - entries[0].seq
        return entries[index] if 0 <= index < len(entries) else None

    def output(self, seq: int, message: tuple[Any, ...]) -> None:
        self.board.counters["outputs_total"] += 1
        record = output_record(seq, message)  # one per output: the disk log's and the check's
        self.store.append_output(record)
        if self.world is not None:
            # Live: at once; primary of a later generation: once our backup holds the log.
            self.gate_output(self.world, seq, message)
        else:
            self._since_entry.append(record)
            self._takeover.follow_output(message)

    def flush(self) -> None:
        if self.world is not None:
            self.take_ready_acks()
            self.world.flush_outputs()

    def _read_ready_acks(self) -> None:
        """Live and protected again: the acks already in the joiner's channel."""
        if self._serving_joiners is not None:
            self._serving_joiners.take_ready_acks()

    # -- the log channel --------------------------------------------------------

    async def receive(self) -> None:
        while True:
            try:
                event = await self.joined.next_event()
            except RemoteProtocolError as exc:
                self.lose_peer(peer_failure("the primary", exc))
                return
            now = trio.current_time()
            if isinstance(event, Entries):
                if event.entries:
                    if _trace.stamp is not None:
                        _trace.stamp(_trace.BACKUP_RECEIVED, event.entries[-1].seq)
                    entries = self._entries
                    if not entries:
                        self._first_arrival = now
                    entries.extend(event.entries)
                    self.replica.entries_received(event.entries[-1].seq, now)
                    # Acked from here, not by waking send_acks: the primary's
                    # held outputs wait for this, one task wake-up sooner.
                    if not await self._ack():
                        return
                    # The replay wakes for the first entry after a pause (to start
                    # its batch) and for a full batch, not for each entry.
                    if len(entries) == len(event.entries) or len(entries) >= REPLAY_BATCH_ENTRIES:
                        self._arrived.ring()
                else:
                    self.replica.heard(now)
            elif isinstance(event, Heartbeat):
                self.replica.heard(now)
            elif isinstance(event, Waiting):
                self.replica.heard(now)
                self._primary_waiting = event
                self._arrived.ring()
            elif isinstance(event, RecordedOutputs):
                self._recorded = event
                self._recorded_arrived.set()
            elif isinstance(event, Handover):
                self._handover_received(event, now)
            elif isinstance(event, Protected):
                self.replica.heard(now)
                self.replica.protection_received()
                self.log.info("backup_protected", generation=event.generation, seq=event.seq)
            elif isinstance(event, ConnectionClosed):
                self.lose_peer("the primary closed the log channel")
                return

    @property
    def protected(self) -> bool:
        """Told by the primary that this backup holds its whole log: only then may it
        go live (the core keeps it: it also sets how long the primary may be silent)."""
        return not self.replica.awaiting_protection

    def _unprotected(self) -> str:
        # The live replica may have died, or let this backup go (for its silence,
        # say): from here the two look the same, so both are said, with what we saw.
        return (
            f"the live replica was lost, or let this backup go, while this backup was "
            f"catching up ({self.board.peer_lost_reason or 'the log channel ended'}; it had "
            f"received {self.replica.received} entries), before the pair was protected under "
            f"generation {self.options.generation}: this backup lacks what that replica "
            "released alone, so it cannot go live; it halts and sends nothing"
        )

    async def _ack(self) -> bool:
        """Say what is received and replayed, unless the last ack said it; False if the
        channel broke."""
        current = (self.replica.received, self.replica.replayed)
        if current == self._acked:
            return True
        sent = await self._send(Ack(*current), current)
        if _trace.stamp is not None:
            _trace.stamp(_trace.ACK_SENT, current[0])
        return sent

    async def _send(self, message: Ack | Heartbeat, state: tuple[int, int]) -> bool:
        try:
            await self.joined.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.lose_peer(self.joined.why_broken())
            return False
        # Both tasks send: one may have said more meanwhile (both counts only grow).
        self._acked = (max(self._acked[0], state[0]), max(self._acked[1], state[1]))
        self.replica.sent(trio.current_time())
        return True

    async def send_acks(self) -> None:
        """Acknowledge replay progress (coalesced), and heartbeat when there is nothing
        to say. Receipt is acknowledged by ``receive`` itself."""
        timing = self.options.timing
        while True:
            if (self.replica.received, self.replica.replayed) == self._acked:
                with trio.move_on_at(self.replica.last_sent + timing.heartbeat_s):
                    await self._ack_due.wait()
            current = (self.replica.received, self.replica.replayed)
            if current != self._acked and current[0] == self._acked[0]:
                # Replay progress only: one ack per millisecond, not one per entry (a
                # catch-up replays thousands a second, and a send each halved its pace).
                await trio.sleep(REPLAY_ACK_INTERVAL_S)
                current = (self.replica.received, self.replica.replayed)
            if current != self._acked:
                sent = await self._send(Ack(*current), current)
            else:
                sent = await self._send(Heartbeat(), current)
            if not sent:
                return

    @property
    def joined(self) -> LogLink:
        """The log channel this backup joined through (the backup never drops it early)."""
        assert self.link is not None
        return self.link

    def peer_lost(self) -> None:
        self._arrived.ring()  # a guest waiting for entries must now take over
        self._recorded_arrived.set()  # nobody will answer a divergence now

    async def compare_with_primary(self, divergence: Divergence) -> None:
        """Tell the primary this backup diverged (so it goes on alone, knowing why),
        and put in the report where the two guests' outputs first differ."""
        self.board.counters["divergences_total"] += 1
        if self.peer_gone.is_set():
            return
        try:
            await self.joined.send(
                Diverged(divergence.seq, divergence.icount, divergence.report(), self._since_entry)
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        with trio.move_on_after(RECORDED_OUTPUTS_WAIT_S):
            await self._recorded_arrived.wait()
        if self._recorded is None:
            divergence.difference = "(the primary did not send its outputs to compare)"
            return
        divergence.difference = first_difference(self._recorded.outputs, self._since_entry) or (
            f"the outputs after entry {self._recorded.seq} are equal on both sides"
        )

    async def run_channel(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.receive)
            nursery.start_soon(self.send_acks)
            nursery.start_soon(self.watch)
            await self.peer_gone.wait()
            nursery.cancel_scope.cancel()
        await self.joined.aclose()

    # -- go-live ----------------------------------------------------------------

    async def take_over(self) -> None:
        """Everything received is replayed: ask the arbiter, then serve or halt."""
        if not self.protected:
            raise Halted(self._unprotected())
        if self._handover is not None and not self.peer_gone.is_set():
            self.replica.handover_received()
        else:
            self.replica.handle(Event.PEER_LOST)
        self.log.info("role_changed", to="arbitrating", replayed=self.replica.replayed)
        if not await self.arbiter.test_and_set():
            self.replica.lost()
            self.log.error("role_changed", to="halted")
            self.role_changed("halted", "the primary won the arbiter: it goes on alone")
            raise Halted("the primary won the arbiter: it goes on alone")
        self.replica.won()
        assert self.nursery is not None
        doorbell = Doorbell()
        front = open_front(self.nursery, doorbell, self.options.address_map, self.options.packet)
        packet = self.options.packet
        world = WorldAnswers(
            front,
            doorbell,
            # The guest runs with the primary's policy (its boot reply), whatever our flags say.
            self.welcome.header.policy,
            self.guest_pid,
            self._logged_live,
            # The guest may not have booted yet: its boot must name the same network.
            network=packet.network if packet is not None else None,
            input_allowed=self._input_allowed,
        )
        self.board.input_bytes = lambda: front.input_bytes
        self.board.front = front.status
        takeover = self._takeover
        world.clock.continue_from(takeover.clock)
        # Before any new connection: ids go on from the log's, and the
        # connections the old primary's sockets carried read as reset (socket
        # mode; in packet mode the guest holds no such connection or binding).
        front.inherit(takeover.held, takeover.next_accepted)
        if takeover.held:
            self.log.info(
                "connections_reset",
                count=sum(not told for told in takeover.held.values()),
                next_id=takeover.next_accepted,
            )
        handed = self._handover is not None and await self._say_handed_over()
        for sock, (family, kind, address, backlog) in takeover.bound.items():
            await _bind_for_takeover(
                front,
                sock,
                family,
                kind,
                address,
                backlog,
                self.log,
                # Handed over, the old primary frees the address as it exits: no fencing.
                None if handed else self.fencer,
            )
        self.world = world
        if handed:
            self.log.info(
                "role_changed", to="live", entries_replayed=self.replica.replayed, switchover=True
            )
            self.role_changed("live", "the primary handed the service over (switchover)")
        else:
            self.went_alone()
            self.log.info("role_changed", to="live", entries_replayed=self.replica.replayed)
            self.role_changed("live", "the primary was lost; this backup won the arbiter")
        self.went_live.set()

    # -- a planned switchover -----------------------------------------------------

    def _handover_received(self, handover: Handover, now: float) -> None:
        self.replica.heard(now)
        if handover.seq != self.replica.received:
            self.lose_peer(
                f"the primary handed over at entry {handover.seq}, but this backup holds "
                f"{self.replica.received}"
            )
            return
        self.log.info("handover_received", seq=handover.seq, icount=handover.icount)
        self._handover = handover
        self._arrived.ring()

    def _check_handover_point(self, seq: int, exit: Exit) -> None:
        """Our guest waits where the primary's was held: the same exit, the same outputs."""
        handover = self._handover
        assert handover is not None
        check_entry(seq, Entry(seq, handover.icount, handover.kind, handover.digest, b""), exit)

    async def _say_handed_over(self) -> bool:
        """Won the pair at a switchover: tell the old primary, which then exits (False
        if it is gone already: then it is a failover like any other)."""
        assert self._handover is not None
        try:
            await self.joined.send(HandedOver(self.options.generation, self._handover.seq))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self._handed_over = True
        self.log.info("handed_over_said", seq=self._handover.seq)
        return True

    def lose_peer(self, reason: str) -> None:
        if self._handed_over and not self.peer_gone.is_set():
            # The old primary leaves once told HandedOver: not a loss.
            self.board.peer_state = "handed_over"
            self.peer_gone.set()
            self.peer_lost()
            return
        super().lose_peer(reason)

    def _logged_live(self, entry: Entry) -> None:
        """Live, this replica logs what its guest gets, for the next backup to catch up."""
        self.replica.entry_logged(entry.seq, len(entry.reply), trio.current_time())
        self.board.counters["log_bytes_total"] += len(entry.reply)
        self.store.append_entry(entry)

    async def _input_allowed(self) -> None:
        """As a primary again (after re-protection): no new input while our backup lags."""
        if self.replica.lag_exceeded(trio.current_time()) and self.world is not None:
            self.world.flush_outputs()
        while self.replica.lag_exceeded(trio.current_time()):
            with trio.move_on_after(self.options.timing.heartbeat_s):
                await self._flow.wait()
        await throttle_for_catch_up(self.replica, self._flow)

    async def reprotect(self) -> None:
        """Once live, take the next backup on --log-listen (if given), again and again."""
        await self.went_live.wait()
        if self.options.log_listen is None:
            return
        assert self.world is not None
        reprotector = Reprotector(
            options=self.options,
            header=self.welcome.header,
            replica=self.replica,
            store=self.store,
            arbiter=self.arbiter,
            board=self.board,
            release=self.world.apply_output,
            on_ack=self._flow.ring,
            bound_log=self.log,
            role_changed=self.role_changed,
            switchover=self.switchover,
        )
        self._serving_joiners = reprotector
        await reprotector.run()


async def _bind_for_takeover(
    front: Front,
    sock: int,
    family: int,
    kind: int,
    address: tuple[Any, ...],
    backlog: int | None,
    bound_log: Any,
    fencer: Fencer | None = None,
) -> None:
    """Bind the guest's address here; while the old primary still holds it, fence it
    (same host, ``--fence kill``) or report the address busy and keep trying."""
    reported = False
    busy_since: float | None = None
    fenced_at: float | None = None
    may_fence = fencer is not None and fencer.mode == "kill" and not fencer.fenced
    shown = ":".join(str(part) for part in address[:2])
    while True:
        code, _ = front.bind(sock, family, kind, address)
        if code == 0 and backlog is not None:
            code = front.listen(sock, backlog)
        if code == 0:
            bound_log.info("address_taken_over", address=address)
            if fencer is not None:
                fencer.busy.discard(shown)
            return
        if code != errno.EADDRINUSE:
            bound_log.error("takeover_bind_failed", address=address, error=errno.errorcode[code])
            return
        now = trio.current_time()
        busy_since = now if busy_since is None else busy_since
        # An old primary that lost the arbiter lets go by itself, at once: fence only
        # one that does not (stopped, hung), and only once.
        if may_fence and fencer is not None and now - busy_since >= FENCE_AFTER_S:
            may_fence = False
            if fencer.fence(shown) is not None:
                fenced_at = now
        fencing = may_fence or (fenced_at is not None and now - fenced_at < FENCE_GRACE_S)
        if fencing:
            await trio.sleep(TAKEOVER_BIND_RETRY_S / 10)  # the kernel frees it as the holder dies
            continue
        if not reported:
            bound_log.warning("address_busy", address=address, retrying_every=TAKEOVER_BIND_RETRY_S)
            if fencer is not None:
                fencer.busy.add(shown)
            reported = True
        await trio.sleep(TAKEOVER_BIND_RETRY_S)


async def connect_to_primary(
    options: ReplicaOptions, primary: tuple[str, int]
) -> tuple[LogLink, Welcome]:
    """Connect and join, retrying while the primary is not up yet or does not finish
    the opening (it may be busy, or shedding a flood); a refusal is final."""
    reported = False
    address = f"{primary[0]}:{primary[1]}"
    while True:
        try:
            stream = await trio.open_tcp_stream(*primary)
        except OSError as exc:
            if not reported:
                log.info("primary_unreachable", address=address, error=str(exc))
                reported = True
            await trio.sleep(0.2)
            continue
        try:
            return await join_primary(stream, options.secret, options.argv)
        except LinkRefused as exc:
            if not exc.retry:
                raise
            log.warning("primary_opening_unfinished", address=address, reason=str(exc))
            await trio.sleep(0.2)


async def serve_backup(options: ReplicaOptions, primary_address: tuple[str, int]) -> int:
    """Join the primary, replay behind it, take over when it dies; return the exit code.

    The script and the admin port are checked first (StartupError); the admin
    endpoint answers from then on.
    """
    check_program(options.argv, options.workdir)
    check_data_dir(options.data_dir)
    board = StatusBoard(options, ArbiterClient(options, "backup"), role_override="joining")
    hooks_running = role_hooks(options.on_role_change, options.hook_timeout_s, options.pair)
    async with admin_endpoint(options, board), hooks_running as hooks:
        return await _serve_backup(options, primary_address, board, hooks)


async def serve_joined(options: ReplicaOptions, link: LogLink, welcome: Welcome) -> int:
    """``ftproxy run``'s backup: it joined through ``link``; the admin endpoint and the
    hooks as ``serve_backup`` has them (the node checked the flags at start)."""
    board = StatusBoard(options, ArbiterClient(options, "backup"), role_override="joining")
    hooks_running = role_hooks(options.on_role_change, options.hook_timeout_s, options.pair)
    async with admin_endpoint(options, board), hooks_running as hooks:
        return await serve_joined_backup(options, link, welcome, board, hooks)


async def _serve_backup(
    options: ReplicaOptions,
    primary_address: tuple[str, int],
    board: StatusBoard,
    hooks: RoleHooks,
) -> int:
    try:
        link, welcome = await connect_to_primary(options, primary_address)
    except LinkRefused as exc:
        log.error("replica_refused", role="backup", reason=str(exc))
        return EXIT_HALTED
    return await serve_joined_backup(options, link, welcome, board, hooks)


async def serve_joined_backup(
    options: ReplicaOptions,
    link: LogLink,
    welcome: Welcome,
    board: StatusBoard,
    hooks: RoleHooks,
) -> int:
    """Replay behind the primary this backup joined through ``link``; the exit code."""
    options.pair, options.generation = welcome.pair, welcome.generation
    if welcome.header.python != sys.version:
        reason = (
            f"the primary's guest runs on Python {welcome.header.python.split()[0]}, this "
            f"backup's would run on {sys.version.split()[0]}: replay needs the same Python"
        )
        log.error("replica_refused", role="backup", reason=reason)
        await link.refuse(reason)
        return EXIT_HALTED
    try:
        store = LogStore(welcome.header, open_data_dir(options.data_dir, options.pair))
    except DataDirError as exc:
        log.error("data_dir_refused", role="backup", reason=str(exc))
        await link.refuse(f"the backup cannot keep the log: {exc}")
        return EXIT_USAGE
    packet, network = options.packet, welcome.header.network
    if packet is not None and packet.network is None and network is not None:
        options.packet = dataclasses.replace(packet, network=network)
    workdir = _workdir(options)
    mismatch = _front_mismatch(options.packet, welcome.header) or start_files_problem(
        welcome.header.files, workdir
    )
    if mismatch:
        log.error("replica_refused", role="backup", reason=mismatch)
        await link.aclose()
        return EXIT_HALTED
    backup = Backup(options, link, welcome, store, board, hooks)
    try:
        await backup.arbiter.check_undecided()
    except Halted as exc:
        backup.log.error("replica_refused", reason=str(exc))
        await link.aclose()
        return EXIT_HALTED
    backup.log.info("joined_primary", peer=link.peer, pair=welcome.pair)
    backup.role_changed("backup", f"joined the primary {link.peer}")
    header = welcome.header
    backup.log.info("guest_directory_chosen", workdir=workdir, primary_workdir=header.cwd)
    if os.path.realpath(workdir) == os.path.realpath(header.cwd):
        backup.log.warning(
            "guest_directory_shared",
            workdir=workdir,
            consequence="if the primary runs on this host, both guests write the same files; "
            "give the backup its own directory with --workdir",
        )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            backup.nursery = nursery
            guest = await start_guest(header.argv, header.env, workdir)
            backup.guest_pid = guest.pid
            backup.board.guest_pid = guest.pid
            supervisor = Supervisor(guest, backup, known=backup.reply_ahead)
            backup.board.icount = lambda: supervisor.icount
            backup.board.seq = lambda: supervisor.seq
            nursery.start_soon(store.flush_periodically)
            code = await _run_guest(backup, supervisor, guest, signals)
            nursery.cancel_scope.cancel()
    store.close()
    return code


def _front_mismatch(packet: PacketConfig | None, header: Header) -> str:
    """Why this backup cannot take over the primary's network identity ("" if it can)."""
    theirs = header.network
    if theirs is None:
        if packet is not None:
            return "the primary runs in socket mode; start the backup without --front packet"
        return ""
    address = f"{theirs.ip}/{theirs.prefix_len}"
    if packet is None:
        return (
            f"the primary runs in packet mode for {address}; start the backup with "
            "--front packet (and --interface if its NIC is not eth0)"
        )
    mine = packet.network
    if mine is not None and mine != theirs:
        return (
            f"the primary serves {address} at {format_mac(theirs.mac)}, this backup was "
            f"given {mine.ip}/{mine.prefix_len} at {format_mac(mine.mac)}"
        )
    return ""


def _workdir(options: ReplicaOptions) -> str:
    """The backup's own directory for its guest (never the primary's recorded one)."""
    return os.path.abspath(options.workdir or os.getcwd())


async def _run_guest(
    backup: Backup, supervisor: Supervisor, guest: GuestProcess, signals: Any
) -> int:
    outcome: list[int] = []
    serving = trio.CancelScope()  # see primary._run_guest: stops a supervisor mid-answer

    async def forward_signals() -> None:
        async for signum in signals:
            world = backup.world
            if world is not None:  # live: as a primary does (``PlannedSwitchover.signalled``)
                backup.switchover.signalled(
                    signum, backup.options.on_sigterm, world.deliver_signal, guest.kill
                )
            elif signum == signal.SIGUSR1:
                backup.log.warning(
                    "switchover_refused",
                    reason="this replica is a backup: a switchover is asked of its primary",
                )
            else:
                backup.log.info("backup_stopped", signal=signal.Signals(signum).name)
                outcome.append(EXIT_OK)
                serving.cancel()
                guest.kill()

    async def reprotect() -> None:
        try:
            await backup.reprotect()
        except Retired as exc:
            outcome.append(EXIT_OK)
            if backup.world is not None:
                backup.world.flush_outputs()  # what was released before the Handover goes out
            serving.cancel()
            guest.kill()
            backup.log.info("replica_retired", reason=str(exc))
        except Halted as exc:
            backup.log.error("replica_halted", reason=str(exc))
            outcome.append(EXIT_HALTED)
            serving.cancel()
            guest.kill()

    async with trio.open_nursery() as inner:
        backup.switchover.nursery = inner
        inner.start_soon(backup.run_channel)
        inner.start_soon(forward_signals)
        inner.start_soon(reprotect)
        try:
            with serving:
                await supervisor.run()
        except Divergence as divergence:
            divergence.stack = await supervisor.halt_for_stack("divergence", divergence)
            await backup.compare_with_primary(divergence)
            backup.log.error("replay_diverged", report=divergence.report())
            outcome.append(EXIT_DIVERGED)
        except Halted as exc:
            backup.log.error("replica_halted", reason=str(exc))
            outcome.append(EXIT_HALTED)
        except GuestFailure as exc:
            backup.log.error("guest_failed", error=str(exc))
            outcome.append(EXIT_FAILED)
        guest.kill()
        returncode = await guest.wait()
        inner.cancel_scope.cancel()
    await guest.aclose()
    backup.log.info("guest_exited", returncode=returncode, entries=supervisor.seq)
    if outcome:
        return outcome[0]
    return EXIT_OK if returncode == 0 else EXIT_FAILED
