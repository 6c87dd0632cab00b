"""What a primary and a backup share: options, the arbiter, status, exit codes."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

import arbiter
from ftproxy.front import PacketConfig
from ftproxy.front.socket import AddressMap
from ftproxy.guest import protocol as p
from ftproxy.link import LogLink
from ftproxy.replication import Replica, Role, Timing
from ftproxy.wire import Policy

log = structlog.get_logger()

EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_HALTED = 4


class Halted(Exception):
    """This replica must stop serving: it lost the arbiter, or its pair is decided."""


@dataclass
class ReplicaOptions:
    """Everything a primary or a backup is started with."""

    argv: list[str]
    arbiter: arbiter.Address
    secret: bytes | None
    timing: Timing = field(default_factory=Timing)
    address_map: AddressMap = field(default_factory=dict)
    admin: tuple[str, int] | None = None
    pair: str = "ftproxy"
    generation: int = 1
    policy: Policy = field(
        default_factory=lambda: Policy(p.DEFAULT_EXIT_EVERY, p.DEFAULT_CLOCK_STEP_NS)
    )
    extra_env: dict[str, str] = field(default_factory=dict)
    output_rule: bool = True
    # Only without the output rule: hold each log batch this long before
    # shipping it, so that the demo shows what the rule protects every time.
    ship_delay_s: float = 0.0
    # Packet mode (None: socket mode). A backup's comes from the primary's header.
    packet: PacketConfig | None = None
    # Where this replica keeps the log it holds (None: in memory only).
    data_dir: Path | None = None
    # Where this replica takes the next backup once it is live (a primary's is
    # its --log-listen); the arbiter records it with each win, for ``ftproxy run``.
    log_listen: tuple[str, int] | None = None


def generation_key(pair: str, generation: int) -> str:
    return f"{pair}/generation/{generation}"


LOG_ADDRESS_MARK = " log="


def candidate_name(role: str, log_listen: tuple[str, int] | None = None) -> str:
    """Who asks the arbiter; with the log address a new backup would join it at."""
    name = f"{role}@{socket.gethostname()}:{os.getpid()}"
    if log_listen is not None:
        name += f"{LOG_ADDRESS_MARK}{_address(log_listen)}"
    return name


def log_address_of(candidate: str) -> tuple[str, int] | None:
    """The log address a winner recorded with its win (None if it recorded none)."""
    _, mark, address = candidate.rpartition(LOG_ADDRESS_MARK)
    if not mark:
        return None
    try:
        return arbiter.parse_address(address)
    except ValueError:
        return None


@dataclass(frozen=True)
class LiveReplica:
    """The replica the arbiter names as live for a pair: the winner of its last decided key."""

    generation: int
    winner: str

    @property
    def log_address(self) -> tuple[str, int] | None:
        return log_address_of(self.winner)


class ArbiterClient:
    """Test-and-set on the pair's generation key, retried while the arbiter is down."""

    def __init__(self, options: ReplicaOptions, role: str) -> None:
        self.address = options.arbiter
        self.secret = options.secret
        self.pair = options.pair
        self.key = generation_key(options.pair, options.generation)
        self.candidate = candidate_name(role, options.log_listen)
        self.state = "idle"

    def set_generation(self, generation: int) -> None:
        """The pair moved on to ``generation`` (re-protection): arbitrate on its key."""
        self.key = generation_key(self.pair, generation)

    async def _query(self, key: str) -> arbiter.Decision | arbiter.Undecided:
        while True:
            try:
                answer = await arbiter.query(self.address, key, self.secret)
                self.state = "idle"
                return answer
            except arbiter.ArbiterUnavailable as exc:
                self.state = "unreachable"
                log.warning("arbiter_unreachable", error=str(exc), key=key)
                await trio.sleep(0.5)

    async def find_live(self) -> LiveReplica | None:
        """The winner of the pair's highest decided generation (None: nobody ever won).

        Generations are decided in order (a pair of generation N+1 forms only
        around the winner of N), so the scan stops at the first undecided key
        past the first decided one; a pair started with the explicit form
        begins at generation 1, one started by ``ftproxy run`` at 0.
        """
        found: LiveReplica | None = None
        generation = 0
        while True:
            answer = await self._query(generation_key(self.pair, generation))
            if isinstance(answer, arbiter.Decision):
                found = LiveReplica(generation, answer.winner)
            elif found is not None or generation >= 1:
                return found
            generation += 1

    async def claim_boot(self) -> arbiter.Decision:
        """Ask to be the pair's first replica: generation 0's winner boots the guest alone.

        Two nodes started at once both ask; the arbiter lets exactly one win.
        """
        self.state = "asking"
        decision = await arbiter.test_and_set_retrying(
            self.address, generation_key(self.pair, 0), self.candidate, self.secret
        )
        self.state = "won" if decision.won else "lost"
        log.info("arbiter_decided", key=decision.key, winner=decision.winner, won=decision.won)
        return decision

    async def check_undecided(self) -> None:
        """Refuse to serve a generation the arbiter already decided (retrying while down)."""
        while True:
            try:
                answer = await arbiter.query(self.address, self.key, self.secret)
                break
            except arbiter.ArbiterUnavailable as exc:
                self.state = "unreachable"
                log.warning("arbiter_unreachable", error=str(exc), key=self.key)
                await trio.sleep(0.5)
        self.state = "idle"
        if isinstance(answer, arbiter.Decision):
            raise Halted(
                f"generation {self.key} was already decided (won by {answer.winner}); "
                "a new pair needs a new --generation (or --pair)"
            )

    async def test_and_set(self) -> bool:
        """Ask for the right to act alone; True if this replica won it."""
        self.state = "asking"
        decision = await arbiter.test_and_set_retrying(
            self.address, self.key, self.candidate, self.secret
        )
        self.state = "won" if decision.won else "lost"
        log.info("arbiter_decided", key=self.key, winner=decision.winner, won=decision.won)
        return decision.won


class Samples:
    """The last ``size`` measurements of something, for percentiles in /status."""

    def __init__(self, size: int = 4096) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self._values.append(value)

    def summary(self) -> dict[str, float | int]:
        if not self._values:
            return {"p50": 0.0, "p99": 0.0, "samples": 0}
        ordered = sorted(self._values)

        def pick(quantile: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(quantile * len(ordered)))], 3)

        return {"p50": pick(0.5), "p99": pick(0.99), "samples": len(ordered)}


@dataclass
class StatusBoard:
    """What /status reports; the replica fills it in as it goes."""

    options: ReplicaOptions
    arbiter: ArbiterClient
    started: float = field(default_factory=time.monotonic)
    replica: Replica[Any] | None = None
    icount: Callable[[], int] = lambda: 0
    seq: Callable[[], int] = lambda: 0
    guest_pid: int | None = None
    peer_state: str = "none"
    peer_address: str = ""
    counters: dict[str, int] = field(
        default_factory=lambda: {"exits_total": 0, "outputs_total": 0, "log_bytes_total": 0}
    )
    role_override: str | None = None
    channel_rtt_ms: Samples = field(default_factory=Samples)
    lag_ms: Samples = field(default_factory=Samples)
    input_bytes: Callable[[], int] = lambda: 0
    front: Callable[[], Mapping[str, Any]] | None = None
    # Re-protection: whether the pair is protected now, the catch-up's progress,
    # the log held (``ftproxy.reprotect``, ``ftproxy.logstore``).
    protected: Callable[[], bool] = lambda: False
    catch_up: Callable[[], Mapping[str, Any] | None] = lambda: None
    log_store: Callable[[], Mapping[str, Any] | None] = lambda: None

    def snapshot(self) -> Mapping[str, Any]:
        now = trio.current_time()
        status: dict[str, Any] = {
            "pair": self.options.pair,
            "generation": self.options.generation,
            "guest_pid": self.guest_pid,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "icount": self.icount(),
            "output_rule": self.options.output_rule,
            "arbiter": {"state": self.arbiter.state, "address": _address(self.options.arbiter)},
        }
        if self.replica is not None:
            core = self.replica.status(now)
            status.update(
                role=core["role"],
                # A live replica keeps no peer log, but its guest's exits go on.
                log_seq=max(core["logged_seq"], self.seq()),
                acked_seq=core["acked_seq"],
                replayed_seq=core["replayed_seq"],
                held_outputs=core["held_outputs"],
                lag={
                    "entries": core["lag_entries"],
                    "bytes": core["lag_bytes"],
                    "ms": core["lag_ms"],
                },
                peer={
                    "state": self.peer_state,
                    "silent_ms": core["peer_silent_ms"],
                    "address": self.peer_address,
                },
            )
        if self.role_override:
            status["role"] = self.role_override
        status["protected"] = self.protected()
        catch_up = self.catch_up()
        if catch_up is not None:
            status["catch_up"] = catch_up
        store = self.log_store()
        if store is not None:
            status["log_store"] = store
        status["channel_rtt_ms"] = self.channel_rtt_ms.summary()
        status["lag_ms"] = self.lag_ms.summary()
        status.update(self.counters)
        status["input_bytes_total"] = self.input_bytes()
        if self.front is not None:
            status["front"] = self.front()
        return status


class ReplicaShell:
    """What a primary and a backup do alike around their replication core and their peer."""

    def __init__(self, options: ReplicaOptions, role: Role, link: LogLink | None) -> None:
        self.options = options
        self.link: LogLink | None = link
        self.replica: Replica[tuple[Any, ...]] = Replica(role, trio.current_time(), options.timing)
        self.peer_role = "primary" if role is Role.BACKUP else "backup"
        self.arbiter = ArbiterClient(options, role.value)
        self.board = StatusBoard(options, self.arbiter, replica=self.replica)
        if link is not None:
            self.board.peer_state = "connected"
            self.board.peer_address = link.peer
        self.peer_gone = trio.Event()
        self.log = log.bind(role=role.value, generation=options.generation)

    async def watch(self) -> None:
        """Declare the peer dead after the timeout of silence."""
        while not self.replica.peer_dead(trio.current_time()):
            await trio.sleep_until(self.replica.next_deadline())
        timeout = self.options.timing.peer_timeout_s
        self.lose_peer(f"no word from the {self.peer_role} for {timeout}s")

    def lose_peer(self, reason: str) -> None:
        """The peer is gone (however we learnt it): once, log it and wake who waits."""
        if self.peer_gone.is_set():
            return
        self.log.warning(f"{self.peer_role}_lost", reason=reason, received=self.replica.received)
        self.board.peer_state = "lost"
        self.peer_gone.set()
        self.peer_lost()

    def peer_lost(self) -> None:
        """What else must happen the moment the peer is gone (subclasses)."""


def _address(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


@contextlib.asynccontextmanager
async def admin_endpoint(options: ReplicaOptions, board: StatusBoard) -> AsyncIterator[None]:
    """Serve /status and /metrics for the life of the block, when asked to."""
    if options.admin is None:
        yield
        return
    from ftproxy.admin import serve_admin

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_admin, options.admin[0], options.admin[1], board.snapshot)
        log.info("admin_listening", address=f"{options.admin[0]}:{port}")
        yield
        nursery.cancel_scope.cancel()
