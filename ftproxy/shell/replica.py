"""What a primary and a backup share: the shell around their replication core and peer."""

from __future__ import annotations

from typing import Any

import structlog
import trio

from ftproxy.core.replication import Replica, ReplicaRole
from ftproxy.guest import _trace
from ftproxy.shell.arbiter_client import ArbiterClient
from ftproxy.shell.hooks import RoleHooks
from ftproxy.shell.link import LogLink
from ftproxy.shell.options import ReplicaOptions
from ftproxy.shell.status import StatusBoard
from ftproxy.shell.world import WorldAnswers

log = structlog.get_logger()

# Scheduler passes the watcher gives the receiving task to read frames that
# arrived while this replica was not running (one is usually enough).
_DRAIN_CHECKPOINTS = 8


async def peer_frames_read(link: LogLink, replica: Replica[Any], bound_log: Any) -> bool:
    """Let the receiving task read what the peer sent; False if nothing was waiting
    (or the receiving task reads nothing: it is stuck, and so, for us, is the peer)."""
    waiting, heard = link.unread(), replica.last_heard
    if not waiting:
        return False
    for _ in range(_DRAIN_CHECKPOINTS):
        await trio.sleep(0)
        if replica.last_heard != heard or link.unread() < waiting:
            bound_log.info("peer_frames_drained", waiting_bytes=waiting)
            return True
    return False


class ReplicaShell:
    """What a primary and a backup do alike around their replication core and their peer."""

    def __init__(
        self,
        options: ReplicaOptions,
        role: ReplicaRole,
        link: LogLink | None,
        board: StatusBoard | None = None,
        hooks: RoleHooks | None = None,
    ) -> None:
        self.options = options
        self.link: LogLink | None = link
        self.replica: Replica[tuple[Any, ...]] = Replica(role, trio.current_time(), options.timing)
        self.peer_role = "primary" if role is ReplicaRole.BACKUP else "backup"
        self.arbiter = ArbiterClient(options, role.value)
        # The board the admin endpoint has served since start-up, if any: from here
        # on it shows this replica's core.
        self.board = board or StatusBoard(options, self.arbiter)
        self.board.arbiter, self.board.replica = self.arbiter, self.replica
        self.board.role_override = None
        self.hooks = hooks
        if link is not None:
            self.board.peer_state = "connected"
            self.board.peer_address = link.peer
        self.peer_gone = trio.Event()
        self.peer_lost_at: float | None = None
        self.log = log.bind(role=role.value, generation=options.generation)
        # An output was held since the log channel was last looked at: the acks
        # already in its socket are read at this frame's next exit or end.
        self._acks_due = False

    def gate_output(self, world: WorldAnswers, seq: int, message: tuple[Any, ...]) -> None:
        """Put ``message``, an output after entry ``seq``, out once the core allows:
        after the guest's reply if it may go now, else once an ack covers it."""
        released = self.replica.output(seq, message)
        if not released:
            self._acks_due = True
        for output in released:
            self.release_output(world, seq, output)

    @staticmethod
    def release_output(world: WorldAnswers, seq: int, message: tuple[Any, ...]) -> None:
        """Put ``message``, an output after entry ``seq``, on the network once the
        guest runs again: the one place an output leaves (and is stamped leaving)."""
        if _trace.stamp is not None:
            _trace.stamp(_trace.OUTPUT_RELEASED, seq)
        world.output_later(message)

    def take_ready_acks(self) -> None:
        """Outputs were held since the log channel was last looked at: the acks already
        in its socket release them here, a pass of trio's loop before the receiving
        task would have read them (the ack is often in by the time the output is)."""
        if self._acks_due:
            self._acks_due = False
            self._read_ready_acks()

    def _read_ready_acks(self) -> None:
        """Handle the acks already in the socket of the channel that protects this
        replica (subclasses: each reads its own)."""

    async def watch(self) -> None:
        """Declare the peer dead after the timeout of silence, judged after what arrived.

        When this replica was itself stopped (or starved), the peer's frames may
        sit unread in the socket when the deadline passes: the receiving task
        reads them first, and the silence is judged again from after that.
        """
        while True:
            if not self.replica.peer_dead(trio.current_time()):
                await trio.sleep_until(self.replica.next_deadline())
            elif not await self._peer_frames_read():
                break
        self.lose_peer(f"no word from the {self.peer_role} for {self.replica.silence_limit_s:g}s")

    async def _peer_frames_read(self) -> bool:
        return self.link is not None and await peer_frames_read(self.link, self.replica, self.log)

    def lose_peer(self, reason: str) -> None:
        """The peer is gone (however we learnt it): once, log it and wake who waits."""
        if self.peer_gone.is_set():
            return
        self.log.warning(f"{self.peer_role}_lost", reason=reason, received=self.replica.received)
        self.board.peer_state = "lost"
        self.board.peer_lost_reason = reason
        self.peer_lost_at = trio.current_time()
        self.peer_gone.set()
        self.peer_lost()

    def peer_lost(self) -> None:
        """What else must happen the moment the peer is gone (subclasses)."""

    def role_changed(self, role: str, reason: str) -> None:
        """Run the --on-role-change hook for the role this replica now has."""
        if self.hooks is not None:
            options = self.options
            self.hooks.changed(
                role, generation=options.generation, pair=options.pair, reason=reason
            )

    def went_alone(self) -> None:
        """Won the arbiter: count the failover, and how long it took since the peer went."""
        lost_at = self.peer_lost_at if self.peer_lost_at is not None else trio.current_time()
        self.board.failed_over(trio.current_time() - lost_at)
