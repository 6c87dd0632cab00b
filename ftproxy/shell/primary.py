"""The primary: record mode, with the log shipped to a backup and outputs gated.

Every entry the world answers is appended to the outbox; a shipping task sends
whatever the outbox holds in one frame (group commit), so under load many
entries share a write and the backup acknowledges them with one ack. Outputs
wait in the replication core's gate until the backup has acknowledged the
entry they follow; the guest never waits for that. When the backup goes
silent, the primary asks the arbiter: it goes on alone if it wins, and halts,
releasing nothing, if it loses. Once live, it takes the next backup on its
log address (``ftproxy.shell.reprotect``); ``ftproxy run``'s first replica starts
live, with no backup yet (``alone``).

A planned switchover (``ftproxy switchover``, SIGUSR1, SIGTERM with ``--on-sigterm
leave``) holds the guest at its next exit, waits until the backup holds and has
replayed every entry, sends ``Handover`` and from then on releases nothing; the
backup claims the pair through the arbiter, goes live at that exit and answers
``HandedOver``, and this replica exits 0. A backup lost meanwhile is arbitrated
as at a failover: this replica, having released nothing since, goes on alone
if it wins.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import signal
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
from ftproxy.shell.checks import bind_listeners, check_data_dir, check_free, check_program
from ftproxy.shell.exits import EXIT_FAILED, EXIT_HALTED, EXIT_OK, EXIT_USAGE, Halted, Retired
from ftproxy.shell.fence import identify_self
from ftproxy.shell.guestproc import GuestProcess, start_guest
from ftproxy.shell.handover import PlannedSwitchover
from ftproxy.shell.hooks import RoleHooks, role_hooks
from ftproxy.shell.inflight import InFlight
from ftproxy.shell.link import LogLink, accept_first_backup, peer_failure
from ftproxy.shell.logstore import DataDirError, LogStore, open_data_dir
from ftproxy.shell.options import ReplicaOptions
from ftproxy.shell.replay import first_difference
from ftproxy.shell.replica import ReplicaShell
from ftproxy.shell.reprotect import Reprotector, take_acks_now, throttle_for_catch_up
from ftproxy.shell.status import StatusBoard
from ftproxy.shell.supervisor import Exit, GuestFailure, Supervisor
from ftproxy.shell.sync import Doorbell
from ftproxy.shell.world import (
    WorldAnswers,
    guest_environment,
    new_header,
    open_front,
    output_record,
)

log = structlog.get_logger()

FINAL_ACK_WAIT_S = 2.0


class Primary(ReplicaShell):
    """The primary's state and tasks around one guest and one backup."""

    def __init__(
        self,
        options: ReplicaOptions,
        header: Header,
        link: LogLink | None,
        store: LogStore,
        board: StatusBoard | None = None,
        hooks: RoleHooks | None = None,
    ) -> None:
        role = ReplicaRole.PRIMARY if link is not None else ReplicaRole.LIVE
        super().__init__(options, role, link, board, hooks)
        self.header = header
        self.store = store
        self.board.log_store = store.status
        self.board.protection = lambda: (
            self.replica.role is ReplicaRole.PRIMARY and self.link is not None and store.on_disk
        )
        self._outbox: list[Entry] = []
        # With --ship-delay-ms only: when each outbox entry was logged, in order.
        self._logged_at: list[float] = []
        self._in_flight = InFlight(self.board)
        self._outbox_ready = Doorbell()
        self._acked = Doorbell()  # acks, and role changes: what input flow control waits on
        self.world: WorldAnswers | None = None
        self.halted: str | None = None
        # Outputs the backup's replay has not checked yet (those after the entry it
        # last said it replayed): what its report of a divergence is compared with.
        self._unchecked: deque[Output] = deque()
        # Live, with --log-listen: what takes (and then ships to) the later backups.
        self._serving_joiners: Reprotector | None = None
        # The exit last announced to the backup (the guest waited long there).
        self._announced: Waiting | None = None
        # Planned switchovers: holds the guest's exits (``answer``), hands over.
        self.switchover = PlannedSwitchover(
            replica=self.replica,
            acked=self._acked,
            board=self.board,
            role_changed=self.role_changed,
            bound_log=self.log,
        )
        if link is not None:
            self.switchover.attach(link, self.lose_peer)

    # -- the supervisor's mode --------------------------------------------------

    async def answer(self, seq: int, exit: Exit) -> bytes:
        assert self.world is not None
        self.board.counters["exits_total"] += 1
        self.take_ready_acks()
        body = await self.switchover.answer(seq, exit, self.world)
        if self._outbox and not self._ship_now():
            self._outbox_ready.ring()
        elif self._serving_joiners is not None:
            self._serving_joiners.ship_now()  # what this exit logged, to a later backup
        return body

    def _ship_now(self) -> bool:
        """Send the outbox from here when the channel is idle (nothing in flight):
        before the reply goes to the guest, so the log's round trip and the guest's
        work overlap from the start, and without waking the ship task (a pass of
        trio's loop later). Under load, entries wait for the ship task and go in
        batches (group commit). False: not sent here."""
        link = self.link
        if link is None or self._in_flight or self.options.ship_delay_s or not self.replica.gated:
            return False
        if not self._in_flight.send_now(link, self._outbox, self.replica):
            return False
        self._outbox = []
        return not link.pending  # the ship task puts out the rest

    def output(self, seq: int, message: tuple[Any, ...]) -> None:
        assert self.world is not None
        self.board.counters["outputs_total"] += 1
        record = output_record(seq, message)  # one per output: the disk log's and the check's
        self.store.append_output(record)
        if self.link is not None:
            self._unchecked.append(record)
        if self.options.output_rule:
            self.gate_output(self.world, seq, message)
        else:
            self.release_output(self.world, seq, message)

    def flush(self) -> None:
        assert self.world is not None
        self.take_ready_acks()
        self.world.flush_outputs()

    def _logged(self, entry: Entry) -> None:
        now = trio.current_time()
        self.replica.entry_logged(entry.seq, len(entry.reply), now)
        self.board.counters["log_bytes_total"] += len(entry.reply)
        self.store.append_entry(entry)
        if self.replica.gated and self.link is not None:
            # Entries exist only while an exit is answered: answer() ships them
            # at its end, or rings the ship task when the channel is busy. Handing
            # over too: the exit under way when the switchover began finishes.
            self._outbox.append(entry)
            if self.options.ship_delay_s:
                self._logged_at.append(now)

    async def _input_allowed(self) -> None:
        if self.replica.lag_exceeded(trio.current_time()) and self.world is not None:
            self.world.flush_outputs()  # held back for speed, not for the backup
        while self.replica.lag_exceeded(trio.current_time()):
            with trio.move_on_after(self.options.timing.heartbeat_s):
                await self._acked.wait()
        await throttle_for_catch_up(self.replica, self._acked)

    # -- the log channel --------------------------------------------------------

    async def ship(self, link: LogLink) -> None:
        """Send the outbox in batches; heartbeats when there is nothing to send."""
        timing = self.options.timing
        while True:
            if link.pending:
                try:
                    await link.flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.lose_peer(link.why_broken())
                    return
                self.replica.sent(trio.current_time())
            if not self._outbox:
                with trio.move_on_at(self.replica.last_sent + timing.heartbeat_s):
                    await self._outbox_ready.wait()
            if link.pending and not self._outbox:
                continue
            if self._outbox and self.options.ship_delay_s:
                batch = await self._delayed_batch(self.options.ship_delay_s)
            else:
                batch, self._outbox = self._outbox, []
            message: Entries | Heartbeat | Waiting = Entries(batch) if batch else Heartbeat()
            waiting = self.switchover.waiting
            if not batch and waiting is not None and waiting is not self._announced:
                # Idle for a heartbeat at an exit: its digest, so the backup can check now.
                message = self._announced = waiting
            if batch:
                self._in_flight.sent(batch[-1].seq, trio.current_time())
                if _trace.stamp is not None:
                    _trace.stamp(_trace.SHIP_STARTED, batch[-1].seq)
            try:
                await link.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.lose_peer(link.why_broken())
                return
            if batch and _trace.stamp is not None:
                _trace.stamp(_trace.ENTRY_SHIPPED, batch[-1].seq)
            self.replica.sent(trio.current_time())

    async def _delayed_batch(self, delay: float) -> list[Entry]:
        """--ship-delay-ms (unsafe demonstrations): the outbox entries logged at least
        ``delay`` ago. Each entry waits its own full delay, counted from when it was
        logged, so at every moment the outputs of the last ``delay`` have their log
        unshipped, even when the process has been off the CPU for longer than that
        (one sleep per batch would let a starved primary ship at once what it had
        just released)."""
        await trio.sleep_until(self._logged_at[0] + delay)
        due = bisect.bisect_right(self._logged_at, trio.current_time() - delay)
        batch, self._outbox = self._outbox[:due], self._outbox[due:]
        del self._logged_at[:due]
        return batch

    async def receive(self, link: LogLink) -> None:
        while True:
            try:
                event = await link.next_event()
            except RemoteProtocolError as exc:
                self.lose_peer(peer_failure("the backup", exc))
                return
            now = trio.current_time()
            if isinstance(event, Ack):
                if not self._ack_received(event, now):
                    return
            elif isinstance(event, HandedOver):
                if self.switchover.took_over(event):
                    self.peer_gone.set()  # ends the channel (not a loss: no arbitration)
                return
            elif isinstance(event, Heartbeat):
                self.replica.heard(now)
            elif isinstance(event, Diverged):
                await self._backup_diverged(link, event)
                return
            elif isinstance(event, ConnectionClosed):
                self.lose_peer("the backup closed the log channel")
                return

    def _ack_received(self, ack: Ack, now: float) -> bool:
        """Release what ``ack`` covers; False once the peer is lost (the ack came too late)."""
        if _trace.stamp is not None:
            _trace.stamp(_trace.ACK_RECEIVED, ack.received)
        lag_s = self.replica.lag(now)[2]  # before this ack, as it always was
        assert self.world is not None
        # The held outputs go first: the bookkeeping below is not on their path.
        for released in self.replica.ack_received(ack.received, ack.replayed, now):
            if _trace.stamp is not None:
                _trace.stamp(_trace.OUTPUT_RELEASED, ack.received)
            self.world.apply_output(released)
        unchecked = self._unchecked
        while unchecked and unchecked[0].seq < ack.replayed:
            unchecked.popleft()
        self._in_flight.acked(ack.received, now, lag_s)
        if self.replica.role is ReplicaRole.ARBITRATING:
            self.lose_peer("the backup's ack came after the peer timeout")
            return False
        self._acked.ring()
        return True

    def _read_ready_acks(self) -> None:
        link = self.link
        if link is None:
            if self._serving_joiners is not None:  # held: a later backup protects this replica
                self._serving_joiners.take_ready_acks()
            return
        take_acks_now(link, self.replica, self._ack_received, self.lose_peer)

    async def _backup_diverged(self, link: LogLink, diverged: Diverged) -> None:
        """The backup's guest did not do what ours did: say where, answer with our
        outputs for its report, and go on without it."""
        after = diverged.seq - 1
        ours = [output for output in self._unchecked if output.seq == after]
        self.board.counters["divergences_total"] += 1
        self.log.error(
            "backup_diverged",
            seq=diverged.seq,
            icount=diverged.icount,
            difference=first_difference(ours, diverged.outputs),
            report=diverged.report,
        )
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await link.send(RecordedOutputs(after, ours))
        self.lose_peer(
            f"the backup diverged at log entry {diverged.seq} (icount {diverged.icount}); "
            "this replica goes on alone"
        )

    async def run_channel(self, link: LogLink) -> None:
        """Replicate until the backup is lost, then arbitrate."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.ship, link)
            nursery.start_soon(self.receive, link)
            nursery.start_soon(self.watch)
            await self.peer_gone.wait()
            nursery.cancel_scope.cancel()
        await link.aclose()
        self.link = None
        self.switchover.detach()
        self._unchecked.clear()
        if self.replica.role is ReplicaRole.HANDED_OVER:
            raise Retired(f"handed the service over to the backup {link.peer}")
        if self.replica.role in (
            ReplicaRole.PRIMARY,
            ReplicaRole.HANDING_OVER,
            ReplicaRole.RETIRING,
        ):
            self.replica.handle(Event.PEER_LOST)
        self._outbox.clear()
        self._logged_at.clear()
        self._acked.ring()  # a switchover waiting for the backup learns it is gone
        await self.arbitrate()

    async def arbitrate(self) -> None:
        self.log.info("role_changed", to="arbitrating")
        if await self.arbiter.test_and_set():
            assert self.world is not None
            for released in self.replica.won():
                self.world.apply_output(released)
            self._acked.ring()
            self.went_alone()
            self.log.info("role_changed", to="live", held_released=True)
            self.role_changed("live", "the backup was lost; this primary won the arbiter")
            self.switchover.arbitrated(won=True)
        else:
            dropped = self.replica.lost()
            self.halted = "the backup won the arbiter: it serves now"
            self.switchover.arbitrated(won=False)
            self.log.error("role_changed", to="halted", dropped_outputs=dropped)
            self.role_changed("halted", self.halted)
            raise Halted(self.halted)

    async def reprotect(self, listeners: list[trio.SocketListener]) -> None:
        """Live: take the next backup on the log address, again after each one is lost."""
        self._serving_joiners = self.reprotector
        await self.reprotector.run(listeners)

    @functools.cached_property
    def reprotector(self) -> Reprotector:
        assert self.world is not None
        return Reprotector(
            options=self.options,
            header=self.header,
            replica=self.replica,
            store=self.store,
            arbiter=self.arbiter,
            board=self.board,
            release=self.world.apply_output,
            on_ack=self._acked.ring,
            bound_log=self.log,
            role_changed=self.role_changed,
            switchover=self.switchover,
        )

    async def finish(self) -> None:
        """The guest exited: let the backup acknowledge the last entries, then release."""
        if self.replica.role is not ReplicaRole.PRIMARY or self.link is None:
            return
        with trio.move_on_after(FINAL_ACK_WAIT_S):
            while self.replica.received < self.replica.logged and not self.peer_gone.is_set():
                await self._acked.wait()


async def serve_primary(
    options: ReplicaOptions,
    listen: tuple[str, int],
    *,
    alone: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Wait for a backup (unless ``alone``), then run the guest replicated; return the
    exit code. Alone, the guest starts at once, live, and the first backup to catch
    up makes the next generation.

    What the flags name is checked first (StartupError): the script, the data dir,
    the log and admin ports, the --map addresses. The admin endpoint answers from
    then on.
    """
    check_program(options.argv)
    check_data_dir(options.data_dir)
    listeners = await bind_listeners("--log-listen", listen)
    for guest_port, address in options.address_map.items():
        check_free(f"--map {guest_port}={address[0]}:{address[1]}", address)
    arbiter_client = ArbiterClient(options, "primary")
    board = StatusBoard(options, arbiter_client, role_override="waiting_for_backup")
    hooks_running = role_hooks(options.on_role_change, options.hook_timeout_s, options.pair)
    try:
        async with admin_endpoint(options, board), hooks_running as hooks:
            return await _serve_primary(options, listeners, board, hooks, task_status, alone)
    finally:
        for listener in listeners:
            await listener.aclose()


async def _serve_primary(
    options: ReplicaOptions,
    listeners: list[trio.SocketListener],
    board: StatusBoard,
    hooks: RoleHooks,
    task_status: trio.TaskStatus[int],
    alone: bool,
) -> int:
    bound = log.bind(role="primary", generation=options.generation)
    arbiter_client = board.arbiter
    try:
        if not alone:  # alone, this replica has just won its generation's key
            await arbiter_client.check_undecided()
    except Halted as exc:
        bound.error("replica_refused", reason=str(exc))
        return EXIT_HALTED
    env = guest_environment(options.extra_env)
    network = options.packet.network if options.packet else None
    header = new_header(options.argv, env, options.policy, network, options.pins)
    try:
        store = LogStore(header, open_data_dir(options.data_dir, options.pair))
    except DataDirError as exc:
        bound.error("data_dir_refused", reason=str(exc))
        return EXIT_USAGE
    host, port = listeners[0].socket.getsockname()[:2]
    # The listeners stay open once the backup is in: a second one is refused, naming
    # the first, and once live the primary takes its next backup here.
    options.log_listen = options.log_listen or (host, port)
    task_status.started(port)
    link: LogLink | None = None
    if not alone:
        welcome = Welcome(
            pair=options.pair,
            generation=options.generation,
            header=header,
            primary=identify_self(),
        )
        bound.info("waiting_for_backup", address=f"{host}:{port}")
        link = await accept_first_backup(listeners, options.secret, options.argv, welcome)
        bound.info("backup_joined", peer=link.peer)
    primary = Primary(options, header, link, store, board, hooks)
    if link is not None:
        primary.role_changed("primary", f"the backup {link.peer} joined")
        # The guest has not started: this backup holds the whole log (none yet).
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await link.send(Protected(options.generation, 0))
    else:
        primary.role_changed("live", "booted alone: the first backup to catch up protects it")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            doorbell = Doorbell()
            front = open_front(nursery, doorbell, options.address_map, options.packet)
            guest = await start_guest(options.argv, env, header.cwd)
            primary.board.guest_pid = guest.pid
            primary.world = WorldAnswers(
                front,
                doorbell,
                options.policy,
                guest.pid,
                primary._logged,
                network=network,
                input_allowed=primary._input_allowed,
            )
            supervisor = Supervisor(guest, primary)
            primary.board.icount = lambda: supervisor.icount
            primary.board.seq = lambda: supervisor.seq
            primary.board.input_bytes = lambda: front.input_bytes
            primary.board.front = front.status
            nursery.start_soon(store.flush_periodically)
            code = await _run_guest(primary, supervisor, guest, signals, listeners)
            front.close_all()
            nursery.cancel_scope.cancel()
    store.close()
    return code


async def _run_guest(
    primary: Primary,
    supervisor: Supervisor,
    guest: GuestProcess,
    signals: Any,
    listeners: list[trio.SocketListener],
) -> int:
    assert primary.world is not None
    world = primary.world
    outcome: list[int] = []
    # The supervisor may be waiting inside an answer (for input that will never
    # come) when the replica halts: cancelling it is the only way to stop it.
    serving = trio.CancelScope()

    async def replicate() -> None:
        try:
            if primary.link is not None:
                halted: Halted | None = None
                async with trio.open_nursery() as refusing:
                    refusing.start_soon(
                        primary.reprotector.refuse_joiners, listeners, primary.link.peer
                    )
                    try:
                        await primary.run_channel(primary.link)
                    except Halted as exc:  # out of the nursery as itself, not in a group
                        # (Retired too: a Halted, whose control client still hears the end)
                        halted = exc
                    refusing.cancel_scope.cancel()
                if halted is not None:
                    raise halted
                primary.reprotector.attached = None
            await primary.reprotect(listeners)
        except Retired as exc:
            outcome.append(EXIT_OK)
            world.flush_outputs()  # what was released before the Handover goes out
            serving.cancel()
            guest.kill()
            primary.log.info("replica_retired", reason=str(exc))
        except Halted as exc:
            outcome.append(EXIT_HALTED)
            serving.cancel()
            guest.kill()
            primary.log.error("replica_halted", reason=str(exc))

    async def forward_signals() -> None:
        async for signum in signals:
            primary.switchover.signalled(
                signum, primary.options.on_sigterm, world.deliver_signal, guest.kill
            )

    async with trio.open_nursery() as inner:
        primary.switchover.nursery = inner
        inner.start_soon(replicate)
        inner.start_soon(forward_signals)
        with serving:
            try:
                await supervisor.run()
            except GuestFailure as exc:
                primary.log.error("guest_failed", error=str(exc))
                guest.kill()
                outcome.append(EXIT_FAILED)
        returncode = await guest.wait()
        if not outcome:
            await primary.finish()
        inner.cancel_scope.cancel()
    await guest.aclose()
    primary.log.info("guest_exited", returncode=returncode, entries=supervisor.seq)
    if outcome:
        return outcome[0]
    return EXIT_OK if returncode == 0 else EXIT_FAILED
