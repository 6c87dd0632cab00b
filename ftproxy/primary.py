"""The primary: record mode, with the log shipped to a backup and outputs gated.

Every entry the world answers is appended to the outbox; a shipping task sends
whatever the outbox holds in one frame (group commit), so under load many
entries share a write and the backup acknowledges them with one ack. Outputs
wait in the replication core's gate until the backup has acknowledged the
entry they follow; the guest never waits for that. When the backup goes
silent, the primary asks the arbiter: it goes on alone if it wins, and halts,
releasing nothing, if it loses. Once live, it takes the next backup on its
log address (``ftproxy.reprotect``); ``ftproxy run``'s first replica starts
live, with no backup yet (``alone``).
"""

from __future__ import annotations

import contextlib
import signal
from collections import deque
from typing import Any

import structlog
import trio

from ftproxy.channel import (
    Ack,
    ConnectionClosed,
    Entries,
    Heartbeat,
    Protected,
    RemoteProtocolError,
    Welcome,
)
from ftproxy.front.socket import Doorbell
from ftproxy.guestproc import GuestProcess, start_guest
from ftproxy.link import LinkRefused, LogLink, accept_backup
from ftproxy.logstore import DataDirError, LogStore, open_data_dir
from ftproxy.replica import (
    EXIT_FAILED,
    EXIT_HALTED,
    EXIT_OK,
    EXIT_USAGE,
    ArbiterClient,
    Halted,
    ReplicaOptions,
    ReplicaShell,
    admin_endpoint,
)
from ftproxy.replication import Event, Role
from ftproxy.reprotect import Reprotector, throttle_for_catch_up
from ftproxy.supervisor import Exit, GuestFailure, Supervisor
from ftproxy.wire import Entry, Header
from ftproxy.world import WorldAnswers, guest_environment, new_header, open_front

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
    ) -> None:
        super().__init__(options, Role.PRIMARY if link is not None else Role.LIVE, link)
        self.header = header
        self.store = store
        self.board.log_store = store.status
        self.board.protected = lambda: (
            self.replica.role is Role.PRIMARY and self.link is not None and store.on_disk
        )
        self._outbox: list[Entry] = []
        self._in_flight: deque[tuple[int, float]] = deque()  # (last seq of a batch, sent at)
        self._outbox_ready = Doorbell()
        self._acked = Doorbell()  # acks, and role changes: what input flow control waits on
        self.world: WorldAnswers | None = None
        self.halted: str | None = None

    # -- the supervisor's mode --------------------------------------------------

    async def answer(self, seq: int, exit: Exit) -> bytes:
        assert self.world is not None
        self.board.counters["exits_total"] += 1
        return await self.world.answer(seq, exit)

    def output(self, seq: int, message: tuple[Any, ...]) -> None:
        assert self.world is not None
        self.board.counters["outputs_total"] += 1
        self.store.append_output(seq, message)
        if not self.options.output_rule:
            self.world.output_later(message)
            return
        for released in self.replica.output(seq, message):
            self.world.output_later(released)

    def flush(self) -> None:
        assert self.world is not None
        self.world.flush_outputs()

    def _logged(self, entry: Entry) -> None:
        self.replica.entry_logged(entry.seq, len(entry.reply), trio.current_time())
        self.board.counters["log_bytes_total"] += len(entry.reply)
        self.store.append_entry(entry)
        if self.replica.role is Role.PRIMARY and self.link is not None:
            self._outbox.append(entry)
            self._outbox_ready.ring()

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
            if not self._outbox:
                with trio.move_on_at(self.replica.last_sent + timing.heartbeat_s):
                    await self._outbox_ready.wait()
            if self._outbox and self.options.ship_delay_s:
                await trio.sleep(self.options.ship_delay_s)
            batch, self._outbox = self._outbox, []
            message: Entries | Heartbeat = Entries(batch) if batch else Heartbeat()
            if batch:
                self._in_flight.append((batch[-1].seq, trio.current_time()))
            try:
                await link.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.lose_peer("the log channel broke while sending")
                return
            self.replica.sent(trio.current_time())

    async def receive(self, link: LogLink) -> None:
        while True:
            try:
                event = await link.next_event()
            except RemoteProtocolError as exc:
                self.lose_peer(f"the backup broke the protocol: {exc}")
                return
            now = trio.current_time()
            if isinstance(event, Ack):
                self._measure(event, now)
                assert self.world is not None
                for released in self.replica.ack_received(event.received, event.replayed, now):
                    self.world.apply_output(released)
                if self.replica.role is not Role.PRIMARY:
                    self.lose_peer("the backup's ack came after the peer timeout")
                    return
                self._acked.ring()
            elif isinstance(event, Heartbeat):
                self.replica.heard(now)
            elif isinstance(event, ConnectionClosed):
                self.lose_peer("the backup closed the log channel")
                return

    def _measure(self, ack: Ack, now: float) -> None:
        """The log channel's round trip (batch sent to its ack) and the backup's lag."""
        while self._in_flight and self._in_flight[0][0] <= ack.received:
            _, sent_at = self._in_flight.popleft()
            self.board.channel_rtt_ms.add((now - sent_at) * 1000)
        self.board.lag_ms.add(self.replica.lag(now)[2] * 1000)

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
        if self.replica.role is Role.PRIMARY:
            self.replica.handle(Event.PEER_LOST)
        self._outbox.clear()
        await self.arbitrate()

    async def arbitrate(self) -> None:
        self.log.info("role_changed", to="arbitrating")
        if await self.arbiter.test_and_set():
            assert self.world is not None
            for released in self.replica.won():
                self.world.apply_output(released)
            self._acked.ring()
            self.log.info("role_changed", to="live", held_released=True)
        else:
            dropped = self.replica.lost()
            self.halted = "the backup won the arbiter: it serves now"
            self.log.error("role_changed", to="halted", dropped_outputs=dropped)
            raise Halted(self.halted)

    async def reprotect(self) -> None:
        """Live: take the next backup on the log address, again after each one is lost."""
        assert self.world is not None
        reprotector = Reprotector(
            options=self.options,
            header=self.header,
            replica=self.replica,
            store=self.store,
            arbiter=self.arbiter,
            board=self.board,
            release=self.world.apply_output,
            on_ack=self._acked.ring,
            bound_log=self.log,
        )
        await reprotector.run()

    async def finish(self) -> None:
        """The guest exited: let the backup acknowledge the last entries, then release."""
        if self.replica.role is not Role.PRIMARY or self.link is None:
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
    up makes the next generation."""
    bound = log.bind(role="primary", generation=options.generation)
    arbiter_client = ArbiterClient(options, "primary")
    try:
        if not alone:  # alone, this replica has just won its generation's key
            await arbiter_client.check_undecided()
    except Halted as exc:
        bound.error("replica_refused", reason=str(exc))
        return EXIT_HALTED
    env = guest_environment(options.extra_env)
    network = options.packet.network if options.packet else None
    header = new_header(options.argv, env, options.policy, network)
    try:
        store = LogStore(header, open_data_dir(options.data_dir, options.pair))
    except DataDirError as exc:
        bound.error("data_dir_refused", reason=str(exc))
        return EXIT_USAGE
    welcome = Welcome(pair=options.pair, generation=options.generation, header=header)
    link: LogLink | None = None
    if alone:
        options.log_listen = options.log_listen or listen
        task_status.started(listen[1])
    else:
        listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
        port = listeners[0].socket.getsockname()[1]
        options.log_listen = options.log_listen or (listen[0], port)
        bound.info("waiting_for_backup", address=f"{listen[0]}:{port}")
        task_status.started(port)
        link = await _accept_one_backup(listeners, options, welcome)
        for listener in listeners:
            await listener.aclose()
        bound.info("backup_joined", peer=link.peer)
    primary = Primary(options, header, link, store)
    if link is not None:
        # The guest has not started: this backup holds the whole log (none yet).
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await link.send(Protected(options.generation, 0))
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with admin_endpoint(options, primary.board), trio.open_nursery() as nursery:
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
            code = await _run_guest(primary, supervisor, guest, signals, nursery)
            front.close_all()
            nursery.cancel_scope.cancel()
    store.close()
    return code


async def _accept_one_backup(
    listeners: list[trio.SocketListener], options: ReplicaOptions, welcome: Welcome
) -> LogLink:
    """Take the first backup that authenticates and runs the same program."""
    while True:
        stream = await listeners[0].accept()
        try:
            return await accept_backup(stream, options.secret, options.argv, welcome)
        except LinkRefused as exc:
            log.error("backup_refused", reason=str(exc))


async def _run_guest(
    primary: Primary,
    supervisor: Supervisor,
    guest: GuestProcess,
    signals: Any,
    nursery: trio.Nursery,
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
                await primary.run_channel(primary.link)
            await primary.reprotect()
        except Halted as exc:
            outcome.append(EXIT_HALTED)
            serving.cancel()
            guest.kill()
            primary.log.error("replica_halted", reason=str(exc))

    async def forward_signals() -> None:
        received = 0
        async for signum in signals:
            received += 1
            if received == 1:
                primary.log.info("signal_forwarded", signal=signal.Signals(signum).name)
                world.deliver_signal(signum)
            else:
                guest.kill()

    async with trio.open_nursery() as inner:
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
