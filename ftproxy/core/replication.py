"""The replication core, sans I/O: roles, the output gate, lag and failure deadlines.

Like h11, it takes what happened and ``now`` and says what to do; it never
sleeps, reads a clock or touches a socket, so every rule here is tested without
processes (tests/test_replication.py, with a hypothesis state machine).

Roles and their transitions live in one table, ``TRANSITIONS``:

    primary ──peer_lost──▶ arbitrating ──won──▶ live       (continue solo)
    backup  ──peer_lost──▶ arbitrating ──lost─▶ halted     (release nothing)
    live    ──protected──▶ primary     (a new backup caught up: generation N+1)

A planned switchover (``ftproxy switchover``, SIGUSR1, ``--on-sigterm leave``):

    primary ──handover_asked──▶ handing_over ──handover_sent──▶ retiring
    handing_over ──handover_aborted──▶ primary   (nothing was promised yet)
    retiring ──handed_over──▶ handed_over      (the backup serves; this one exits)
    handing_over, retiring ──peer_lost──▶ arbitrating
    backup  ──handover_received──▶ arbitrating  (then won / lost, as at a failover)

Handing over, the primary holds its guest at its next exit and releases the
outputs already made as acks come (the backup's guest makes the same ones);
once the backup holds and has replayed every entry it sends ``Handover``, and
from then on releases nothing, ever: a retiring replica is one the backup may
already have replaced. The backup claims the pair through the arbiter exactly
as at a failover (same key), so a fault during the handover can never give
two winners: a primary whose backup dies meanwhile arbitrates as usual.

A live replica may take a new backup (re-protection): while the backup catches
up, the live replica still releases at once and watches the joiner's silence;
once the joiner has received every entry logged, the replica is the primary of
the next generation and outputs wait for acks again.

A primary holds each output until the backup has acknowledged receipt of the
log entry it follows (the output rule); a live replica releases at once; an
arbitrating one holds; a halted one releases nothing, ever.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

DEFAULT_HEARTBEAT_S: Final = 0.05
DEFAULT_PEER_TIMEOUT_S: Final = 0.5
DEFAULT_MAX_LAG_S: Final = 0.1
DEFAULT_MAX_LAG_BYTES: Final = 8 * 1024 * 1024
# A joiner is caught up once it holds every entry logged and has replayed all
# but this many: protected earlier, the new primary's input would stall on the
# replay lag bound while the joiner replays the history it just received.
CATCH_UP_SLACK_ENTRIES: Final = 256
# While a joiner's replay is further behind than that, the live replica's guest
# takes new input at most this often: replay is not much faster than the live
# run on a busy host, and without it a joiner under load would never converge.
CATCH_UP_THROTTLE_S: Final = 0.005
# A joiner catching up protects nothing yet (the live replica serves alone and
# releases at once; the joiner may not go live), so each side judges the other's
# silence on this longer bound until the joiner is Protected: on a busy host a
# bulk catch-up can stall past the peer timeout (seen in the soak under load:
# joiners dropped, and joiners halting, 0.5 s into their catch-up), and giving up
# only starts the catch-up over.
CATCH_UP_SILENCE_S: Final = 5.0


class ReplicaRole(enum.Enum):
    """Where a replica stands in the pair (not which end of a connection: that is auth.Side)."""

    PRIMARY = "primary"
    BACKUP = "backup"
    ARBITRATING = "arbitrating"
    LIVE = "live"
    HALTED = "halted"
    HANDING_OVER = "handing_over"  # guest held, waiting for the backup to replay all
    RETIRING = "retiring"  # Handover sent: releases nothing, waits for HandedOver
    HANDED_OVER = "handed_over"  # the backup serves now; this one exits


class Event(enum.Enum):
    PEER_LOST = "peer_lost"
    WON = "won"
    LOST = "lost"
    HALT = "halt"
    PROTECTED = "protected"
    HANDOVER_ASKED = "handover_asked"
    HANDOVER_ABORTED = "handover_aborted"
    HANDOVER_SENT = "handover_sent"
    HANDED_OVER = "handed_over"
    HANDOVER_RECEIVED = "handover_received"


TRANSITIONS: Final[dict[tuple[ReplicaRole, Event], ReplicaRole]] = {
    (ReplicaRole.PRIMARY, Event.PEER_LOST): ReplicaRole.ARBITRATING,
    (ReplicaRole.BACKUP, Event.PEER_LOST): ReplicaRole.ARBITRATING,
    (ReplicaRole.ARBITRATING, Event.WON): ReplicaRole.LIVE,
    (ReplicaRole.ARBITRATING, Event.LOST): ReplicaRole.HALTED,
    (ReplicaRole.PRIMARY, Event.HALT): ReplicaRole.HALTED,
    (ReplicaRole.BACKUP, Event.HALT): ReplicaRole.HALTED,
    (ReplicaRole.ARBITRATING, Event.HALT): ReplicaRole.HALTED,
    (ReplicaRole.LIVE, Event.HALT): ReplicaRole.HALTED,
    (ReplicaRole.LIVE, Event.PROTECTED): ReplicaRole.PRIMARY,
    (ReplicaRole.PRIMARY, Event.HANDOVER_ASKED): ReplicaRole.HANDING_OVER,
    (ReplicaRole.HANDING_OVER, Event.HANDOVER_ABORTED): ReplicaRole.PRIMARY,
    (ReplicaRole.HANDING_OVER, Event.HANDOVER_SENT): ReplicaRole.RETIRING,
    (ReplicaRole.HANDING_OVER, Event.PEER_LOST): ReplicaRole.ARBITRATING,
    (ReplicaRole.HANDING_OVER, Event.HALT): ReplicaRole.HALTED,
    (ReplicaRole.RETIRING, Event.HANDED_OVER): ReplicaRole.HANDED_OVER,
    (ReplicaRole.RETIRING, Event.PEER_LOST): ReplicaRole.ARBITRATING,
    (ReplicaRole.RETIRING, Event.HALT): ReplicaRole.HALTED,
    (ReplicaRole.BACKUP, Event.HANDOVER_RECEIVED): ReplicaRole.ARBITRATING,
}

# Roles whose outputs wait for the backup's acks (the output rule applies).
_GATED: Final = frozenset({ReplicaRole.PRIMARY, ReplicaRole.HANDING_OVER})
# The primary's roles: it ships the log and takes acks.
_PRIMARY_SIDE: Final = _GATED | {ReplicaRole.RETIRING}
# Roles that watch the peer's silence and heartbeat to it.
_WATCHING: Final = frozenset(
    {ReplicaRole.PRIMARY, ReplicaRole.BACKUP, ReplicaRole.HANDING_OVER, ReplicaRole.RETIRING}
)


class LocalProtocolError(Exception):
    """The caller asked the core for something its state does not allow."""


@dataclass(frozen=True)
class Timing:
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S
    max_lag_s: float = DEFAULT_MAX_LAG_S
    max_lag_bytes: int = DEFAULT_MAX_LAG_BYTES

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s < self.peer_timeout_s:
            raise ValueError("the heartbeat interval must be positive and below the peer timeout")
        if self.max_lag_s <= 0 or self.max_lag_bytes <= 0:
            raise ValueError("lag bounds must be positive")


T = TypeVar("T")


class OutputGate(Generic[T]):
    """Outputs in emission order, each held until the entry it follows is acknowledged."""

    def __init__(self) -> None:
        self._held: deque[tuple[int, T]] = deque()
        self.acked = 0

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, seq: int, output: T) -> None:
        if self._held and seq < self._held[-1][0]:
            raise LocalProtocolError(f"output after entry {seq} came after one for a later entry")
        self._held.append((seq, output))

    def ack(self, seq: int) -> list[T]:
        """Acknowledge receipt up to ``seq``; return the outputs this releases, in order."""
        if seq > self.acked:
            self.acked = seq
        released = []
        while self._held and self._held[0][0] <= self.acked:
            released.append(self._held.popleft()[1])
        return released

    def release_all(self) -> list[T]:
        released = [output for _, output in self._held]
        self._held.clear()
        return released

    def drop_all(self) -> int:
        count = len(self._held)
        self._held.clear()
        return count


class Replica(Generic[T]):
    """One replica's replication state; the trio shell feeds it and obeys it."""

    def __init__(self, role: ReplicaRole, now: float, timing: Timing = Timing()) -> None:
        if role not in (ReplicaRole.PRIMARY, ReplicaRole.BACKUP, ReplicaRole.LIVE):
            raise LocalProtocolError(
                f"a replica starts as primary, backup or live, not {role.value}"
            )
        self.role: ReplicaRole = role
        self.was: ReplicaRole = role
        self.timing = timing
        self.gate: OutputGate[T] = OutputGate()
        self.last_heard = now
        self.last_sent = now
        # Log positions: what exists, what the peer has, what the backup replayed.
        self.logged = 0
        self.received = 0
        self.replayed = 0
        self._unreplayed: deque[tuple[int, float, int]] = deque()  # (seq, logged_at, bytes)
        self._unreplayed_bytes = 0
        # A live replica streaming its log to a new backup that is not caught up yet.
        self.catching_up = False
        # A backup that has joined but has not been told Protected (a joiner catching up).
        self.awaiting_protection = role is ReplicaRole.BACKUP

    # -- roles ---------------------------------------------------------------

    def handle(self, event: Event) -> ReplicaRole:
        """Apply ``event`` by the transition table; return the new role."""
        new = TRANSITIONS.get((self.role, event))
        if new is None:
            raise LocalProtocolError(f"{event.value} is not possible as {self.role.value}")
        self.role = new
        return new

    @property
    def live(self) -> bool:
        return self.role is ReplicaRole.LIVE

    @property
    def gated(self) -> bool:
        """Outputs wait for the backup's acks, so every new entry must reach it: a
        primary, and one handing over (its guest may finish an exit already under
        way, and that entry must be drained like any other)."""
        return self.role in _GATED

    # -- the primary's side: entries out, acks in, outputs gated -------------

    def entry_logged(self, seq: int, size: int, now: float) -> None:
        if seq != self.logged + 1:
            raise LocalProtocolError(f"entry {seq} logged after {self.logged}")
        if self.role is ReplicaRole.RETIRING or self.role is ReplicaRole.HANDED_OVER:
            raise LocalProtocolError(f"entry {seq} logged after the Handover")
        self.logged = seq
        if self.role in _GATED:
            self._unreplayed.append((seq, now, size))
            self._unreplayed_bytes += size

    def output(self, seq: int, output: T) -> list[T]:
        """An output after entry ``seq``: what to send now (it or nothing)."""
        if self.role is ReplicaRole.LIVE:
            return [output]
        if self.role in (ReplicaRole.HALTED, ReplicaRole.RETIRING, ReplicaRole.HANDED_OVER):
            return []
        self.gate.hold(seq, output)
        if self.role in _GATED:
            return self.gate.ack(self.received)
        return []

    def ack_received(self, received: int, replayed: int, now: float) -> list[T]:
        """The backup has entries up to ``received`` and replayed up to ``replayed``.

        An ack that comes after a silence longer than the peer timeout (this
        replica was stopped, or the network was cut) releases nothing: the
        backup may have gone live meanwhile, so the primary must arbitrate first.
        """
        if self.role in _PRIMARY_SIDE and self.peer_dead(now):
            self.handle(Event.PEER_LOST)
            return []
        self.last_heard = now
        if received > self.logged:
            raise LocalProtocolError(f"ack for entry {received}, but only {self.logged} exist")
        self.received = max(self.received, received)
        self.replayed = max(self.replayed, min(replayed, self.received))
        while self._unreplayed and self._unreplayed[0][0] <= self.replayed:
            self._unreplayed_bytes -= self._unreplayed.popleft()[2]
        if self.role in _GATED:
            return self.gate.ack(self.received)
        return []

    def lag(self, now: float) -> tuple[int, int, float]:
        """Backup replay lag: (entries, bytes, seconds since the oldest unreplayed entry)."""
        if not self._unreplayed:
            return 0, 0, 0.0
        return len(self._unreplayed), self._unreplayed_bytes, now - self._unreplayed[0][1]

    def lag_exceeded(self, now: float) -> bool:
        """Past the bound, the primary stops feeding its guest new input."""
        if self.role is not ReplicaRole.PRIMARY:
            return False
        _, size, seconds = self.lag(now)
        return seconds > self.timing.max_lag_s or size > self.timing.max_lag_bytes

    # -- the backup's side: entries in, acks out ------------------------------

    def entries_received(self, last_seq: int, now: float) -> None:
        self.last_heard = now
        if last_seq < self.received:
            raise LocalProtocolError(f"entries up to {last_seq} after {self.received}")
        self.received = last_seq
        self.logged = max(self.logged, last_seq)

    def entry_replayed(self, seq: int) -> None:
        self.replayed = max(self.replayed, seq)

    # -- liveness --------------------------------------------------------------

    def heard(self, now: float) -> None:
        self.last_heard = now

    def sent(self, now: float) -> None:
        self.last_sent = now

    def heartbeat_due(self, now: float) -> bool:
        return self._watching and now - self.last_sent >= self.timing.heartbeat_s

    def peer_dead(self, now: float) -> bool:
        return self._watching and now - self.last_heard >= self.silence_limit_s

    @property
    def silence_limit_s(self) -> float:
        """How long the peer may be silent before it counts as gone: longer while a
        joiner catches up, on both sides (neither protects anything yet)."""
        if (self.role is ReplicaRole.LIVE and self.catching_up) or (
            self.role is ReplicaRole.BACKUP and self.awaiting_protection
        ):
            return max(self.timing.peer_timeout_s, CATCH_UP_SILENCE_S)
        return self.timing.peer_timeout_s

    def protection_received(self) -> None:
        """A backup was told Protected: its primary's silence counts on the peer timeout."""
        self.awaiting_protection = False

    def next_deadline(self) -> float:
        """When the shell must next call heartbeat_due / peer_dead (inf: never)."""
        if not self._watching:
            return float("inf")
        return min(
            self.last_sent + self.timing.heartbeat_s,
            self.last_heard + self.silence_limit_s,
        )

    @property
    def _watching(self) -> bool:
        return self.role in _WATCHING or (self.role is ReplicaRole.LIVE and self.catching_up)

    # -- re-protection: a live replica takes a new backup -----------------------

    def joiner_attached(self, now: float) -> None:
        """A new backup joined: it holds nothing yet; watch its silence from now."""
        if self.role is not ReplicaRole.LIVE or self.catching_up:
            raise LocalProtocolError(f"a backup cannot join a replica that is {self.role.value}")
        self.catching_up = True
        self.received = 0
        self.replayed = 0
        self.gate.acked = 0
        self.last_heard = self.last_sent = now

    def joiner_detached(self) -> None:
        """The joiner went away before it caught up; the replica stays live."""
        self.catching_up = False

    def caught_up(self) -> bool:
        """The joiner holds every entry logged so far, and has replayed nearly all of them:
        the pair can be protected."""
        return (
            self.role is ReplicaRole.LIVE
            and self.catching_up
            and self.received >= self.logged
            and self.logged - self.replayed <= CATCH_UP_SLACK_ENTRIES
        )

    def catch_up_behind(self) -> bool:
        """A joiner is catching up and its replay is more than the slack behind."""
        return (
            self.role is ReplicaRole.LIVE
            and self.catching_up
            and self.logged - self.replayed > CATCH_UP_SLACK_ENTRIES
        )

    def protect(self, now: float, unreplayed: list[tuple[int, int]]) -> None:
        """Become the primary of the next generation; outputs wait for acks from now on.

        ``unreplayed`` is (seq, bytes) of each entry the joiner received but has
        not replayed yet: its replay lag, counted from now, for flow control.
        """
        if not self.caught_up():
            raise LocalProtocolError("the joiner has not caught up yet")
        self.handle(Event.PROTECTED)
        self.catching_up = False
        self.gate.acked = self.received
        self._unreplayed.clear()
        self._unreplayed_bytes = 0
        for seq, size in unreplayed:
            if seq > self.replayed:
                self._unreplayed.append((seq, now, size))
                self._unreplayed_bytes += size

    # -- a planned switchover ----------------------------------------------------

    def ask_handover(self) -> None:
        """Begin handing the service to the backup: the shell holds its guest from now on."""
        if self.role is not ReplicaRole.PRIMARY:
            raise LocalProtocolError(f"only a primary can hand over, not a {self.role.value} one")
        self.handle(Event.HANDOVER_ASKED)

    def drained(self) -> bool:
        """Handing over, the backup holds and has replayed every entry, and no output
        waits for it: ``Handover`` may go (once the guest is held at an exit)."""
        return (
            self.role is ReplicaRole.HANDING_OVER
            and self.received >= self.logged
            and self.replayed >= self.logged
            and not self.gate
        )

    def abort_handover(self) -> None:
        """The backup did not drain in time: be the primary again (nothing was promised)."""
        self.handle(Event.HANDOVER_ABORTED)

    def handover_sent(self) -> None:
        """``Handover`` is on its way: from here on this replica releases nothing, ever
        (it may be replaced by the time the next output exists)."""
        if not self.drained():
            raise LocalProtocolError("Handover before the backup replayed every entry")
        self.handle(Event.HANDOVER_SENT)

    def handed_over(self) -> None:
        """The backup serves now: this replica is done."""
        self.handle(Event.HANDED_OVER)
        self.gate.drop_all()

    def handover_received(self) -> None:
        """The backup was handed the service: it claims the pair through the arbiter."""
        self.handle(Event.HANDOVER_RECEIVED)

    # -- after arbitration -----------------------------------------------------

    def won(self) -> list[T]:
        """This replica acts alone now: every held output goes out."""
        self.handle(Event.WON)
        self._unreplayed.clear()
        self._unreplayed_bytes = 0
        return self.gate.release_all()

    def lost(self) -> int:
        """The peer won: halt, releasing nothing; return how many outputs were dropped."""
        self.handle(Event.LOST)
        return self.gate.drop_all()

    def status(self, now: float) -> dict[str, Any]:
        entries, size, seconds = self.lag(now)
        return {
            "role": self.role.value,
            "logged_seq": self.logged,
            "acked_seq": self.received,
            "replayed_seq": self.replayed,
            "held_outputs": len(self.gate),
            "lag_entries": entries,
            "lag_bytes": size,
            "lag_ms": round(seconds * 1000, 3),
            "peer_silent_ms": round((now - self.last_heard) * 1000, 3),
        }
