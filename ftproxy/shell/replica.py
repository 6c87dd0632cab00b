"""What a primary and a backup share: options, the arbiter, status, exit codes."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog
import trio
from prometheus_client import Histogram

import arbiter
from ftproxy.core.records import Policy
from ftproxy.core.replication import Replica, Role, Timing
from ftproxy.guest import protocol as p
from ftproxy.shell.fence import FenceMode
from ftproxy.shell.front import PacketConfig
from ftproxy.shell.front.socket import AddressMap
from ftproxy.shell.hooks import DEFAULT_TIMEOUT_S as DEFAULT_HOOK_TIMEOUT_S
from ftproxy.shell.hooks import RoleHooks
from ftproxy.shell.link import LogLink
from ftproxy.shell.metrics import ReplicaMetrics

log = structlog.get_logger()

T = TypeVar("T")

EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_HALTED = 4
EXIT_STARTUP = 5


class StartupError(Exception):
    """A replica cannot start as asked: the flag, and why (a busy port, a missing script)."""

    def __init__(self, flag: str, reason: str) -> None:
        super().__init__(f"{flag}: {reason}")
        self.flag = flag
        self.reason = reason


async def bind_listeners(flag: str, address: tuple[str, int]) -> list[trio.SocketListener]:
    """Listen on ``address`` now, at start: a busy or foreign address is a StartupError."""
    host, port = address
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise StartupError(f"{flag} {host}:{port}", exc.strerror or str(exc)) from None
    if port == 0 and len(listeners) > 1:
        # Each address family got a port of its own; keep one, so the port we
        # report is the whole truth.
        for extra in listeners[1:]:
            extra.socket.close()
        listeners = listeners[:1]
    return listeners


def check_free(flag: str, address: tuple[str, int]) -> None:
    """Fail at start if ``address`` cannot be bound now (the guest binds it later).

    ``flag`` names the flag, address included, as the user wrote it.
    """
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise StartupError(flag, exc.strerror or str(exc)) from None


def check_program(argv: list[str], workdir: str | None = None) -> None:
    """The script after ``--`` must be there and readable before anything starts.

    A relative script is looked for where the guest will run: ``workdir`` (a
    backup's ``--workdir``), or this process's working directory.
    """
    script = argv[0]
    if script.startswith("-"):  # an interpreter option (-m MODULE): Python finds it
        return
    path = os.path.join(workdir, script) if workdir is not None else script
    if not os.path.exists(path):
        raise StartupError(f"-- {script}", "no such file")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise StartupError(f"-- {script}", "not a readable file")


def check_data_dir(data_dir: Path | None) -> None:
    """--data-dir must be a directory this replica can create and write in. Which pair
    it belongs to is checked once the pair is known (``ftproxy.shell.logstore``)."""
    if data_dir is None:
        return
    flag = f"--data-dir {data_dir}"
    existing = data_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise StartupError(flag, f"{existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "it" if existing == data_dir else f"{existing}, where it would be created,"
        raise StartupError(flag, f"{what} is not writable by this user")


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


class Halted(Exception):
    """This replica must stop serving: it lost the arbiter, or its pair is decided."""


@dataclass
class ReplicaOptions:
    """Everything a primary or a backup is started with."""

    argv: list[str]
    arbiter: arbiter.Arbiter  # built-in or etcd: arbiter.connect() of the --arbiter address
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
    # Where a backup runs its guest (None: its own working directory), never the
    # primary's: on one host the two would share the program's files.
    workdir: str | None = None
    # A primary's: files and directories the guest reads, pinned by digest.
    pins: list[str] = field(default_factory=list)
    # --on-role-change: run at every role change (ftproxy.shell.hooks), bounded in time.
    on_role_change: list[str] | None = None
    hook_timeout_s: float = DEFAULT_HOOK_TIMEOUT_S
    # What a backup that won does to an old primary on this host still holding the
    # service address: "kill" (SIGKILL it, then bind) or "none" (report it busy).
    fence: FenceMode = "kill"
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
        name += f"{LOG_ADDRESS_MARK}{log_listen[0]}:{log_listen[1]}"
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
    """Test-and-set on the pair's generation key, retried while the arbiter is down.

    Whichever arbiter answers (``options.arbiter``: built-in or etcd), the answers
    mean the same; retries are paced on the peer timeout's scale. An arbiter that
    refuses this replica (wrong secret or credentials) halts it: asking again
    would not cure that, and acting alone without an answer is never allowed.
    """

    def __init__(self, options: ReplicaOptions, role: str) -> None:
        # Any arbiter.Arbiter; the free functions arbiter.query() etc. accept it too.
        self.address = options.arbiter
        self.secret = options.secret
        self.timing = arbiter.ArbiterTiming.for_peer_timeout(options.timing.peer_timeout_s)
        self.pair = options.pair
        self.key = generation_key(options.pair, options.generation)
        self.candidate = candidate_name(role, options.log_listen)
        self.state = "idle"

    def set_generation(self, generation: int) -> None:
        """The pair moved on to ``generation`` (re-protection): arbitrate on its key."""
        self.key = generation_key(self.pair, generation)

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
            key = generation_key(self.pair, generation)
            answer = await self._ask(partial(self.address.query, key), key=key)
            self.state = "idle"
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
        key = generation_key(self.pair, 0)
        decision = await self._ask(partial(self.address.test_and_set, key, self.candidate), key=key)
        self.state = "won" if decision.won else "lost"
        log.info(
            "arbiter_decided",
            key=key,
            winner=decision.winner,
            won=decision.won,
            arbiter=self.address.kind,
        )
        return decision

    async def check_undecided(self) -> None:
        """Refuse to serve a generation the arbiter already decided (retrying while down)."""
        answer = await self._ask(lambda: self.address.query(self.key))
        self.state = "idle"
        if isinstance(answer, arbiter.Decision):
            raise Halted(
                f"generation {self.key} was already decided (won by {answer.winner}); "
                "a new pair needs a new --generation (or --pair)"
            )

    async def test_and_set(self) -> bool:
        """Ask for the right to act alone; True if this replica won it."""
        self.state = "asking"
        decision = await self._ask(lambda: self.address.test_and_set(self.key, self.candidate))
        self.state = "won" if decision.won else "lost"
        log.info(
            "arbiter_decided",
            key=self.key,
            winner=decision.winner,
            won=decision.won,
            arbiter=self.address.kind,
        )
        return decision.won

    async def _ask(self, question: Callable[[], Awaitable[T]], key: str | None = None) -> T:
        """``question()`` (about ``key``, by default this replica's generation key) until
        the arbiter answers; Halted if it refuses us."""

        async def asked() -> T:
            try:
                return await question()
            except arbiter.ArbiterUnavailable:
                self.state = "unreachable"  # for /status, until an answer comes
                raise

        try:
            return await arbiter.ask_until_answered(
                self.address, asked, self.timing, key=key or self.key, candidate=self.candidate
            )
        except (arbiter.ArbiterRefused, arbiter.RemoteProtocolError) as exc:
            raise Halted(
                f"the arbiter {self.address.describe()} refused this replica: {exc}"
            ) from None


class Samples:
    """The last ``size`` measurements of something, for percentiles in /status, and
    for a histogram of all of them in /metrics (in seconds, where they are ms)."""

    def __init__(self, size: int = 4096, histogram: Histogram | None = None) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self.histogram = histogram

    def add(self, value: float) -> None:
        self._values.append(value)
        if self.histogram is not None:
            self.histogram.observe(value / 1000)

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
    peer_lost_reason: str = ""
    counters: dict[str, int] = field(
        default_factory=lambda: {
            "exits_total": 0,
            "outputs_total": 0,
            "log_bytes_total": 0,
            "failovers_total": 0,
            "divergences_total": 0,
        }
    )
    role_override: str | None = None
    channel_rtt_ms: Samples = field(default_factory=Samples)
    lag_ms: Samples = field(default_factory=Samples)
    input_bytes: Callable[[], int] = lambda: 0
    front: Callable[[], Mapping[str, Any]] | None = None
    # Re-protection: whether the pair is protected now, the catch-up's progress,
    # the log held (``ftproxy.shell.reprotect``, ``ftproxy.shell.logstore``).
    protection: Callable[[], bool] = lambda: False
    catch_up: Callable[[], Mapping[str, Any] | None] = lambda: None
    log_store: Callable[[], Mapping[str, Any] | None] = lambda: None
    # Service addresses a live replica could not take over (the old primary holds them).
    address_busy: Callable[[], list[str]] = list
    metrics: ReplicaMetrics = field(default_factory=ReplicaMetrics)

    def __post_init__(self) -> None:
        self.channel_rtt_ms.histogram = self.metrics.channel_rtt
        self.lag_ms.histogram = self.metrics.lag
        self.metrics.serve_status(self.snapshot)

    def role(self) -> str:
        if self.role_override:
            return self.role_override
        return self.replica.role.value if self.replica is not None else "starting"

    def protected(self) -> bool:
        """The pair is protected: a caught-up backup holds the whole log. ``protection``
        says it for the role this replica is in (``ftproxy.shell.primary``,
        ``ftproxy.shell.backup``, ``ftproxy.shell.reprotect``). Whether outputs wait for
        it is ``output_rule``, apart: without the rule (a demonstration) the pair is
        formed, yet a failover loses."""
        return self.protection()

    def health(self) -> tuple[bool, str]:
        """/healthz: serving, or ready to take over; else why not."""
        role = self.role()
        if role == "primary" and self.peer_state == "connected":
            return True, "primary: serving, with a backup"
        if role == "live":
            busy = self.address_busy()
            if busy:
                return False, f"live: cannot serve, address busy: {', '.join(busy)}"
            return True, "live: serving alone"
        if role == "backup" and self.peer_state == "connected":
            return True, "backup: replaying, ready to take over"
        return False, f"{role}: neither serving nor ready to take over"

    def failed_over(self, seconds: float) -> None:
        """This replica won the arbiter and serves alone, ``seconds`` after losing its peer."""
        self.counters["failovers_total"] += 1
        self.metrics.failover.observe(seconds)

    def snapshot(self) -> Mapping[str, Any]:
        now = trio.current_time()
        status: dict[str, Any] = {
            "pair": self.options.pair,
            "generation": self.options.generation,
            "guest_pid": self.guest_pid,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "icount": self.icount(),
            "output_rule": self.options.output_rule,
            "arbiter": {"state": self.arbiter.state, "address": self.options.arbiter.describe()},
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
                    **({"lost_because": self.peer_lost_reason} if self.peer_lost_reason else {}),
                },
            )
        if self.role_override:
            status["role"] = self.role_override
        status["protected"] = self.protected()
        busy = self.address_busy()
        # Serving clients now: a primary with its backup, a live replica that holds
        # its addresses (not one whose old primary still does: --fence none).
        role = status.get("role")
        status["serving"] = (role == "primary" and self.peer_state == "connected") or (
            role == "live" and not busy
        )
        if role == "live":
            status["address_busy"] = busy
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

    def __init__(
        self,
        options: ReplicaOptions,
        role: Role,
        link: LogLink | None,
        board: StatusBoard | None = None,
        hooks: RoleHooks | None = None,
    ) -> None:
        self.options = options
        self.link: LogLink | None = link
        self.replica: Replica[tuple[Any, ...]] = Replica(role, trio.current_time(), options.timing)
        self.peer_role = "primary" if role is Role.BACKUP else "backup"
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
        timeout = self.options.timing.peer_timeout_s
        self.lose_peer(f"no word from the {self.peer_role} for {timeout}s")

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


@contextlib.asynccontextmanager
async def admin_endpoint(options: ReplicaOptions, board: StatusBoard) -> AsyncIterator[None]:
    """Serve /status, /metrics and /healthz for the life of the block, when asked to.

    The port is bound before the block starts: busy, it is a StartupError.
    """
    if options.admin is None:
        yield
        return
    from ftproxy.shell.admin import serve_admin

    listeners = await bind_listeners("--admin", options.admin)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(
                serve_admin,
                options.admin[0],
                options.admin[1],
                board.snapshot,
                metrics=board.metrics.render,
                health=board.health,
                listeners=listeners,
            )
        )
        log.info("admin_listening", address=f"{options.admin[0]}:{port}")
        yield
        nursery.cancel_scope.cancel()
