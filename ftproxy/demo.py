"""``ftproxy demo``: a failover under load, and a verdict on what the clients were told.

Everything runs on 127.0.0.1 with ports picked here: an arbiter embedded in this
process (its store in a temporary directory), a primary and a backup in their own
processes with ``examples/kv.py`` as the guest, and a few client tasks that INCR
their own counter and SET fresh keys, recording every write whose reply they
actually received (an *acknowledged* write). After ``--warmup`` seconds the primary
and its guest are killed with SIGKILL; the load goes on through the failover for
``--after`` seconds; then every acknowledged write is read back from the new
primary. ``lost`` counts the acknowledged writes that are not there: 0 is the
output rule's promise, and ``--no-output-rule`` shows what breaking it costs.

The live view (rich) polls both replicas' admin endpoints; ``--json`` replaces it
with one JSON object on stdout. All I/O is trio's; every process and the
temporary directory go on every way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import structlog
import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

import arbiter
import ftproxy
from ftproxy.admin import AdminUnavailable, fetch_status

HOST: Final = "127.0.0.1"
KV_SCRIPT: Final = Path(ftproxy.__file__).resolve().parent.parent / "examples" / "kv.py"
READY_MARKER: Final = "kv listening on"

EXIT_OK: Final = 0
EXIT_LOST: Final = 1
EXIT_FAILED: Final = 3
EXIT_INTERRUPTED: Final = 130

REFRESH_S: Final = 0.2  # the live view and the admin polls, ~5 per second
ADMIN_TIMEOUT_S: Final = 0.5
REQUEST_TIMEOUT_S: Final = 2.0  # a reply later than this counts as a broken connection
CONNECT_TIMEOUT_S: Final = 1.0
BACKOFF_FIRST_S: Final = 0.005
BACKOFF_MAX_S: Final = 0.05
VERIFY_TIMEOUT_S: Final = 10.0
VERIFY_BATCH: Final = 512  # GETs pipelined per round trip when reading back
STOP_TIMEOUT_S: Final = 5.0
STDERR_TAIL_LINES: Final = 3
EVENTS_SHOWN: Final = 8
RECEIVE_SIZE: Final = 65536
DEFAULT_MAX_LAG_MS: Final = 100.0  # ``ftproxy primary --max-lag-ms``'s default
MAX_LAG_FACTOR: Final = 5
# The primary sends no heartbeat while it holds a batch back, and the backup presumes
# it dead after 500 ms of silence (``--peer-timeout-ms``): stay well below.
MAX_SHIP_DELAY_MS: Final = 400.0


class DemoError(Exception):
    """Something kept the demo from running to its verdict; the message is one line."""


class Interrupted(Exception):
    """The demo was asked to stop (SIGTERM or SIGHUP)."""


# --- RESP, as much as the demo speaks -------------------------------------------------


@dataclass(frozen=True)
class ErrorReply:
    """A ``-ERR ...`` reply: the server understood the request and refused it."""

    message: str


Reply = str | int | bytes | None | ErrorReply


class ConnectionLost(Exception):
    """The server closed the connection before the whole reply arrived."""


def encode_command(*args: bytes) -> bytes:
    """Encode one request in RESP's array form, the one every server accepts."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def parse_reply(buffer: bytes | bytearray) -> tuple[Reply, int] | None:
    """The first complete reply in ``buffer`` and the bytes it took, or None if partial.

    Only the reply types GET, SET and INCR produce: simple strings, errors,
    integers and bulk strings (``None`` for the nil bulk string).
    """
    end = buffer.find(b"\r\n")
    if end < 0:
        return None
    kind, body = buffer[:1], bytes(buffer[1:end])
    if kind == b"+":
        return body.decode(), end + 2
    if kind == b"-":
        return ErrorReply(body.decode("utf-8", "replace")), end + 2
    if kind == b":":
        return int(body), end + 2
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buffer) < stop + 2:
            return None
        return bytes(buffer[end + 2 : stop]), stop + 2
    raise ValueError(f"unexpected RESP reply type {bytes(kind)!r}")


class RespConnection:
    """One client connection to the service: requests out, replies in, in order."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    @classmethod
    async def open(cls, port: int) -> RespConnection:
        """Connect once; OSError if nobody listens (trio sets TCP_NODELAY)."""
        with trio.fail_after(CONNECT_TIMEOUT_S):
            return cls(await trio.open_tcp_stream(HOST, port))

    async def send(self, commands: Sequence[Sequence[bytes]]) -> None:
        """Send several requests in one write: pipelining, for reading back quickly."""
        await self._stream.send_all(b"".join(encode_command(*c) for c in commands))

    async def receive(self) -> Reply:
        """The next reply; ConnectionLost if the server closed the connection first."""
        while (parsed := parse_reply(self._buffer)) is None:
            data = await self._stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise ConnectionLost("the server closed the connection")
            self._buffer += data
        reply, used = parsed
        del self._buffer[:used]
        return reply

    async def call(self, *args: bytes) -> Reply:
        """One request and its reply, within REQUEST_TIMEOUT_S."""
        with trio.fail_after(REQUEST_TIMEOUT_S):
            await self.send([args])
            return await self.receive()

    async def aclose(self) -> None:
        """Close the connection; never raises, the connection is being dropped anyway."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stream.aclose()


# What a client sees of a dying or not yet listening server: it reconnects on all of them.
CONNECTION_ERRORS: Final = (
    OSError,
    ConnectionLost,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


async def connect_retrying(port: int) -> RespConnection:
    """Connect, retrying with a short backoff until the service accepts (or cancelled)."""
    delay = BACKOFF_FIRST_S
    while True:
        try:
            return await RespConnection.open(port)
        except (OSError, trio.TooSlowError):
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)


# --- What happened, as the demo goes -------------------------------------------------


@dataclass
class Events:
    """The demo's timeline: each event is logged and kept for the live view."""

    started_at: float = field(default_factory=trio.current_time)
    log_events: bool = True
    shown: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=EVENTS_SHOWN))

    def emit(self, event: str, message: str, **fields: Any) -> None:
        """Record ``message`` for the view and log ``event``: at info when there is no
        view (the log is then the progress report), at debug under the live view so
        that log lines on the terminal do not tear it."""
        elapsed = trio.current_time() - self.started_at
        self.shown.append((elapsed, message))
        log = structlog.get_logger()
        report = log.info if self.log_events else log.debug
        report(event, elapsed_s=round(elapsed, 3), **fields)


@dataclass
class LoadStats:
    """What the clients were told: every acknowledged write, and when replies came."""

    clients: int
    acked_incrs: list[int] = field(init=False)
    # INCRs sent that never got a reply: each may or may not have been applied.
    unanswered_incrs: list[int] = field(init=False)
    acked_sets: dict[bytes, bytes] = field(default_factory=dict)
    replies: int = 0
    reconnects: int = 0
    kill_at: float | None = None
    last_old_reply: float | None = None
    first_new_reply: float | None = None

    def __post_init__(self) -> None:
        self.acked_incrs = [0] * self.clients
        self.unanswered_incrs = [0] * self.clients

    @property
    def acked(self) -> int:
        """Acknowledged writes so far, INCRs and SETs."""
        return sum(self.acked_incrs) + len(self.acked_sets)

    def replied(self, connected_at: float) -> bool:
        """Note a reply on a connection opened at ``connected_at``; True if it is the first
        reply from the new primary. A connection opened before the kill can only have
        reached the old primary, one opened after it only the new one."""
        self.replies += 1
        now = trio.current_time()
        if self.kill_at is None or connected_at < self.kill_at:
            self.last_old_reply = now
            return False
        if self.first_new_reply is None:
            self.first_new_reply = now
            return True
        return False

    @property
    def failover_s(self) -> float | None:
        """From the old primary's last reply to the new one's first, as the clients saw it."""
        if self.last_old_reply is None or self.first_new_reply is None:
            return None
        return self.first_new_reply - self.last_old_reply


def counter_key(client: int) -> bytes:
    """The counter only client ``client`` INCRs."""
    return b"demo:ctr:%d" % client


class Load:
    """Concurrent clients, each on its own connection, writing until stopped."""

    def __init__(self, port: int, clients: int, events: Events) -> None:
        self.port = port
        self.stats = LoadStats(clients)
        self._events = events
        self._cancel = trio.CancelScope()
        self._first_ack = trio.Event()
        self.stopped = False

    async def run(self) -> None:
        """Run the clients until :meth:`stop`; start it with ``nursery.start_soon``."""
        with self._cancel:
            async with trio.open_nursery() as nursery:
                for client in range(self.stats.clients):
                    nursery.start_soon(self._client, client)

    def stop(self) -> None:
        """Stop every client at once; a request in flight stays unacknowledged."""
        self.stopped = True
        self._cancel.cancel()

    async def wait_first_ack(self) -> None:
        """Return once some write was acknowledged: the service really serves."""
        await self._first_ack.wait()

    async def _client(self, client: int) -> None:
        """INCR the client's counter, SET a fresh key, again; reconnect on any failure."""
        n = 0
        while True:
            connection = await connect_retrying(self.port)
            connected_at = trio.current_time()
            try:
                while True:
                    n += 1
                    await self._incr(connection, client, connected_at)
                    await self._set(connection, client, n, connected_at)
            except CONNECTION_ERRORS as exc:
                self.stats.reconnects += 1
                structlog.get_logger().debug(
                    "client_reconnects",
                    client=client,
                    error=repr(exc),
                    connected_for_s=round(trio.current_time() - connected_at, 4),
                    after_kill=self.stats.kill_at is not None,
                )
            finally:
                await connection.aclose()

    async def _incr(self, connection: RespConnection, client: int, connected_at: float) -> None:
        self.stats.unanswered_incrs[client] += 1
        reply = await connection.call(b"INCR", counter_key(client))
        self.stats.unanswered_incrs[client] -= 1
        self._acknowledged(connected_at)
        if isinstance(reply, int):
            self.stats.acked_incrs[client] += 1

    async def _set(
        self, connection: RespConnection, client: int, n: int, connected_at: float
    ) -> None:
        key, value = b"demo:key:%d:%d" % (client, n), b"%d" % n
        reply = await connection.call(b"SET", key, value)
        self._acknowledged(connected_at)
        if reply == "OK":
            self.stats.acked_sets[key] = value

    def _acknowledged(self, connected_at: float) -> None:
        self._first_ack.set()
        if self.stats.replied(connected_at):
            failover = self.stats.failover_s
            self._events.emit(
                "service_answers",
                "the service answers again"
                + (f": failover {failover:.3f} s" if failover is not None else ""),
                failover_s=failover,
            )


class RateMeter:
    """Replies per second over the last second, from samples of a growing count."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, count: int) -> float:
        """Add a sample now; the rate over the samples of the last second."""
        now = trio.current_time()
        self._samples.append((now, count))
        while len(self._samples) > 2 and now - self._samples[1][0] >= 1.0:
            self._samples.popleft()
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


# --- The replicas ---------------------------------------------------------------------


@dataclass
class Replica:
    """A primary or backup process, its guest, and what its admin endpoint last said."""

    name: str
    process: trio.Process
    admin: str
    stderr_path: Path
    ready: trio.Event = field(default_factory=trio.Event)
    guest_pids: list[int] = field(default_factory=list)
    status: dict[str, Any] | None = None
    unreachable: str = ""
    exit_expected: bool = False

    async def watch_stdout(self) -> None:
        """Read the replica's stdout (its guest's too) to the end: set ``ready`` at the
        guest's listening line, and fail the demo if the replica ends unexpectedly."""
        assert self.process.stdout is not None
        pending = b""
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            while data := await self.process.stdout.receive_some(RECEIVE_SIZE):
                pending += data
                *lines, pending = pending.split(b"\n")
                if not self.ready.is_set() and any(READY_MARKER.encode() in x for x in lines):
                    self.guest_pids = await _children(self.process.pid)
                    self.ready.set()
        code = await self.process.wait()
        if not self.exit_expected:
            raise DemoError(f"the {self.name} exited (code {code}){await self.stderr_tail()}")

    async def poll_status(self) -> None:
        """Fetch the replica's status about five times a second, for the live view."""
        while True:
            try:
                self.status = await fetch_status(self.admin, timeout=ADMIN_TIMEOUT_S)
                self.unreachable = ""
            except AdminUnavailable as exc:
                self.status, self.unreachable = None, exc.reason
            await trio.sleep(REFRESH_S)

    async def kill(self) -> None:
        """SIGKILL the supervisor, then its guest. In this order: a supervisor that
        outlived its guest, even briefly, would see the guest fail and stop in order,
        which is not the crash the demo is about."""
        self.exit_expected = True
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        for pid in self.guest_pids:
            if await _is_guest(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    async def stop(self) -> None:
        """Kill the replica and its guest and reap the replica; safe to call twice."""
        await self.kill()
        with trio.move_on_after(STOP_TIMEOUT_S):
            await self.process.wait()

    async def stderr_tail(self) -> str:
        """The last lines the replica logged, for an error message."""
        try:
            text = await trio.Path(self.stderr_path).read_text(errors="replace")
        except OSError:
            return ""
        tail = summarize_stderr(text)
        return "; its stderr ends with: " + " / ".join(tail) if tail else "; no stderr"


def summarize_stderr(text: str, lines: int = STDERR_TAIL_LINES) -> list[str]:
    """The last meaningful lines of a replica's stderr: JSON log lines shortened to
    their event and reason, traceback decoration (``|``, ``+--``, ``^^^``) dropped."""
    kept: list[str] = []
    for raw in text.splitlines():
        line = raw.strip().lstrip("|+- ").strip()
        if not line or set(line) <= set("^~ "):
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "event" in record:
                reason = record.get("reason") or record.get("error")
                line = f"{record['event']}" + (f" ({reason})" if reason else "")
        kept.append(line)
    return kept[-lines:]


async def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (a supervisor's guest), from /proc.

    Every thread of ``pid`` is asked: trio starts processes from a worker thread,
    and /proc lists a child under the thread that forked it.
    """
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in await trio.Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children += [int(x) for x in (await (task / "children").read_text()).split()]
    return children


async def _is_guest(pid: int) -> bool:
    """Whether ``pid`` still is a guest process, so that a reused pid is left alone."""
    try:
        return b"ftproxy.guest" in await trio.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def start_replica(
    name: str, role_args: list[str], admin: str, service_port: int, workdir: Path
) -> Replica:
    """Start ``ftproxy ROLE`` for kv.py, stdout piped, stderr in a file of the workdir.

    Its own session keeps a Ctrl-C at the terminal for the demo, which then stops it.
    """
    command = [
        sys.executable,
        "-m",
        "ftproxy.cli",
        "--log-format",
        "json",
        *role_args,
        "--admin",
        admin,
        "--insecure",
        "--",
        str(KV_SCRIPT),
        "--port",
        str(service_port),
    ]
    stderr_path = workdir / f"{name}.stderr"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=workdir,
            start_new_session=True,
        )
    return Replica(name, process, admin, stderr_path)


@dataclass(frozen=True)
class Ports:
    """The pair's ports on HOST: the service, the log channel, the admin endpoints."""

    service: int
    log: int
    primary_admin: int
    backup_admin: int
    arbiter: int


async def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on HOST, held together while picked."""
    sockets = [trio.socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            await sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# --- The verdict ------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Acknowledged writes against what the new primary holds."""

    output_rule: bool
    acked_incrs: int
    found_incrs: int
    acked_sets: int
    found_sets: int
    extra_incrs: int  # beyond acked + unanswered INCRs: never expected
    failover_s: float | None
    replies: int
    reconnects: int
    ship_delay_ms: float
    duration_s: float

    @property
    def acked(self) -> int:
        return self.acked_incrs + self.acked_sets

    @property
    def found(self) -> int:
        return self.found_incrs + self.found_sets

    @property
    def lost(self) -> int:
        return self.acked - self.found

    @property
    def passed(self) -> bool:
        """The output rule's promise held: nothing acknowledged lost, nothing invented."""
        return self.lost == 0 and self.extra_incrs == 0

    def summary(self) -> str:
        if self.passed:
            return "no acknowledged write lost"
        if self.lost:
            return f"{self.lost} acknowledged write{'s' if self.lost != 1 else ''} lost"
        return f"{self.extra_incrs} increments more than were sent"

    def as_json(self) -> dict[str, Any]:
        return {
            "acked": self.acked,
            "found": self.found,
            "lost": self.lost,
            "failover_s": None if self.failover_s is None else round(self.failover_s, 4),
            "output_rule": self.output_rule,
            "verdict": self.summary(),
            "acked_incrs": self.acked_incrs,
            "found_incrs": self.found_incrs,
            "acked_sets": self.acked_sets,
            "found_sets": self.found_sets,
            "extra_incrs": self.extra_incrs,
            "replies": self.replies,
            "reconnects": self.reconnects,
            "ship_delay_ms": None if self.output_rule else self.ship_delay_ms,
            "duration_s": round(self.duration_s, 3),
        }


async def read_back(port: int, keys: list[bytes]) -> list[Reply]:
    """GET every key from the service, pipelined in batches, on a fresh connection."""
    with trio.fail_after(VERIFY_TIMEOUT_S):
        connection = await connect_retrying(port)
        try:
            replies: list[Reply] = []
            for at in range(0, len(keys), VERIFY_BATCH):
                batch = keys[at : at + VERIFY_BATCH]
                await connection.send([(b"GET", key) for key in batch])
                replies += [await connection.receive() for _ in batch]
            return replies
        finally:
            await connection.aclose()


async def verify(port: int, stats: LoadStats, config: DemoConfig) -> Verdict:
    """Read back every acknowledged write from whoever serves ``port`` now."""
    counters = [counter_key(c) for c in range(stats.clients)]
    sets = list(stats.acked_sets.items())
    try:
        replies = await read_back(port, counters + [key for key, _ in sets])
    except trio.TooSlowError:
        raise DemoError(
            f"the service on {HOST}:{port} did not answer within {VERIFY_TIMEOUT_S:g} s "
            "after the failover"
        ) from None
    except CONNECTION_ERRORS as exc:
        raise DemoError(f"reading the writes back failed: {exc}") from None
    found_incrs = extra_incrs = 0
    for client, reply in enumerate(replies[: len(counters)]):
        acked, unanswered = stats.acked_incrs[client], stats.unanswered_incrs[client]
        value = int(reply) if isinstance(reply, bytes) else 0
        found_incrs += min(value, acked)
        extra_incrs += max(0, value - acked - unanswered)
        structlog.get_logger().debug(
            "counter_checked", client=client, acked=acked, unanswered=unanswered, value=value
        )
    found_sets = sum(
        reply == value for (_, value), reply in zip(sets, replies[len(counters) :], strict=True)
    )
    return Verdict(
        output_rule=config.output_rule,
        acked_incrs=sum(stats.acked_incrs),
        found_incrs=found_incrs,
        acked_sets=len(sets),
        found_sets=found_sets,
        extra_incrs=extra_incrs,
        failover_s=stats.failover_s,
        replies=stats.replies,
        reconnects=stats.reconnects,
        ship_delay_ms=config.ship_delay_ms,
        duration_s=0.0,
    )


# --- The run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings, from the command line."""

    warmup_s: float
    after_s: float
    clients: int
    output_rule: bool
    ship_delay_ms: float
    start_timeout_s: float
    json: bool


@dataclass
class Demo:
    """Everything the live view shows, filled in as the run goes."""

    config: DemoConfig
    events: Events
    replicas: list[Replica] = field(default_factory=list)
    load: Load | None = None
    rate: float = 0.0  # replies per second, over the last second


async def run(demo: Demo, workdir: Path) -> Verdict:
    """Arbiter, pair, load, kill, failover, read-back; every replica stopped on the way out."""
    events = demo.events
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_exit_on_signals)
        arbiter_port = await nursery.start(arbiter.serve, HOST, 0, workdir / "arbiter-store", None)
        events.emit("arbiter_started", f"arbiter on {HOST}:{arbiter_port}", port=arbiter_port)
        service, log_port, primary_admin, backup_admin = await free_ports(4)
        ports = Ports(service, log_port, primary_admin, backup_admin, arbiter_port)
        try:
            primary, backup = await _start_pair(demo, workdir, nursery, ports)
            verdict = await _failover(demo, nursery, primary, backup, ports.service)
        finally:
            with trio.CancelScope(shield=True):
                for replica in demo.replicas:
                    await replica.stop()
        nursery.cancel_scope.cancel()
    return verdict


async def _start_pair(
    demo: Demo, workdir: Path, nursery: trio.Nursery, ports: Ports
) -> tuple[Replica, Replica]:
    """Start primary and backup; return once both guests listen (the backup's replaying)."""
    config = demo.config
    arbiter_at, log_at = f"{HOST}:{ports.arbiter}", f"{HOST}:{ports.log}"
    primary_args = ["primary", "--log-listen", log_at, "--arbiter", arbiter_at]
    if not config.output_rule:
        primary_args += [
            "--no-output-rule",
            "--ship-delay-ms",
            f"{config.ship_delay_ms:g}",
            # The backup lags by up to a ship delay all the time; with the default bound
            # (100 ms) flow control would pause the guest's input for most of each delay,
            # and a kill in such a pause finds every released reply already shipped.
            "--max-lag-ms",
            f"{MAX_LAG_FACTOR * config.ship_delay_ms + DEFAULT_MAX_LAG_MS:g}",
        ]
    backup_args = ["backup", "--primary", log_at, "--arbiter", arbiter_at]
    for name, args, admin in (
        ("primary", primary_args, ports.primary_admin),
        ("backup", backup_args, ports.backup_admin),
    ):
        replica = await start_replica(name, args, f"{HOST}:{admin}", ports.service, workdir)
        demo.replicas.append(replica)
        nursery.start_soon(replica.watch_stdout)
    primary, backup = demo.replicas
    with trio.move_on_after(config.start_timeout_s) as waited:
        await primary.ready.wait()
        await backup.ready.wait()
    if waited.cancelled_caught:
        late = primary if not primary.ready.is_set() else backup
        raise DemoError(
            f"the {late.name}'s guest did not start listening within "
            f"{config.start_timeout_s:g} s{await late.stderr_tail()}"
        )
    for replica in demo.replicas:
        nursery.start_soon(replica.poll_status)
    demo.events.emit(
        "pair_ready",
        f"primary and backup ready, kv.py on {HOST}:{ports.service}",
        service=f"{HOST}:{ports.service}",
        pids={r.name: [r.process.pid, *r.guest_pids] for r in (primary, backup)},
        workdir=str(workdir),
    )
    return primary, backup


async def _failover(
    demo: Demo, nursery: trio.Nursery, primary: Replica, backup: Replica, service: int
) -> Verdict:
    """Load, warm-up, kill -9 of the primary, load through the failover, read-back."""
    config, events = demo.config, demo.events
    load = demo.load = Load(service, config.clients, events)
    nursery.start_soon(load.run)
    with trio.move_on_after(config.start_timeout_s) as waited:
        await load.wait_first_ack()
    if waited.cancelled_caught:
        raise DemoError(f"no write was acknowledged within {config.start_timeout_s:g} s")
    events.emit("load_started", f"load running: {config.clients} clients, INCR + SET")
    await trio.sleep(config.warmup_s)  # a point of the run to fail at, not synchronisation
    events.emit(
        "killing_primary",
        f"kill -9 of the primary (pid {primary.process.pid}) and its guest",
        pid=primary.process.pid,
        acked=load.stats.acked,
    )
    await primary.kill()
    load.stats.kill_at = trio.current_time()
    nursery.start_soon(_announce_go_live, backup, events)
    await trio.sleep(config.after_s)
    load.stop()
    events.emit(
        "load_stopped", f"load stopped: {load.stats.acked} acknowledged writes; reading back"
    )
    verdict = await verify(service, load.stats, config)
    return replace(verdict, duration_s=trio.current_time() - events.started_at)


async def _announce_go_live(backup: Replica, events: Events) -> None:
    """Report the backup's roles as its admin endpoint shows them, until it is live."""
    seen = ""
    while seen != "live":
        role = str((backup.status or {}).get("role", ""))
        if role and role != seen and role != "backup":
            events.emit("backup_role", f"backup is {role}", role=role)
        seen = role or seen
        await trio.sleep(REFRESH_S / 2)


async def _exit_on_signals() -> None:
    """SIGTERM and SIGHUP stop the demo the way Ctrl-C does: through the clean-up."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            raise Interrupted(signal.Signals(signum).name)


# --- The live view and the panel ----------------------------------------------------------


def _replica_row(replica: Replica) -> list[RenderableType]:
    """One line of the replica table, from the last status fetched."""
    status = replica.status
    if replica.exit_expected:
        return [replica.name, Text("killed", style="red")]
    if status is None:
        return [replica.name, Text(replica.unreachable or "starting", style="dim")]
    lag = status.get("lag") or {}
    role = str(status.get("role", "?"))
    peer = status.get("peer") or {}
    style = {"live": "bold green", "primary": "green", "backup": "cyan"}.get(role, "yellow")
    return [
        replica.name,
        Text(role, style=style),
        str(status.get("generation", "")),
        f"{status.get('exits_total', 0):,}",
        f"{status.get('log_seq', 0):,}",
        f"{status.get('acked_seq', 0):,}",
        f"{lag.get('entries', 0):,} / {lag.get('ms', 0):.0f} ms",
        f"{status.get('held_outputs', 0):,}",
        str(peer.get("state", "")),
    ]


def render_view(demo: Demo) -> RenderableType:
    """The live view: both replicas, the load, the last events."""
    table = Table(expand=True, box=None, pad_edge=False)
    columns = ("replica", "role", "gen", "exits", "log seq", "acked seq", "lag", "held", "peer")
    for column in columns:
        table.add_column(column, justify="left" if column in ("replica", "role") else "right")
    for replica in demo.replicas:
        table.add_row(*_replica_row(replica))
    load = demo.load
    if load is None:
        load_line = Text("load: not started", style="dim")
    else:
        load_line = Text.assemble(
            ("load ", "bold"),
            f"{demo.config.clients} clients  ",
            (f"{demo.rate:,.0f} req/s", "bold"),
            f"  acked writes {load.stats.acked:,}  reconnects {load.stats.reconnects}",
        )
    events = Text("\n").join(
        Text.assemble((f"{at:6.2f}s ", "dim"), message) for at, message in demo.events.shown
    )
    rule = (
        Text("output rule ON", style="green")
        if demo.config.output_rule
        else Text(f"output rule OFF (ship delay {demo.config.ship_delay_ms:g} ms)", style="red")
    )
    return Panel(
        Group(table, Text(""), load_line, Text(""), events),
        title=Text.assemble("ftproxy demo: kv.py, primary + backup, ", rule),
        border_style="blue",
    )


def render_verdict(verdict: Verdict) -> RenderableType:
    """The verdict panel: the numbers, then what they mean."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row(
        "acknowledged writes",
        f"{verdict.acked:,}  ({verdict.acked_incrs:,} INCR, {verdict.acked_sets:,} SET)",
    )
    table.add_row("found after failover", f"{verdict.found:,}")
    table.add_row("lost", Text(f"{verdict.lost:,}", style="red" if verdict.lost else "green"))
    failover = "n/a" if verdict.failover_s is None else f"{verdict.failover_s:.3f} s"
    table.add_row("failover (clients' view)", failover)
    table.add_row("requests answered", f"{verdict.replies:,}, {verdict.reconnects} reconnects")
    parts: list[RenderableType] = [table, Text("")]
    if verdict.passed:
        parts.append(Text("✔ " + verdict.summary(), style="bold green"))
    else:
        parts.append(Text("✘ " + verdict.summary(), style="bold red"))
    if not verdict.output_rule:
        parts.append(
            Text(
                "Expected: without the output rule a reply leaves before the backup holds the "
                f"log that produced it (here the log ships up to {verdict.ship_delay_ms:g} ms "
                "later), so writes acknowledged just before the kill die with the primary. "
                "The output rule prevents exactly this: run without --no-output-rule to see "
                "none lost.",
                style="yellow",
            )
        )
    style = "green" if verdict.passed else ("yellow" if not verdict.output_rule else "red")
    title = "output rule ON" if verdict.output_rule else "output rule OFF (unsafe)"
    return Panel(Group(*parts), title=f"verdict: {title}", border_style=style, expand=False)


async def _refresh(live: Live, demo: Demo) -> None:
    """Redraw the live view about five times a second (here, not in rich's thread)."""
    meter = RateMeter()
    while True:
        if demo.load is not None:
            demo.rate = 0.0 if demo.load.stopped else meter.sample(demo.load.stats.replies)
        live.update(render_view(demo), refresh=True)
        await trio.sleep(REFRESH_S)


# --- The command ------------------------------------------------------------------------------


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ftproxy demo``."""
    parser.add_argument(
        "--warmup", type=float, default=3.0, metavar="S", help="load before the kill (default 3)"
    )
    parser.add_argument(
        "--after",
        type=float,
        default=3.0,
        metavar="S",
        help="load after the kill, through the failover (default 3)",
    )
    parser.add_argument(
        "--clients", type=int, default=4, metavar="N", help="concurrent clients (default 4)"
    )
    parser.add_argument(
        "--json", action="store_true", help="no live view: print the verdict as one JSON object"
    )
    parser.add_argument(
        "--no-output-rule",
        action="store_true",
        help="run the primary without the output rule (UNSAFE) to show the writes it loses",
    )
    parser.add_argument(
        "--ship-delay-ms",
        type=float,
        default=200.0,
        metavar="MS",
        help="with --no-output-rule: how long each log batch waits before shipping "
        "(default 200), the window in which acknowledged writes are lost",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=15.0,
        metavar="S",
        help="how long the pair may take to start serving (default 15)",
    )


def _config(args: argparse.Namespace) -> DemoConfig:
    """Check the options; ValueError with a one-line message if they make no sense."""
    for name in ("warmup", "after", "start_timeout", "ship_delay_ms"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, not {value}")
    if args.ship_delay_ms > MAX_SHIP_DELAY_MS:
        raise ValueError(
            f"--ship-delay-ms must be at most {MAX_SHIP_DELAY_MS:g}: no heartbeat leaves "
            "the primary during the delay, and the backup gives it up after 500 ms"
        )
    if args.clients < 1:
        raise ValueError("--clients must be at least 1")
    return DemoConfig(
        warmup_s=args.warmup,
        after_s=args.after,
        clients=args.clients,
        output_rule=not args.no_output_rule,
        ship_delay_ms=args.ship_delay_ms,
        start_timeout_s=args.start_timeout,
        json=args.json,
    )


def run_demo(args: argparse.Namespace) -> int:
    """``ftproxy demo``: 0 when no acknowledged write was lost (or, with
    ``--no-output-rule``, when the demonstration ran to its end), 1 when the output
    rule's promise was broken, 3 when the demo could not run, 130 when interrupted."""
    try:
        config = _config(args)
    except ValueError as exc:
        return _fail(str(exc), 2)
    if not KV_SCRIPT.is_file():
        return _fail(f"the demo's guest {KV_SCRIPT} is missing", EXIT_FAILED)
    try:
        verdict = _run_in_tempdir(config)
    except BaseException as exc:  # sorted into one-line messages, bugs re-raised
        return _exit_for(exc)
    if config.json:
        print(json.dumps(verdict.as_json()), flush=True)
    else:
        Console().print(render_verdict(verdict))
    if not config.output_rule:
        return EXIT_OK  # losing writes is the outcome this mode demonstrates
    return EXIT_OK if verdict.passed else EXIT_LOST


def _run_in_tempdir(config: DemoConfig) -> Verdict:
    """Run the demo in a temporary directory (the arbiter's store, the replicas' logs)."""
    with tempfile.TemporaryDirectory(prefix="ftproxy-demo-") as tmp:
        workdir = Path(tmp)
        if config.json:
            return trio.run(_run_quiet, config, workdir)
        with _stderr_held_back(workdir / "held-back.log"):
            return trio.run(_run_live, config, workdir)


async def _run_quiet(config: DemoConfig, workdir: Path) -> Verdict:
    """The demo with no view: its events are logged, as the progress report."""
    return await run(Demo(config, Events(log_events=True)), workdir)


async def _run_live(config: DemoConfig, workdir: Path) -> Verdict:
    """The demo under the live view, which shows its events instead of the log."""
    demo = Demo(config, Events(log_events=False))
    with Live(render_view(demo), auto_refresh=False, console=Console()) as live:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_refresh, live, demo)
            verdict = await run(demo, workdir)
            nursery.cancel_scope.cancel()
        live.update(render_view(demo), refresh=True)
    return verdict


@contextlib.contextmanager
def _stderr_held_back(path: Path) -> Iterator[None]:
    """Hold back what is written to stderr (fd 2) while the live view owns the terminal,
    and write it out afterwards: a log line in the middle would tear the view. The
    demo's own events are in the view; what lands here is the embedded arbiter's log."""
    sys.stderr.flush()
    saved = os.dup(2)
    held = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(held, 2)
    os.close(held)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr.write(path.read_text(errors="replace"))
        sys.stderr.flush()


def _exit_for(exc: BaseException) -> int:
    """One line on stderr for whatever ended the demo early, and its exit code."""
    leaves = list(_leaves(exc))
    if any(isinstance(e, KeyboardInterrupt | Interrupted) for e in leaves):
        return _fail("interrupted; every process stopped", EXIT_INTERRUPTED)
    for leaf in leaves:
        if isinstance(leaf, DemoError):
            return _fail(str(leaf), EXIT_FAILED)
    for leaf in leaves:
        if isinstance(leaf, OSError | arbiter.StoreError):
            return _fail(f"{type(leaf).__name__}: {leaf}", EXIT_FAILED)
    raise exc  # a bug in the demo: let the traceback say where


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _fail(message: str, code: int) -> int:
    """Say why the demo ended, in one line on stderr; return ``code``."""
    print(f"ftproxy demo: {message}", file=sys.stderr, flush=True)
    return code


def _standalone(argv: Sequence[str] | None = None) -> int:
    """``python -m ftproxy.demo``, until the demo is an ``ftproxy`` subcommand."""
    from ftproxy.cli import configure_logging

    parser = argparse.ArgumentParser(prog="python -m ftproxy.demo", description=__doc__)
    add_demo_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(_standalone())
