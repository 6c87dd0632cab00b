"""Re-protection: a live replica takes a new backup and the pair is protected again.

A live replica (a backup gone live, a primary that went on alone, the first
replica that ``ftproxy run`` booted) listens on its log address. A joiner
authenticates, proves it runs the same program, and gets a ``Welcome`` for
generation N+1. The replica streams it every entry since boot from its log
store (``ftproxy.shell.logstore``), then the live stream, in the same batches; the
joiner replays at full speed behind. While it catches up the live replica
serves alone (outputs leave at once) and watches its silence: a joiner that
dies or stalls is dropped after the peer timeout and the next one accepted.

Once the joiner has acknowledged every entry logged, the replica becomes the
primary of generation N+1 (the core's ``protect``): outputs wait for acks again
from that point, and the joiner is told ``Protected``; only then may it go
live. A second joiner while one is attached is refused with its name. When the
backup of generation N+1 is lost, the primary arbitrates on N+1's key, as any
primary does: it goes on live (and takes the next backup) or halts.

Once protected, the pair can switch over as a first pair does: an authenticated
``Switchover`` on the log address (``ftproxy switchover``), or the shell's
signal, runs the shared handover (``ftproxy.shell.handover``) over this
backup's channel; its ``HandedOver`` retires this replica (``Retired``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
    LocalProtocolError,
    Protected,
    RemoteProtocolError,
    SwitchoverOutcome,
    Welcome,
)
from ftproxy.core.records import Entry, Header
from ftproxy.core.replication import CATCH_UP_THROTTLE_S, Event, Replica, ReplicaRole
from ftproxy.guest import _trace
from ftproxy.shell.admission import Admission, Gate, RejectionLog, serve_with_limits
from ftproxy.shell.arbiter_client import ArbiterClient
from ftproxy.shell.exits import Halted, Retired
from ftproxy.shell.fence import identify_self
from ftproxy.shell.handover import PlannedSwitchover
from ftproxy.shell.inflight import InFlight
from ftproxy.shell.link import (
    LinkRefused,
    LogLink,
    SwitchoverRequested,
    accept_backup,
    peer_failure,
)
from ftproxy.shell.logstore import LogStore
from ftproxy.shell.options import ReplicaOptions
from ftproxy.shell.replica import peer_frames_read
from ftproxy.shell.status import StatusBoard
from ftproxy.shell.sync import Doorbell

log = structlog.get_logger()

MAX_BATCH_ENTRIES = 4096
MAX_BATCH_BYTES = 1024 * 1024
ALREADY_ATTACHED = "a backup is already attached"
LISTEN_RETRY_S = 0.2
# The roles in which losing the backup means asking the arbiter (a protected pair's
# primary, also while it hands over).
_LOSES_A_PRIMARY = frozenset(
    {
        ReplicaRole.PRIMARY,
        ReplicaRole.ARBITRATING,
        ReplicaRole.HANDING_OVER,
        ReplicaRole.RETIRING,
    }
)
# How long the answer to a switchover request may take to go out once known
# (the replica may be on its way out: it handed over).
SWITCHOVER_ANSWER_S = 1.0


def take_acks_now(
    link: LogLink,
    replica: Replica[Any],
    ack_received: Callable[[Ack, float], bool],
    lose: Callable[[str], None],
) -> None:
    """A primary holding outputs handles the acks (and heartbeats) already in its log
    channel's socket where it stands (``LogLink.take_ready``); every other event is
    left to the receiving task. ``ack_received`` returns False once the peer is lost."""
    now = trio.current_time()
    try:
        events = link.take_ready((Ack, Heartbeat))
    except RemoteProtocolError as exc:
        lose(peer_failure("the backup", exc))
        return
    for event in events:
        if isinstance(event, Heartbeat):
            replica.heard(now)
        elif isinstance(event, Ack) and not ack_received(event, now):
            return


async def throttle_for_catch_up(replica: Replica[Any], acked: Doorbell) -> None:
    """Before new input: while a joiner's replay lags, hold the guest for a moment.

    Each wait lasts until the joiner's acks say it is close enough, and at most
    CATCH_UP_THROTTLE_S, so the service slows down but never stops for it.
    """
    if not replica.catch_up_behind():
        return
    with trio.move_on_after(CATCH_UP_THROTTLE_S):
        while replica.catch_up_behind():
            await acked.wait()


@dataclass
class CatchUp:
    """One joiner's catch-up, for /status and the log line that ends it."""

    peer: str
    generation: int
    started: float = field(default_factory=time.monotonic)
    target_seq: int = 0  # the live replica's seq when the joiner came
    acked_seq: int = 0
    replayed_seq: int = 0
    sent_entries: int = 0
    sent_bytes: int = 0
    state: str = "catching_up"  # then protected (and lost, later), or dropped
    finished: float | None = None

    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def status(self) -> dict[str, Any]:
        elapsed = self.elapsed()
        return {
            "state": self.state,
            "peer": self.peer,
            "generation": self.generation,
            "target_seq": self.target_seq,
            "acked_seq": self.acked_seq,
            "replayed_seq": self.replayed_seq,
            "entries_sent": self.sent_entries,
            "bytes_sent": self.sent_bytes,
            "elapsed_s": round(elapsed, 3),
            "entries_per_s": round(self.sent_entries / elapsed, 1) if elapsed > 0 else 0.0,
        }


class Reprotector:
    """Takes new backups for a live replica, one at a time, until the replica halts."""

    def __init__(
        self,
        *,
        options: ReplicaOptions,
        header: Header,
        replica: Replica[tuple[Any, ...]],
        store: LogStore,
        arbiter: ArbiterClient,
        board: StatusBoard,
        release: Callable[[tuple[Any, ...]], None],
        on_ack: Callable[[], None],
        bound_log: Any,
        role_changed: Callable[[str, str], None] = lambda role, reason: None,
        switchover: PlannedSwitchover,
    ) -> None:
        assert options.log_listen is not None
        self.options = options
        self.header = header
        self.replica = replica
        self.store = store
        self.arbiter = arbiter
        self.board = board
        self.release = release
        self.on_ack = on_ack
        self.log = bound_log
        self.role_changed = role_changed  # the --on-role-change hooks (``ftproxy.shell.hooks``)
        # The shell's planned switchovers: told of the caught-up backup's channel,
        # of HandedOver, and of the arbiter's verdict after a loss.
        self.switchover = switchover
        self.attached: str | None = None
        self.catch_up: CatchUp | None = None
        # The joiner being served: its channel, and what ends its service.
        self._serving: tuple[LogLink, Callable[[str], None]] | None = None
        self._sent = 0  # entries sent to it (from the store's first)
        self._in_flight = InFlight(board)
        self._entries_ready = Doorbell()  # rung by ship_now for the ship task
        self._joiners_in, self._joiners = trio.open_memory_channel[LogLink](0)
        refusals = RejectionLog("backup_refused", port="log channel", level="error")
        self.admission = Admission("log channel", rejections=refusals)

    def protected(self) -> bool:
        """A backup is attached and caught up, outputs wait for it, and the log is whole."""
        return (
            self.replica.role is ReplicaRole.PRIMARY
            and self.attached is not None
            and self.store.on_disk
        )

    async def run(self, listeners: list[trio.SocketListener] | None = None) -> None:
        """Serve joiners (on ``listeners``, or on the log address) until cancelled;
        Halted when a lost backup won the arbiter."""
        self.board.protection = self.protected
        self.board.catch_up = lambda: self.catch_up.status() if self.catch_up else None
        if listeners is None:
            listeners = await self._listen()
        ended: Halted | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_with_limits, listeners, self._attempt, self.admission)
                try:
                    async for link in self._joiners:
                        await self._serve(link)
                except Halted as exc:  # out of the nursery as itself (Retired too), not a group
                    ended = exc
                nursery.cancel_scope.cancel()
        finally:
            for listener in listeners:
                await listener.aclose()
        if ended is not None:
            raise ended

    async def refuse_joiners(self, listeners: list[trio.SocketListener], attached: str) -> None:
        """A primary's first backup is ``attached``: refuse every other, naming it,
        until cancelled (then ``run`` takes over the listeners)."""
        self.attached = attached
        await serve_with_limits(listeners, self._attempt, self.admission)

    async def _listen(self) -> list[trio.SocketListener]:
        assert self.options.log_listen is not None
        host, port = self.options.log_listen
        reported = False
        while True:
            try:
                listeners = await trio.open_tcp_listeners(port, host=host)
                break
            except OSError as exc:
                # The address may still be held by the process this one replaced.
                if not reported:
                    self.log.warning("log_listen_busy", address=f"{host}:{port}", error=str(exc))
                    reported = True
                await trio.sleep(LISTEN_RETRY_S)
        self.log.info(
            "waiting_for_backup",
            address=f"{host}:{listeners[0].socket.getsockname()[1]}",
            next_generation=self.options.generation + 1,
            entries=self.store.last_seq,
        )
        return listeners

    def _claim(self, peer: str) -> str:
        """Why ``peer`` cannot join now ("" if it can: it is attached from now on)."""
        if self.attached is not None:
            return (
                f"{ALREADY_ATTACHED} to this replica: {self.attached} "
                "(one backup at a time; try again once it is gone)"
            )
        if self.store.error is not None:
            return f"this replica cannot stream its log: {self.store.error}"
        self.attached = peer
        return ""

    def _welcome(self) -> Welcome:
        return Welcome(
            self.options.pair, self.options.generation + 1, self.header, primary=identify_self()
        )

    async def _attempt(self, stream: trio.SocketStream, gate: Gate) -> None:
        """One connection's opening, side by side with the others' under the admission's
        limits (a silent peer holds up nobody): a joiner that is taken goes to ``run``."""
        try:
            link = await accept_backup(
                stream,
                self.options.secret,
                self.options.argv,
                self._welcome,
                gate,
                claim=self._claim,
            )
        except SwitchoverRequested as request:
            await self._answer_switchover(request.link)
            return
        except LinkRefused as exc:
            if self.attached == gate.peer:
                self.attached = None
            self.admission.reject(gate.peer, str(exc))
            return
        try:
            await self._joiners_in.send(link)
        except trio.Cancelled:
            await link.aclose()  # a refusing primary went live meanwhile: start afresh
            raise

    async def _answer_switchover(self, link: LogLink) -> None:
        """An authenticated control client asked for a switchover: try it, say how it went."""
        self.log.info("switchover_asked", peer=link.peer)
        outcome = SwitchoverOutcome(False, False, "the replica stopped before the outcome")
        try:
            outcome = await self.switchover.ask()
        except trio.Cancelled:
            outcome = SwitchoverOutcome(False, False, "the replica stopped before the outcome")
            raise
        finally:
            # Said even as the replica stops (it may stop because it handed over).
            with trio.CancelScope(shield=True), trio.move_on_after(SWITCHOVER_ANSWER_S):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await link.send(outcome)
                await link.aclose()

    # -- one joiner ------------------------------------------------------------

    async def _serve(self, link: LogLink) -> None:
        replica = self.replica
        now = trio.current_time()
        replica.joiner_attached(now)
        generation = self.options.generation + 1
        self.catch_up = CatchUp(link.peer, generation, target_seq=self.store.last_seq)
        self.board.peer_state = "catching_up"
        self.board.peer_address = link.peer
        self.log.info(
            "backup_joined",
            peer=link.peer,
            next_generation=generation,
            catch_up_entries=self.store.last_seq,
            catch_up_bytes=self.store.bytes,
        )
        gone = trio.Event()
        why: list[str] = []

        def lose(reason: str) -> None:
            if not gone.is_set():
                why.append(reason)
                gone.set()

        self._serving = link, lose
        self._sent = 0
        self._in_flight.clear()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ship, link, lose)
                nursery.start_soon(self._receive, link, lose)
                nursery.start_soon(self._watch, link, lose)
                await gone.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._serving = None
        reason = why[0]
        handed_over = replica.role is ReplicaRole.HANDED_OVER
        lost = replica.role in _LOSES_A_PRIMARY  # else a joiner let go
        if handed_over or lost:
            await link.aclose()
        else:
            # A joiner let go (silent, slow): tell it why, or it sees only a closed channel.
            await link.refuse(f"the live replica let this backup go: {reason}")
        self.switchover.detach()
        catch_up = self.catch_up
        if handed_over:
            raise Retired(f"handed the service over to the backup {link.peer}")
        if lost:
            self.log.warning("backup_lost", peer=link.peer, reason=reason)
            self.board.peer_state = "lost"
            catch_up.state = "lost"
            await self._arbitrate(lost_at=trio.current_time())
        else:
            replica.joiner_detached()
            catch_up.state, catch_up.finished = "dropped", time.monotonic()
            self.board.peer_state = "dropped"
            self.log.warning(
                "backup_dropped", peer=link.peer, reason=reason, acked_seq=catch_up.acked_seq
            )
        self.attached = None

    async def _arbitrate(self, lost_at: float) -> None:
        if self.replica.role is not ReplicaRole.ARBITRATING:
            self.replica.handle(Event.PEER_LOST)
        self.on_ack()  # a switchover waiting for the backup learns it is gone
        self.log.info("role_changed", to="arbitrating", key=self.arbiter.key)
        if await self.arbiter.test_and_set():
            for released in self.replica.won():
                self.release(released)
            self.on_ack()
            self.board.failed_over(trio.current_time() - lost_at)
            self.log.info("role_changed", to="live", held_released=True)
            self.role_changed("live", "the backup was lost; this primary won the arbiter")
            self.switchover.arbitrated(won=True)
            return
        dropped = self.replica.lost()
        halted = "the backup won the arbiter: it serves now"
        self.switchover.arbitrated(won=False)
        self.log.error("role_changed", to="halted", dropped_outputs=dropped)
        self.role_changed("halted", halted)
        raise Halted(halted)

    async def _ship(self, link: LogLink, lose: Callable[[str], None]) -> None:
        """The store from the first entry, then each new entry, batched; heartbeats when
        idle. Once protected, an entry logged while the channel is idle has gone out
        from the exit that logged it (``ship_now``): this task sends the rest."""
        store, replica = self.store, self.replica
        heartbeat = self.options.timing.heartbeat_s
        while True:
            if link.pending:
                try:
                    await link.flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    lose(link.why_broken())
                    return
                replica.sent(trio.current_time())
            if self._sent >= store.last_seq:
                with trio.move_on_at(replica.last_sent + heartbeat):
                    await self._entries_ready.wait()
                if link.pending and self._sent >= store.last_seq:
                    continue  # ship_now sent what rang, and left a part of it
            batch, size = self._next_batch()
            message: Entries | Heartbeat = Entries(batch) if batch else Heartbeat()
            if batch:
                self._count_sent(batch, size)
                self._in_flight.sent(self._sent, trio.current_time())
            try:
                await link.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                lose(link.why_broken())
                return
            replica.sent(trio.current_time())

    def _next_batch(self) -> tuple[list[Entry], int]:
        """The next entries to send (at most a batch's worth), and their reply bytes."""
        batch: list[Entry] = []
        size = 0
        for entry in self.store.entries[self._sent : self._sent + MAX_BATCH_ENTRIES]:
            batch.append(entry)
            size += len(entry.reply)
            if size >= MAX_BATCH_BYTES:
                break
        return batch, size

    def _count_sent(self, batch: list[Entry], size: int) -> None:
        self._sent += len(batch)
        if self.catch_up is not None:
            self.catch_up.sent_entries += len(batch)
            self.catch_up.sent_bytes += size

    def ship_now(self) -> None:
        """An exit of the live guest was answered: what it logged goes out from here
        when the protecting backup's channel is idle (nothing in flight), as the first
        pair's primary does it (``Primary._ship_now``), without waking the ship task.
        Otherwise that task is rung, and sends it in a batch. With no backup attached
        there is no ship task: the next one's starts from the store's first entry."""
        serving = self._serving
        if serving is None or self._sent >= self.store.last_seq:
            return
        link = serving[0]
        if self._in_flight or self.replica.role is not ReplicaRole.PRIMARY or link.pending:
            self._entries_ready.ring()
            return
        batch, size = self._next_batch()
        if not self._in_flight.send_now(link, batch, self.replica):
            self._entries_ready.ring()
            return
        self._count_sent(batch, size)
        if link.pending or self._sent < self.store.last_seq:
            self._entries_ready.ring()  # the ship task puts out the rest

    async def _receive(self, link: LogLink, lose: Callable[[str], None]) -> None:
        replica = self.replica
        catch_up = self.catch_up
        assert catch_up is not None
        while True:
            try:
                event = await link.next_event()
            except RemoteProtocolError as exc:
                lose(peer_failure("the backup", exc))
                return
            now = trio.current_time()
            if isinstance(event, Ack):
                if not self._ack_received(event, now, lose):
                    return
                if replica.caught_up():
                    try:
                        await self._protect(link, lose)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        lose(link.why_broken())
                        return
            elif isinstance(event, HandedOver):
                if self.switchover.took_over(event):
                    lose("handed over")  # not a loss: _serve sees the role, and retires
                return
            elif isinstance(event, Heartbeat):
                replica.heard(now)
            elif isinstance(event, Diverged):
                # Its guest did not do what ours did: it can never protect this pair. (The
                # outputs it asks for are not kept in memory: its own report stands alone.)
                self.board.counters["divergences_total"] += 1
                self.log.error(
                    "backup_diverged", seq=event.seq, icount=event.icount, report=event.report
                )
                lose(f"the backup diverged at log entry {event.seq} (icount {event.icount})")
                return
            elif isinstance(event, ConnectionClosed):
                lose("the backup closed the log channel")
                return

    def _ack_received(self, ack: Ack, now: float, lose: Callable[[str], None]) -> bool:
        """Release what ``ack`` covers; False once the joiner is lost."""
        if _trace.stamp is not None:
            _trace.stamp(_trace.ACK_RECEIVED, ack.received)
        replica = self.replica
        lag_s = replica.lag(now)[2]  # before this ack, as the first pair's primary measures it
        try:
            released = replica.ack_received(ack.received, ack.replayed, now)
        except LocalProtocolError as exc:
            lose(f"the backup broke the protocol: {exc}")
            return False
        for output in released:
            if _trace.stamp is not None:
                _trace.stamp(_trace.OUTPUT_RELEASED, ack.received)
            self.release(output)
        self._in_flight.acked(ack.received, now, lag_s)
        if self.catch_up is not None:
            self.catch_up.acked_seq, self.catch_up.replayed_seq = replica.received, replica.replayed
        if replica.role is ReplicaRole.ARBITRATING:
            lose("the backup's ack came after the peer timeout")
            return False
        self.on_ack()
        return True

    def take_ready_acks(self) -> None:
        """Outputs are held: release what the acks already in the protecting backup's
        socket cover, here (as the first pair's primary does, ``Primary.flush``). Only
        once protected: a joiner's ack that completes its catch-up is the receiving
        task's, which then sends Protected."""
        serving = self._serving
        if serving is None or self.replica.role is not ReplicaRole.PRIMARY:
            return
        link, lose = serving
        take_acks_now(link, self.replica, lambda ack, now: self._ack_received(ack, now, lose), lose)

    async def _protect(self, link: LogLink, lose: Callable[[str], None]) -> None:
        """The joiner holds every entry: generation N+1 begins, with this replica its primary."""
        replica, store = self.replica, self.store
        catch_up = self.catch_up
        assert catch_up is not None
        seq = replica.logged
        unreplayed = [(e.seq, len(e.reply)) for e in store.entries[replica.replayed : seq]]
        replica.protect(trio.current_time(), unreplayed)
        self.switchover.attach(link, lose)
        generation = catch_up.generation
        self.options.generation = generation
        self.arbiter.set_generation(generation)
        self.log = self.switchover.log = self.log.bind(generation=generation)
        catch_up.state, catch_up.finished = "protected", time.monotonic()
        self.board.peer_state = "connected"
        elapsed = catch_up.elapsed()
        self.log.info(
            "pair_protected",
            peer=link.peer,
            generation=generation,
            seq=seq,
            catch_up_s=round(elapsed, 3),
            entries_sent=catch_up.sent_entries,
            bytes_sent=catch_up.sent_bytes,
            entries_per_s=round(catch_up.sent_entries / elapsed, 1) if elapsed else math.inf,
        )
        self.role_changed("primary", f"the backup {link.peer} caught up")
        await link.send(Protected(generation, seq))

    async def _watch(self, link: LogLink, lose: Callable[[str], None]) -> None:
        """The joiner's silence, judged after reading what it sent (as ``ReplicaShell.watch``)."""
        replica = self.replica
        while True:
            if not replica.peer_dead(trio.current_time()):
                await trio.sleep_until(replica.next_deadline())
            elif not await peer_frames_read(link, replica, self.log):
                break
        lose(f"no word from the backup for {replica.silence_limit_s:g}s")
