"""``ftproxy demo``: a failover under load, and a verdict on what the clients were told.

Socket mode (the default) runs everything on 127.0.0.1 with ports picked here: an
arbiter embedded in this process (its store in a temporary directory), a primary and
a backup in their own processes with ``examples/kv.py`` as the guest, and a few client
tasks that INCR their own counter and SET fresh keys, recording every write whose
reply they actually received (an *acknowledged* write). After ``--warmup`` seconds the
primary and its guest are killed with SIGKILL; the load goes on through the failover
for ``--after`` seconds; then every acknowledged write is read back from the new
primary. ``lost`` counts the acknowledged writes that are not there: 0 is the output
rule's promise, and ``--no-output-rule`` shows what breaking it costs. The clients
reconnect after the failover: their connections died with the primary's kernel.

``--etcd`` decides the failover through etcd instead: a three-member cluster on
127.0.0.1 (Debian's ``etcd-server``), one member killed mid-run, then the primary;
the verdict names the arbiter and reads the decision back from etcd.

``--packet`` (root) shows what packet mode adds: the connections survive. It builds
a lab of its own (``ftproxy.tools.lab``, prefix ``ftdemo``), runs the arbiter, the primary
and the backup in their hosts, the replicas with ``--front packet`` for the virtual
IP, and holds ONE kernel TCP connection from the client host to the virtual IP:
INCR, SET, GET in turn, every reply checked. The primary is killed (or, with
``--partition``, cut off at the switch); the same connection goes on through the
failover and reads every acknowledged write back at the end. The demo's own thread
runs in the client host's network namespace, so its sockets are the client's.

The live view (rich) polls both replicas' admin endpoints; ``--json`` replaces it
with one JSON object on stdout (``VERDICT_FIELDS``, the same in both modes), and
without a terminal the demo logs its progress to stderr and prints only the
verdict. All I/O is trio's; every process, the temporary directory and the lab
go on every way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Final, Protocol

import structlog
import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

import arbiter
import ftproxy
from ftproxy.tools import etcdlocal
from ftproxy.tools import lab as netlab
from ftproxy.tools.status import AdminUnavailable, fetch_status

HOST: Final = "127.0.0.1"
KV_SCRIPT: Final = Path(ftproxy.__file__).resolve().parent.parent / "examples" / "kv.py"
READY_MARKER: Final = "kv listening on"

EXIT_OK: Final = 0
EXIT_LOST: Final = 1
EXIT_USAGE: Final = 2
EXIT_FAILED: Final = 3
# --no-output-rule lost acknowledged writes: what it demonstrates, yet a verdict
# of lost writes, so not 0; and not EXIT_LOST, which means the rule failed.
EXIT_LOST_UNSAFE: Final = 4
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

# --packet: the lab, and where everything listens inside it.
LAB_PREFIX: Final = "ftdemo"  # not the user's ``ftproxy lab`` (prefix ftlab)
NEEDS_ROOT: Final = (
    "--packet needs root (it builds network namespaces and raw sockets): "
    "run `sudo ftproxy demo --packet`"
)
VIP_PREFIX_LEN: Final = netlab.SUBNET.prefixlen
SERVICE_PORT: Final = 6380
LOG_PORT: Final = 7000
ARBITER_PORT: Final = 7100
ADMIN_PORT: Final = 7200
# A request through the failover waits for the client's TCP retransmissions, which
# back off (0.2 s, 0.4 s, 0.8 s...): a partition is only noticed after the peer
# timeout, so give a reply far longer than the socket demo does before calling the
# connection broken.
PACKET_REQUEST_TIMEOUT_S: Final = 10.0
REPROTECT_TIMEOUT_S: Final = 120.0  # a fresh backup catching up on the whole history
STALL_REPORTED_S: Final = 0.05  # a silence after the kill worth an event in the view
_CLONE_NEWNET: Final = 0x40000000
_TCP_INFO_TOTAL_RETRANS: Final = 100  # offset of tcpi_total_retrans in struct tcp_info


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
    async def open(cls, port: int, host: str = HOST) -> RespConnection:
        """Connect once; OSError if nobody listens (trio sets TCP_NODELAY)."""
        with trio.fail_after(CONNECT_TIMEOUT_S):
            return cls(await trio.open_tcp_stream(host, port))

    @property
    def local_address(self) -> str:
        """The client's end of the connection, ``IP:PORT``."""
        host, port = self._stream.socket.getsockname()[:2]
        return f"{host}:{port}"

    def retransmissions(self) -> int | None:
        """Segments the client's kernel retransmitted on this connection (TCP_INFO)."""
        try:
            info = self._stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except OSError:
            return None
        if len(info) < _TCP_INFO_TOTAL_RETRANS + 4:
            return None
        return int(struct.unpack_from("I", info, _TCP_INFO_TOTAL_RETRANS)[0])

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

    async def call(self, *args: bytes, timeout: float = REQUEST_TIMEOUT_S) -> Reply:
        """One request and its reply, within ``timeout`` seconds."""
        with trio.fail_after(timeout):
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


async def connect_retrying(port: int, host: str = HOST) -> RespConnection:
    """Connect, retrying with a short backoff until the service accepts (or cancelled)."""
    delay = BACKOFF_FIRST_S
    while True:
        try:
            return await RespConnection.open(port, host)
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


def describe_connection_error(exc: BaseException, timeout: float | None = None) -> str:
    """What broke a connection, in a few words (trio wraps the OSError it got)."""
    if isinstance(exc, trio.TooSlowError):
        return "no reply" + (f" within {timeout:g} s" if timeout is not None else "")
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(cause or exc) or type(exc).__name__


class ConnectionLoad:
    """One client connection to the virtual IP, kept open through the failover.

    INCR, SET, GET in turn, one request at a time, every reply checked against what
    exactly-once execution must answer: each INCR one more than the last (a lost
    INCR repeats a number, one applied twice skips one), a SET OK, a GET the value
    just set. It never reconnects: a reset, a close, or a request unanswered for
    ``timeout`` seconds ends the load and fails the demo.
    """

    def __init__(self, host: str, port: int, events: Events, timeout: float) -> None:
        self.host, self.port = host, port
        self.stats = LoadStats(1)
        self.connection: RespConnection | None = None
        self.client_address = ""
        self.error: str | None = None  # why the connection broke, if it did
        self.wrong: list[str] = []  # the first wrong replies, described
        self.wrong_count = 0
        self.retransmissions: int | None = None
        self.stopped = False
        self.finished = trio.Event()
        self._events = events
        self._timeout = timeout
        self._last_reply: float | None = None
        self._first_reply: float | None = None
        self._replies_before_kill = 0
        self._last_incr = 0
        self._first_ack = trio.Event()

    async def connect(self, timeout: float) -> None:
        """Open the connection (the guest may still be answering its first ARP)."""
        with trio.move_on_after(timeout):
            self.connection = await connect_retrying(self.port, self.host)
        if self.connection is None:
            raise DemoError(f"could not connect to {self.host}:{self.port} within {timeout:g} s")
        self.client_address = self.connection.local_address

    async def run(self) -> None:
        """Run until :meth:`stop` or until the connection breaks; never reconnect."""
        assert self.connection is not None
        n = 0
        try:
            while not self.stopped:
                n += 1
                await self._round(self.connection, n)
        except CONNECTION_ERRORS as exc:
            self.error = describe_connection_error(exc, self._timeout)
            self._events.emit(
                "connection_broken",
                f"the connection broke: {self.error} (round {n})",
                error=self.error,
                round=n,
            )
        finally:
            self.retransmissions = self.connection.retransmissions()
            self.finished.set()

    async def stop(self) -> None:
        """Let the round in flight finish (so no request is left unanswered), then stop."""
        self.stopped = True
        await self.finished.wait()

    async def wait_first_ack(self) -> None:
        """Return once some write was acknowledged: the service really serves."""
        await self._first_ack.wait()

    def rates(self) -> tuple[float | None, float | None]:
        """Replies per second on the connection: while the pair served it (up to the
        kill), and from the new primary alone (after the failover's silence)."""
        stats, first, last = self.stats, self._first_reply, self._last_reply
        if stats.kill_at is None or first is None or last is None:
            return None, None
        pair = (
            self._replies_before_kill / (stats.kill_at - first) if stats.kill_at > first else None
        )
        after = last - stats.kill_at - (stats.failover_s or 0.0)
        alone = (stats.replies - self._replies_before_kill) / after if after > 0 else None
        return pair, alone

    async def _round(self, connection: RespConnection, n: int) -> None:
        key, value = b"demo:key:%d" % n, b"%d" % n
        self.stats.unanswered_incrs[0] += 1
        reply = await self._call(connection, b"INCR", counter_key(0))
        self.stats.unanswered_incrs[0] -= 1
        expected = self._last_incr + 1
        if isinstance(reply, int):
            self.stats.acked_incrs[0] += 1
            self._last_incr = reply
        self._check(reply == expected, f"INCR #{n} answered {reply!r}, expected {expected}")
        reply = await self._call(connection, b"SET", key, value)
        if reply == "OK":
            self.stats.acked_sets[key] = value
        self._check(reply == "OK", f"SET #{n} answered {reply!r}")
        reply = await self._call(connection, b"GET", key)
        self._check(reply == value, f"GET #{n} answered {reply!r}, expected {value!r}")

    async def _call(self, connection: RespConnection, *args: bytes) -> Reply:
        reply = await connection.call(*args, timeout=self._timeout)
        self._replied()
        return reply

    def _check(self, correct: bool, wrong: str) -> None:
        if not correct:
            self.wrong_count += 1
            if len(self.wrong) < EVENTS_SHOWN:
                self.wrong.append(wrong)
            self._events.emit("wrong_reply", wrong)

    def _replied(self) -> None:
        """Count a reply; after the kill, keep the longest silence that ended since: the
        failover as this client saw it (from the old primary's last reply before the
        kill to the new one's first; a reply already on its way at the kill does not
        cut the measure short)."""
        stats, now = self.stats, trio.current_time()
        stats.replies += 1
        self._first_ack.set()
        last, self._last_reply = self._last_reply, now
        if self._first_reply is None:
            self._first_reply = now
        if stats.kill_at is None or last is None or now < stats.kill_at:
            self._replies_before_kill += 1
            return
        silence = now - last
        if stats.failover_s is None or silence > stats.failover_s:
            stats.last_old_reply, stats.first_new_reply = last, now
        if silence >= STALL_REPORTED_S:
            self._events.emit(
                "service_answers",
                f"the same connection answers again after {silence:.3f} s of silence",
                silence_s=round(silence, 4),
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
    """A primary or backup process, its guest, and what its admin endpoint last said
    (``--packet`` runs its arbiter process as one too, with no guest and no admin)."""

    name: str
    process: trio.Process
    admin: str
    stderr_path: Path
    ready: trio.Event = field(default_factory=trio.Event)
    guest_pids: list[int] = field(default_factory=list)
    status: dict[str, Any] | None = None
    unreachable: str = ""
    exit_expected: bool = False
    fate: str = "killed"  # what the demo did to it, once ``exit_expected``

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
        if not self.exit_expected:
            self.fate = "stopped"
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


@dataclass(frozen=True)
class Launch:
    """How to start one replica: its role's arguments, its admin endpoint, where."""

    name: str
    role_args: list[str]
    admin: str
    netns: str | None = None  # a lab host's network namespace (``--packet``)


FTPROXY_COMMAND: Final = (sys.executable, "-m", "ftproxy.cli", "--log-format", "json")


def in_netns(netns: str | None, command: Sequence[str]) -> list[str]:
    """``command``, run inside the network namespace ``netns`` if there is one
    (``ip netns exec`` execs in place: the process's pid is the command's own)."""
    return ["ip", "netns", "exec", netns, *command] if netns else list(command)


async def start_replica(
    launch: Launch, service_port: int, workdir: Path, auth: Sequence[str]
) -> Replica:
    """Start ``ftproxy ROLE`` for kv.py (``auth``: ``--insecure`` or ``--secret-file F``)."""
    command = [
        *FTPROXY_COMMAND,
        *launch.role_args,
        "--admin",
        launch.admin,
        *auth,
        "--",
        str(KV_SCRIPT),
        "--port",
        str(service_port),
    ]
    return await start_process(launch.name, in_netns(launch.netns, command), launch.admin, workdir)


async def start_process(name: str, command: list[str], admin: str, workdir: Path) -> Replica:
    """Start ``command``, stdout piped, stderr in a file of the workdir.

    Its own session keeps a Ctrl-C at the terminal for the demo, which then stops it.
    """
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
    arbiter: str  # the --arbiter address: the embedded arbiter's HOST:PORT, or etcd://...
    backup_log: int = 0  # --rounds: where the backup takes the next backup once live


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


class Outcome(Protocol):
    """What a verdict panel and ``--json`` need from either demo's verdict."""

    @property
    def passed(self) -> bool: ...

    @property
    def title(self) -> str: ...

    def summary(self) -> str: ...

    def rows(self) -> list[tuple[str, RenderableType]]: ...

    def notes(self) -> list[Text]: ...

    def as_json(self) -> dict[str, Any]: ...


def _lost_cell(lost: int) -> Text:
    return Text(f"{lost:,}", style="red" if lost else "green")


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


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
    etcd: EtcdDecision | None = None  # --etcd: the decision, read back from etcd
    rounds: tuple[Round, ...] = ()

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
        """The output rule's promise held: nothing acknowledged lost, nothing invented
        (and with --etcd, etcd holds the backup as the winner)."""
        decided = self.etcd is None or self.etcd.winner == self.etcd.backup
        return self.lost == 0 and self.extra_incrs == 0 and decided

    def summary(self) -> str:
        if self.passed:
            through = " (decided through etcd)" if self.etcd is not None else ""
            return f"no acknowledged write lost{through}"
        if self.lost:
            return f"{self.lost} acknowledged write{'s' if self.lost != 1 else ''} lost"
        if self.etcd is not None and self.etcd.winner != self.etcd.backup:
            return f"etcd holds {self.etcd.winner} as the winner, not the backup"
        return f"{self.extra_incrs} increments more than were sent"

    @property
    def title(self) -> str:
        return "output rule ON" if self.output_rule else "output rule OFF (unsafe)"

    def rows(self) -> list[tuple[str, RenderableType]]:
        return [
            (
                "acknowledged writes",
                f"{self.acked:,}  ({self.acked_incrs:,} INCR, {self.acked_sets:,} SET)",
            ),
            ("found after failover", f"{self.found:,}"),
            ("lost", _lost_cell(self.lost)),
            *(
                [("failover (clients' view)", _seconds(self.failover_s))]
                if not self.rounds
                else [(f"round {r.number}", r.describe()) for r in self.rounds]
            ),
            ("requests answered", f"{self.replies:,}, {self.reconnects} reconnects"),
            *self._arbiter_rows(),
        ]

    def _arbiter_rows(self) -> list[tuple[str, RenderableType]]:
        if self.etcd is None:
            return [("arbiter", "built-in (embedded)")]
        etcd = self.etcd
        alive = etcd.members - etcd.members_killed
        return [
            ("arbiter", f"etcd, {alive} of {etcd.members} members up"),
            (etcd.key, etcd.winner or Text("undecided", style="red")),
        ]

    def notes(self) -> list[Text]:
        if self.output_rule:
            return []
        return [
            Text(
                "Expected: without the output rule a reply leaves before the backup holds the "
                f"log that produced it (here the log ships up to {self.ship_delay_ms:g} ms "
                "later), so writes acknowledged just before the kill die with the primary. "
                "The output rule prevents exactly this: run without --no-output-rule to see "
                f"none lost. Exit code {EXIT_LOST_UNSAFE}: writes were lost, as this mode "
                "shows they can be.",
                style="yellow",
            )
        ]

    def as_json(self) -> dict[str, Any]:
        return verdict_json(
            mode="socket",
            passed=self.passed,
            verdict=self.summary(),
            output_rule=self.output_rule,
            failure="kill",
            acked=self.acked,
            found=self.found,
            lost=self.lost,
            failover_s=None if self.failover_s is None else round(self.failover_s, 4),
            acked_incrs=self.acked_incrs,
            found_incrs=self.found_incrs,
            extra_incrs=self.extra_incrs,
            acked_sets=self.acked_sets,
            found_sets=self.found_sets,
            requests=self.replies,
            reconnects=self.reconnects,
            read_back_on="a new connection",
            ship_delay_ms=None if self.output_rule else self.ship_delay_ms,
            duration_s=round(self.duration_s, 3),
            arbiter={"kind": "builtin"} if self.etcd is None else self._etcd_json(self.etcd),
            rounds=[r.as_json() for r in self.rounds] if self.rounds else None,
        )

    @staticmethod
    def _etcd_json(etcd: EtcdDecision) -> dict[str, Any]:
        return {
            "kind": "etcd",
            "address": etcd.address,
            "members": etcd.members,
            "members_killed": etcd.members_killed,
            "key": etcd.key,
            "winner": etcd.winner,
            "backup": etcd.backup,
        }


@dataclass(frozen=True)
class Round:
    """``--rounds``: one kill -9 of whoever was primary, and the pair healing after it."""

    number: int
    killed: str
    live: str
    failover_s: float | None  # the clients' view: last reply of the old, first of the new
    reprotect_s: float | None  # from the kill to protected again
    catch_up_s: float | None
    catch_up_entries: int
    generation: int

    def describe(self) -> Text:
        return Text.assemble(
            f"{self.killed} killed, {self.live} live; failover {_seconds(self.failover_s)}; ",
            ("protected again", "green")
            if self.reprotect_s is not None
            else ("unprotected", "red"),
            f" (generation {self.generation}) {_seconds(self.reprotect_s)} after the kill, "
            f"{self.catch_up_entries:,} entries caught up in {_seconds(self.catch_up_s)}",
        )

    def as_json(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {
            "round": self.number,
            "killed": self.killed,
            "live": self.live,
            "failover_s": rounded(self.failover_s),
            "reprotect_s": rounded(self.reprotect_s),
            "catch_up_s": rounded(self.catch_up_s),
            "catch_up_entries": self.catch_up_entries,
            "generation": self.generation,
        }


# The fields of ``--json``, the same in both modes; where one has no meaning in a
# mode (the one connection's details in socket mode), it is null there.
VERDICT_FIELDS: Final = (
    "mode",
    "passed",
    "verdict",
    "output_rule",
    "failure",
    "acked",
    "found",
    "lost",
    "failover_s",
    "acked_incrs",
    "found_incrs",
    "extra_incrs",
    "acked_sets",
    "found_sets",
    "requests",
    "reconnects",
    "connections",
    "wrong_replies",
    "wrong",
    "read_back_on",
    "connection_survived",
    "connection_error",
    "client",
    "service",
    "client_retransmissions",
    "req_per_s_pair",
    "req_per_s_alone",
    "ship_delay_ms",
    "duration_s",
    "arbiter",
    "rounds",
)


def verdict_json(**fields: Any) -> dict[str, Any]:
    """A ``--json`` verdict: every field of ``VERDICT_FIELDS``, in that order."""
    unknown = fields.keys() - set(VERDICT_FIELDS)
    assert not unknown, f"not a verdict field: {sorted(unknown)}"
    return {name: fields.get(name) for name in VERDICT_FIELDS}


async def read_back(port: int, keys: list[bytes], host: str = HOST) -> list[Reply]:
    """GET every key from the service, pipelined in batches, on a fresh connection."""
    with trio.fail_after(VERIFY_TIMEOUT_S):
        connection = await connect_retrying(port, host)
        try:
            return await read_back_on(connection, keys)
        finally:
            await connection.aclose()


async def read_back_on(connection: RespConnection, keys: list[bytes]) -> list[Reply]:
    """GET every key on ``connection``, pipelined in batches of VERIFY_BATCH."""
    replies: list[Reply] = []
    for at in range(0, len(keys), VERIFY_BATCH):
        batch = keys[at : at + VERIFY_BATCH]
        await connection.send([(b"GET", key) for key in batch])
        replies += [await connection.receive() for _ in batch]
    return replies


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


@dataclass(frozen=True)
class PacketVerdict:
    """``--packet``: one connection through the failover, and what it was told."""

    failure: str  # "kill" or "partition"
    service: str
    client: str
    connection_error: str | None  # None: the connection survived
    read_back_on: str  # "the same connection", or "a new connection" if it broke
    acked_incrs: int
    counter: int  # the counter's value read back at the end
    unanswered_incrs: int  # 1 if the connection broke during an INCR
    acked_sets: int
    found_sets: int
    requests: int
    wrong: tuple[str, ...]
    wrong_replies: int
    failover_s: float | None
    retransmissions: int | None
    rate_pair: float | None  # replies per second while the pair served
    rate_alone: float | None  # the same after the failover, the new primary alone
    duration_s: float

    @property
    def survived(self) -> bool:
        return self.connection_error is None

    @property
    def acked(self) -> int:
        return self.acked_incrs + self.acked_sets

    @property
    def found(self) -> int:
        return min(self.counter, self.acked_incrs) + self.found_sets

    @property
    def lost(self) -> int:
        return self.acked - self.found

    @property
    def extra_incrs(self) -> int:
        """Increments beyond those sent: a request applied twice."""
        return max(0, self.counter - self.acked_incrs - self.unanswered_incrs)

    @property
    def passed(self) -> bool:
        """One connection, never broken, every reply right, every write there once."""
        return self.survived and not self.wrong_replies and not self.lost and not self.extra_incrs

    @property
    def what(self) -> str:
        return (
            "partition of the primary" if self.failure == "partition" else "kill -9 of the primary"
        )

    @property
    def title(self) -> str:
        return f"packet mode, {self.what}"

    def summary(self) -> str:
        if self.passed:
            return (
                f"one connection survived the {self.what}: no reset, every reply correct, "
                "no acknowledged write lost"
            )
        problems = [] if self.survived else [f"the connection broke ({self.connection_error})"]
        if self.wrong_replies:
            problems.append(f"{self.wrong_replies} wrong replies")
        if self.lost:
            problems.append(f"{self.lost} acknowledged writes lost")
        if self.extra_incrs:
            problems.append(f"{self.extra_incrs} increments applied twice")
        return ", ".join(problems)

    def rows(self) -> list[tuple[str, RenderableType]]:
        state = (
            Text("kept open throughout", style="green")
            if self.survived
            else Text(f"broken: {self.connection_error}", style="red")
        )
        rows: list[tuple[str, RenderableType]] = [
            ("connection", Text.assemble(f"1, {self.client} → {self.service}, ", state)),
            (
                "requests answered",
                Text.assemble(
                    f"{self.requests:,}, 0 reconnects, ",
                    (f"{self.wrong_replies} wrong", "red" if self.wrong_replies else "green"),
                ),
            ),
            (
                "INCR counter",
                f"{self.acked_incrs:,} INCRs answered in sequence, read back {self.counter:,}",
            ),
            (
                "acknowledged writes",
                f"{self.acked:,}  ({self.acked_incrs:,} INCR, {self.acked_sets:,} SET)",
            ),
            ("found after failover", f"{self.found:,}, read back on {self.read_back_on}"),
            ("lost", _lost_cell(self.lost)),
            ("failover (client's view)", _seconds(self.failover_s)),
        ]
        if self.rate_pair is not None and self.rate_alone is not None:
            rows.append(
                (
                    "requests per second",
                    f"{self.rate_pair:,.0f} with the backup, {self.rate_alone:,.0f} alone after",
                )
            )
        if self.retransmissions is not None:
            rows.append(("client TCP retransmissions", f"{self.retransmissions:,}"))
        return rows

    def notes(self) -> list[Text]:
        notes = [Text(f"wrong reply: {w}", style="red") for w in self.wrong]
        if self.passed:
            notes.append(
                Text(
                    "The client's kernel never saw the failover: the backup's guest had "
                    "replayed the primary's, its TCP state included, took over the virtual "
                    "IP with a gratuitous ARP, and the client's retransmissions reached it.",
                    style="dim",
                )
            )
        return notes

    def as_json(self) -> dict[str, Any]:
        return verdict_json(
            mode="packet",
            passed=self.passed,
            verdict=self.summary(),
            output_rule=True,
            failure=self.failure,
            acked=self.acked,
            found=self.found,
            lost=self.lost,
            failover_s=None if self.failover_s is None else round(self.failover_s, 4),
            acked_incrs=self.acked_incrs,
            found_incrs=self.counter,
            extra_incrs=self.extra_incrs,
            acked_sets=self.acked_sets,
            found_sets=self.found_sets,
            requests=self.requests,
            reconnects=0 if self.survived else 1,
            connections=1,
            wrong_replies=self.wrong_replies,
            wrong=list(self.wrong),
            read_back_on=self.read_back_on,
            connection_survived=self.survived,
            connection_error=self.connection_error,
            client=self.client,
            service=self.service,
            client_retransmissions=self.retransmissions,
            req_per_s_pair=None if self.rate_pair is None else round(self.rate_pair, 1),
            req_per_s_alone=None if self.rate_alone is None else round(self.rate_alone, 1),
            duration_s=round(self.duration_s, 3),
        )


async def verify_connection(load: ConnectionLoad, failure: str) -> PacketVerdict:
    """Read every acknowledged write back, on the load's own connection if it lives."""
    stats = load.stats
    keys = [counter_key(0), *stats.acked_sets]
    replies: list[Reply] | None = None
    where = "the same connection"
    if load.error is None and load.connection is not None:
        try:
            with trio.fail_after(VERIFY_TIMEOUT_S):
                replies = await read_back_on(load.connection, keys)
        except CONNECTION_ERRORS as exc:
            load.error = f"reading back: {describe_connection_error(exc, VERIFY_TIMEOUT_S)}"
    if replies is None:  # the connection broke: still count what was lost
        where = "a new connection"
        try:
            replies = await read_back(load.port, keys, load.host)
        except trio.TooSlowError:
            raise DemoError(
                f"the service on {load.host}:{load.port} did not answer within "
                f"{VERIFY_TIMEOUT_S:g} s after the failover (and the connection broke: "
                f"{load.error})"
            ) from None
        except CONNECTION_ERRORS as exc:
            raise DemoError(f"reading the writes back failed: {exc}") from None
    if load.connection is not None:
        await load.connection.aclose()
    counter = int(replies[0]) if isinstance(replies[0], bytes) else 0
    found_sets = sum(
        reply == value for value, reply in zip(stats.acked_sets.values(), replies[1:], strict=True)
    )
    rate_pair, rate_alone = load.rates()
    return PacketVerdict(
        failure=failure,
        service=f"{load.host}:{load.port}",
        client=load.client_address,
        connection_error=load.error,
        read_back_on=where,
        acked_incrs=stats.acked_incrs[0],
        counter=counter,
        unanswered_incrs=stats.unanswered_incrs[0],
        acked_sets=len(stats.acked_sets),
        found_sets=found_sets,
        requests=stats.replies,
        wrong=tuple(load.wrong),
        wrong_replies=load.wrong_count,
        failover_s=stats.failover_s,
        retransmissions=load.retransmissions,
        rate_pair=rate_pair,
        rate_alone=rate_alone,
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
    packet: bool = False
    partition: bool = False  # --packet only: cut the primary off instead of killing it
    etcd: bool = False  # the socket demo, decided by a three-member etcd cluster
    rounds: int = 1  # kill -9s in a row, each followed by a fresh backup joining


@dataclass
class Demo:
    """Everything the live view shows, filled in as the run goes."""

    config: DemoConfig
    events: Events
    replicas: list[Replica] = field(default_factory=list)
    arbiter: Replica | None = None  # --packet: the arbiter's process in its lab host
    etcd: etcdlocal.EtcdCluster | None = None  # --etcd: the cluster deciding the failover
    load: Load | ConnectionLoad | None = None
    rate: float = 0.0  # replies per second, over the last second


async def run(demo: Demo, workdir: Path) -> Outcome:
    """Arbiter, pair, load, kill, failover, read-back; every replica stopped on the way out."""
    events = demo.events
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_exit_on_signals)
        try:
            if demo.config.etcd:
                arbiter_at = await _start_etcd(demo, workdir)
            else:
                port = await nursery.start(arbiter.serve, HOST, 0, workdir / "arbiter-store", None)
                arbiter_at = f"{HOST}:{port}"
                events.emit("arbiter_started", f"arbiter on {arbiter_at}", port=port)
            service, log_port, primary_admin, backup_admin, backup_log = await free_ports(5)
            ports = Ports(service, log_port, primary_admin, backup_admin, arbiter_at, backup_log)
            primary, backup = await _start_pair(
                demo, workdir, nursery, _socket_launches(demo.config, ports), ports.service
            )
            if demo.config.rounds > 1:
                verdict = await _rounds(demo, nursery, workdir, primary, backup, ports)
            else:
                verdict = await _failover(demo, nursery, primary, backup, ports.service)
            if demo.etcd is not None:
                verdict = replace(verdict, etcd=await _etcd_decision(demo.etcd, backup))
        finally:
            await _stop_all(demo)
        nursery.cancel_scope.cancel()
    return verdict


ETCD_MEMBERS: Final = 3
DECISION_KEY: Final = "ftproxy/generation/1"  # the demo pair's first generation


async def _start_etcd(demo: Demo, workdir: Path) -> str:
    """Start the demo's etcd cluster (in a thread: it blocks); return its address."""
    try:
        cluster = await trio.to_thread.run_sync(
            etcdlocal.start_cluster, workdir / "etcd", ETCD_MEMBERS
        )
    except (etcdlocal.EtcdMissing, etcdlocal.EtcdFailed) as exc:
        raise DemoError(str(exc)) from None
    demo.etcd = cluster
    demo.events.emit(
        "arbiter_started",
        f"etcd cluster of {ETCD_MEMBERS} members on {cluster.endpoints}",
        kind="etcd",
        address=cluster.address,
        pids=[m.popen.pid for m in cluster.members if m.popen is not None],
    )
    return cluster.address


async def _kill_etcd_member(demo: Demo) -> None:
    """Kill -9 one etcd member: the quorum (two of three) goes on deciding."""
    assert demo.etcd is not None
    member = demo.etcd.members[0]
    pid = member.popen.pid if member.popen is not None else None
    await trio.to_thread.run_sync(member.kill)
    demo.events.emit(
        "etcd_member_killed",
        f"kill -9 of etcd member {member.name} ({member.endpoint}, pid {pid}): "
        f"{ETCD_MEMBERS - 1} of {ETCD_MEMBERS} left, still a quorum",
        member=member.name,
        pid=pid,
    )


@dataclass(frozen=True)
class EtcdDecision:
    """What etcd holds for the pair's generation after the failover."""

    address: str
    members: int
    members_killed: int
    key: str
    winner: str | None
    backup: str  # the backup's candidate name, which should be the winner


async def _etcd_decision(cluster: etcdlocal.EtcdCluster, backup: Replica) -> EtcdDecision:
    """Read the decision back from etcd, as any client would."""
    asker = arbiter.connect(cluster.address, None)
    try:
        with trio.fail_after(VERIFY_TIMEOUT_S):
            answer = await asker.query(DECISION_KEY)
    except (trio.TooSlowError, arbiter.ArbiterUnavailable, arbiter.ArbiterRefused) as exc:
        raise DemoError(f"etcd did not say who won {DECISION_KEY}: {exc}") from None
    return EtcdDecision(
        address=cluster.address,
        members=len(cluster.members),
        members_killed=sum(not m.running() for m in cluster.members),
        key=arbiter.ETCD_KEY_PREFIX + DECISION_KEY,
        winner=answer.winner if isinstance(answer, arbiter.Decision) else None,
        backup=f"backup@{socket.gethostname()}:{backup.process.pid}",
    )


async def run_packet(demo: Demo, workdir: Path) -> Outcome:
    """``--packet``, inside the lab: arbiter, pair in packet mode, one connection, kill
    (or partition), failover, read-back on the same connection. The lab is up and this
    thread is in the client host's network namespace (see :func:`_packet_lab`)."""
    lab = netlab.Lab(LAB_PREFIX)
    secret = _write_secret(workdir / "secret")
    auth = ["--secret-file", str(secret)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_exit_on_signals)
        try:
            await _start_lab_arbiter(demo, workdir, nursery, lab, auth)
            primary, backup = await _start_pair(
                demo, workdir, nursery, _packet_launches(lab), SERVICE_PORT, auth
            )
            verdict = await _packet_failover(demo, nursery, lab, primary, backup)
        finally:
            await _stop_all(demo)
        nursery.cancel_scope.cancel()
    return verdict


async def _stop_all(demo: Demo) -> None:
    """Stop every process the demo started, whatever is being raised meanwhile."""
    with trio.CancelScope(shield=True):
        for replica in [*demo.replicas, *([demo.arbiter] if demo.arbiter else [])]:
            await replica.stop()
        if demo.etcd is not None:
            await trio.to_thread.run_sync(demo.etcd.stop)


def _socket_launches(config: DemoConfig, ports: Ports) -> list[Launch]:
    """The pair on loopback, the arbiter's address given."""
    arbiter_at, log_at = ports.arbiter, f"{HOST}:{ports.log}"
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
    if config.rounds > 1:
        backup_args += ["--log-listen", f"{HOST}:{ports.backup_log}"]
    return [
        Launch("primary", primary_args, f"{HOST}:{ports.primary_admin}"),
        Launch("backup", backup_args, f"{HOST}:{ports.backup_admin}"),
    ]


def _packet_launches(lab: netlab.Lab) -> list[Launch]:
    """The pair in the lab's primary and backup hosts, packet front, serving the VIP."""
    primary_ip, backup_ip = lab.address("primary"), lab.address("backup")
    arbiter_at = f"{lab.address('arbiter')}:{ARBITER_PORT}"
    log_at = f"{primary_ip}:{LOG_PORT}"
    front = ["--front", "packet", "--interface", netlab.HOST_IFACE]
    primary_args = ["primary", "--log-listen", log_at, "--arbiter", arbiter_at, *front]
    primary_args += ["--vip", f"{netlab.VIP}/{VIP_PREFIX_LEN}"]
    backup_args = ["backup", "--primary", log_at, "--arbiter", arbiter_at, *front]
    return [
        Launch("primary", primary_args, f"{primary_ip}:{ADMIN_PORT}", lab.namespace("primary")),
        Launch("backup", backup_args, f"{backup_ip}:{ADMIN_PORT}", lab.namespace("backup")),
    ]


def _write_secret(path: Path) -> Path:
    """32 random bytes, base64, in a file only root may read: what ``auth`` expects."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(base64.b64encode(os.urandom(32)) + b"\n")
    return path


async def _start_lab_arbiter(
    demo: Demo, workdir: Path, nursery: trio.Nursery, lab: netlab.Lab, auth: Sequence[str]
) -> None:
    """``ftproxy arbiter`` in the lab's arbiter host; return once it listens."""
    address = f"{lab.address('arbiter')}:{ARBITER_PORT}"
    command = [
        *FTPROXY_COMMAND,
        "arbiter",
        "--listen",
        address,
        "--data-dir",
        str(workdir / "arbiter-store"),
        *auth,
    ]
    process = demo.arbiter = await start_process(
        "arbiter", in_netns(lab.namespace("arbiter"), command), "", workdir
    )
    nursery.start_soon(process.watch_stdout)
    with trio.move_on_after(demo.config.start_timeout_s) as waited:
        while b'"arbiter_listening"' not in await _read_bytes(process.stderr_path):
            await trio.sleep(REFRESH_S / 4)
    if waited.cancelled_caught:
        raise DemoError(
            f"the arbiter did not listen on {address} within "
            f"{demo.config.start_timeout_s:g} s{await process.stderr_tail()}"
        )
    demo.events.emit(
        "arbiter_started",
        f"arbiter on {address} (host arbiter, pid {process.process.pid})",
        address=address,
    )


async def _read_bytes(path: Path) -> bytes:
    try:
        return await trio.Path(path).read_bytes()
    except OSError:
        return b""


async def _start_pair(
    demo: Demo,
    workdir: Path,
    nursery: trio.Nursery,
    launches: Sequence[Launch],
    service_port: int,
    auth: Sequence[str] = ("--insecure",),
) -> tuple[Replica, Replica]:
    """Start primary and backup; return once both guests listen (the backup's replaying)."""
    config = demo.config
    for launch in launches:
        replica = await start_replica(launch, service_port, workdir, auth)
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
    service = f"{netlab.VIP if config.packet else HOST}:{service_port}"
    demo.events.emit(
        "pair_ready",
        f"primary and backup ready, kv.py on {service}",
        service=service,
        pids={r.name: [r.process.pid, *r.guest_pids] for r in (primary, backup)},
        workdir=str(workdir),
    )
    return primary, backup


async def _kill_primary(primary: Replica, events: Events, acked: int) -> None:
    events.emit(
        "killing_primary",
        f"kill -9 of the primary (pid {primary.process.pid}) and its guest",
        pid=primary.process.pid,
        acked=acked,
    )
    await primary.kill()


async def _failover(
    demo: Demo, nursery: trio.Nursery, primary: Replica, backup: Replica, service: int
) -> Verdict:
    """Load, warm-up, kill -9 of the primary, load through the failover, read-back."""
    config, events = demo.config, demo.events
    load = demo.load = Load(service, config.clients, events)
    nursery.start_soon(load.run)
    await _wait_first_ack(load, config)
    events.emit("load_started", f"load running: {config.clients} clients, INCR + SET")
    if demo.etcd is not None:  # mid-run, before the failover that etcd must decide
        await trio.sleep(config.warmup_s / 2)
        await _kill_etcd_member(demo)
        await trio.sleep(config.warmup_s / 2)
    else:
        await trio.sleep(config.warmup_s)  # a point of the run to fail at, not synchronisation
    await _kill_primary(primary, events, load.stats.acked)
    load.stats.kill_at = trio.current_time()
    nursery.start_soon(_announce_go_live, backup, events)
    await trio.sleep(config.after_s)
    load.stop()
    events.emit(
        "load_stopped", f"load stopped: {load.stats.acked} acknowledged writes; reading back"
    )
    verdict = await verify(service, load.stats, config)
    return replace(verdict, duration_s=trio.current_time() - events.started_at)


async def _rounds(
    demo: Demo,
    nursery: trio.Nursery,
    workdir: Path,
    primary: Replica,
    backup: Replica,
    ports: Ports,
) -> Verdict:
    """``--rounds N``: load; N times: kill -9 of the primary, the backup goes live, a
    fresh backup joins it and catches up, the pair is protected again; read-back."""
    config, events = demo.config, demo.events
    load = demo.load = Load(ports.service, config.clients, events)
    nursery.start_soon(load.run)
    await _wait_first_ack(load, config)
    events.emit("load_started", f"load running: {config.clients} clients, INCR + SET")
    await trio.sleep(config.warmup_s)  # a point of the run to fail at, not synchronisation
    live_log, generation = ports.backup_log, 1
    rounds: list[Round] = []
    for number in range(1, config.rounds + 1):
        events.emit("round_started", f"round {number} of {config.rounds}", round=number)
        await _kill_primary(primary, events, load.stats.acked)
        killed_at = load.stats.kill_at = trio.current_time()
        # This round's old replies: those still coming from the killed primary.
        load.stats.first_new_reply = load.stats.last_old_reply = None
        await _wait_for(backup, lambda s: s.get("role") == "live", config.start_timeout_s)
        events.emit("backup_live", f"{backup.name} is live, alone", replica=backup.name)
        joiner_log, joiner_admin = await free_ports(2)
        joiner = await start_replica(
            Launch(
                f"backup {number + 1}",
                [
                    "backup",
                    "--primary",
                    f"{HOST}:{live_log}",
                    "--log-listen",
                    f"{HOST}:{joiner_log}",
                    "--arbiter",
                    ports.arbiter,
                    "--data-dir",
                    str(workdir / f"data-{number + 1}"),
                ],
                f"{HOST}:{joiner_admin}",
            ),
            ports.service,
            workdir,
            ("--insecure",),
        )
        demo.replicas.append(joiner)
        nursery.start_soon(joiner.watch_stdout)
        nursery.start_soon(joiner.poll_status)
        events.emit("backup_joining", f"{joiner.name} joins {backup.name}, catching up")
        generation += 1
        status = await _wait_for(backup, _protected_under(generation), REPROTECT_TIMEOUT_S)
        catch_up = status.get("catch_up") or {}
        done = Round(
            number=number,
            killed=primary.name,
            live=backup.name,
            failover_s=_round_failover(load.stats, killed_at),
            reprotect_s=trio.current_time() - killed_at,
            catch_up_s=catch_up.get("elapsed_s"),
            catch_up_entries=int(catch_up.get("entries_sent", 0)),
            generation=generation,
        )
        rounds.append(done)
        events.emit(
            "protected_again",
            f"protected again: generation {generation}, {_seconds(done.reprotect_s)} after "
            "the kill",
            generation=generation,
        )
        primary, backup, live_log = backup, joiner, joiner_log
        await trio.sleep(config.after_s)  # load on the healed pair, not synchronisation
    load.stop()
    events.emit(
        "load_stopped", f"load stopped: {load.stats.acked} acknowledged writes; reading back"
    )
    verdict = await verify(ports.service, load.stats, config)
    duration = trio.current_time() - events.started_at
    failovers = [r.failover_s for r in rounds if r.failover_s is not None]
    worst = max(failovers) if len(failovers) == len(rounds) else None
    return replace(verdict, duration_s=duration, rounds=tuple(rounds), failover_s=worst)


def _protected_under(generation: int) -> Callable[[dict[str, Any]], bool]:
    def protected(status: dict[str, Any]) -> bool:
        return status.get("protected") is True and status.get("generation") == generation

    return protected


def _round_failover(stats: LoadStats, killed_at: float) -> float | None:
    """The clients' view: the old primary's last reply (at the latest, the kill) to the
    new one's first."""
    if stats.first_new_reply is None:
        return None
    return stats.first_new_reply - (stats.last_old_reply or killed_at)


async def _wait_for(
    replica: Replica, condition: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    """The replica's status, once ``condition`` holds for it (as polled for the view)."""
    with trio.move_on_after(timeout):
        while replica.status is None or not condition(replica.status):
            await trio.sleep(REFRESH_S / 4)
        return replica.status
    raise DemoError(
        f"the {replica.name} did not get there within {timeout:g} s{await replica.stderr_tail()}"
    )


async def _packet_failover(
    demo: Demo, nursery: trio.Nursery, lab: netlab.Lab, primary: Replica, backup: Replica
) -> PacketVerdict:
    """One connection, warm-up, kill -9 (or partition) of the primary, the same
    connection through the failover, read-back on it."""
    config, events = demo.config, demo.events
    load = demo.load = ConnectionLoad(netlab.VIP, SERVICE_PORT, events, PACKET_REQUEST_TIMEOUT_S)
    await load.connect(config.start_timeout_s)
    events.emit(
        "connected",
        f"one connection from the client host: {load.client_address} → {netlab.VIP}:{SERVICE_PORT}",
        client=load.client_address,
    )
    nursery.start_soon(load.run)
    await _wait_first_ack(load, config)
    events.emit("load_started", "load running on that connection: INCR, SET, GET in turn")
    await trio.sleep(config.warmup_s)  # a point of the run to fail at, not synchronisation
    if load.error is not None:
        raise DemoError(f"the connection broke before the failover: {load.error}")
    primary.exit_expected = True  # killed or partitioned: it may end, the demo goes on
    if config.partition:
        primary.fate = "partitioned"
        events.emit(
            "partitioning_primary",
            "partition: the primary host is cut off at the switch",
            acked=load.stats.acked,
        )
        await trio.to_thread.run_sync(lab.partition, "primary")
    else:
        await _kill_primary(primary, events, load.stats.acked)
    load.stats.kill_at = trio.current_time()
    nursery.start_soon(_announce_go_live, backup, events)
    await trio.sleep(config.after_s)
    await load.stop()
    events.emit(
        "load_stopped",
        f"load stopped: {load.stats.acked} acknowledged writes; reading back on "
        + ("the same connection" if load.error is None else "a new one"),
    )
    verdict = await verify_connection(load, "partition" if config.partition else "kill")
    return replace(verdict, duration_s=trio.current_time() - events.started_at)


async def _wait_first_ack(load: Load | ConnectionLoad, config: DemoConfig) -> None:
    with trio.move_on_after(config.start_timeout_s) as waited:
        await load.wait_first_ack()
    if waited.cancelled_caught:
        raise DemoError(f"no write was acknowledged within {config.start_timeout_s:g} s")


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
        return [replica.name, Text(replica.fate, style="red")]
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
        _protection_cell(status),
    ]


def _protection_cell(status: dict[str, Any]) -> Text:
    """Protected, catching up (how far), or alone."""
    if status.get("protected") is True:
        return Text("protected", style="green")
    catch_up = status.get("catch_up") or {}
    if catch_up.get("state") == "catching_up":
        return Text(
            f"catch-up {catch_up.get('replayed_seq', 0):,}/{status.get('log_seq', 0):,}",
            style="yellow",
        )
    if status.get("role") == "live":
        return Text("alone", style="bold red")
    return Text("")


def render_view(demo: Demo) -> RenderableType:
    """The live view: both replicas, the load, the last events."""
    table = Table(expand=True, box=None, pad_edge=False)
    columns = (
        "replica", "role", "gen", "exits", "log seq", "acked seq", "lag", "held", "peer",
        "protection",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("replica", "role") else "right")
    for replica in demo.replicas:
        table.add_row(*_replica_row(replica))
    load = demo.load
    if load is None:
        load_line = Text("load: not started", style="dim")
    elif isinstance(load, ConnectionLoad):
        load_line = Text.assemble(
            ("load ", "bold"),
            f"1 connection {load.client_address or '(connecting)'} → {netlab.VIP}:{SERVICE_PORT}  ",
            (f"{demo.rate:,.0f} req/s", "bold"),
            f"  acked writes {load.stats.acked:,}  wrong replies {load.wrong_count}  ",
            (
                ("connection open", "green")
                if load.error is None
                else (f"connection broken: {load.error}", "bold red")
            ),
        )
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
    if demo.config.packet:
        title = Text.assemble(
            "ftproxy demo --packet: kv.py on ",
            (f"{netlab.VIP}:{SERVICE_PORT}", "bold"),
            f", primary + backup in lab {LAB_PREFIX}, ",
            Text("output rule ON", style="green"),
        )
    else:
        rule = (
            Text("output rule ON", style="green")
            if demo.config.output_rule
            else Text(f"output rule OFF (ship delay {demo.config.ship_delay_ms:g} ms)", style="red")
        )
        through = f", arbiter etcd ({ETCD_MEMBERS} members)" if demo.config.etcd else ""
        title = Text.assemble(f"ftproxy demo: kv.py, primary + backup{through}, ", rule)
    return Panel(
        Group(table, Text(""), load_line, Text(""), events), title=title, border_style="blue"
    )


def render_verdict(verdict: Outcome) -> RenderableType:
    """The verdict panel: the numbers, then what they mean."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right" if isinstance(verdict, Verdict) else "left")
    for name, value in verdict.rows():
        table.add_row(name, value)
    parts: list[RenderableType] = [table, Text("")]
    if verdict.passed:
        parts.append(Text("✔ " + verdict.summary(), style="bold green"))
    else:
        parts.append(Text("✘ " + verdict.summary(), style="bold red"))
    notes = verdict.notes()
    parts += notes
    unsafe = isinstance(verdict, Verdict) and not verdict.output_rule
    style = "green" if verdict.passed else ("yellow" if unsafe else "red")
    return Panel(Group(*parts), title=f"verdict: {verdict.title}", border_style=style, expand=False)


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
        "--clients",
        type=int,
        default=None,
        metavar="N",
        help="concurrent clients (default 4; --packet holds one connection)",
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
    parser.add_argument(
        "--etcd",
        action="store_true",
        help=f"decide the failover through a {ETCD_MEMBERS}-member etcd cluster on {HOST} "
        f"(Debian package {etcdlocal.PACKAGE}); one member is killed mid-run",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="kill -9 whoever is primary N times in a row, each followed by a fresh backup "
        "that catches up and protects the pair again (default 1: one failover)",
    )
    parser.add_argument(
        "--packet",
        action="store_true",
        help="packet mode (root): in a lab of network namespaces, one client connection to "
        f"the virtual IP {netlab.VIP} survives the failover",
    )
    parser.add_argument(
        "--partition",
        action="store_true",
        help="with --packet: cut the primary off at the switch instead of killing it",
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
    if args.clients is not None and args.clients < 1:
        raise ValueError("--clients must be at least 1")
    if args.etcd and args.packet:
        raise ValueError("--etcd is for the socket demo, not --packet")
    if args.packet:
        for flag, value in (
            ("--clients", args.clients is not None),
            ("--no-output-rule", args.no_output_rule),
        ):
            if value:
                raise ValueError(f"{flag} is for the socket demo; --packet holds one connection")
    elif args.partition:
        raise ValueError("--partition needs --packet")
    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    if args.rounds > 1 and (args.packet or args.no_output_rule):
        raise ValueError("--rounds is for the socket demo with the output rule")
    return DemoConfig(
        warmup_s=args.warmup,
        after_s=args.after,
        clients=1 if args.packet else (args.clients or 4),
        output_rule=not args.no_output_rule,
        ship_delay_ms=args.ship_delay_ms,
        start_timeout_s=args.start_timeout,
        json=args.json,
        packet=args.packet,
        partition=args.partition,
        etcd=args.etcd,
        rounds=args.rounds,
    )


def run_demo(args: argparse.Namespace) -> int:
    """``ftproxy demo``: 0 when no acknowledged write was lost (with ``--packet``,
    when besides the one connection survived with every reply right), 1 when the
    promise was broken, 2 for bad options (or ``--packet`` without root), 3 when the
    demo could not run, 4 when ``--no-output-rule`` lost acknowledged writes (what it
    is there to show), 130 when interrupted."""
    try:
        config = _config(args)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    if config.packet and os.geteuid() != 0:
        return _fail(NEEDS_ROOT, EXIT_USAGE)
    if not KV_SCRIPT.is_file():
        return _fail(f"the demo's guest {KV_SCRIPT} is missing", EXIT_FAILED)
    if config.etcd:
        try:
            etcdlocal.etcd_binary()
        except etcdlocal.EtcdMissing as exc:
            return _fail(f"--etcd: {exc}", EXIT_FAILED)
    try:
        verdict = _run_in_tempdir(config)
    except BaseException as exc:  # sorted into one-line messages, bugs re-raised
        return _exit_for(exc)
    if config.json:
        print(json.dumps(verdict.as_json()), flush=True)
    else:
        Console().print(render_verdict(verdict))
    if verdict.passed:
        return EXIT_OK
    return EXIT_LOST if config.output_rule else EXIT_LOST_UNSAFE


Runner = Callable[[Demo, Path], Awaitable[Outcome]]


def _run_in_tempdir(config: DemoConfig) -> Outcome:
    """Run the demo in a temporary directory (the arbiter's store, the replicas' logs);
    ``--packet`` in its lab, from the client host's network namespace."""
    with tempfile.TemporaryDirectory(prefix="ftproxy-demo-") as tmp:
        workdir = Path(tmp)
        with _packet_lab() if config.packet else contextlib.nullcontext():
            runner: Runner = run_packet if config.packet else run
            if config.json or not Console().is_terminal:
                return trio.run(_run_quiet, config, workdir, runner)
            with _stderr_held_back(workdir / "held-back.log"):
                return trio.run(_run_live, config, workdir, runner)


async def _run_quiet(config: DemoConfig, workdir: Path, runner: Runner) -> Outcome:
    """The demo with no view: its events are logged, as the progress report (with
    ``--json``, or when stdout is not a terminal, where a live view cannot redraw
    itself and log lines would land in it)."""
    return await runner(Demo(config, Events(log_events=True)), workdir)


async def _run_live(config: DemoConfig, workdir: Path, runner: Runner) -> Outcome:
    """The demo under the live view, which shows its events instead of the log."""
    demo = Demo(config, Events(log_events=False))
    with Live(render_view(demo), auto_refresh=False, console=Console()) as live:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_refresh, live, demo)
            verdict = await runner(demo, workdir)
            nursery.cancel_scope.cancel()
        live.update(render_view(demo), refresh=True)
    return verdict


@contextlib.contextmanager
def _packet_lab() -> Iterator[netlab.Lab]:
    """The demo's own lab (prefix ``ftdemo``), up for the run and down after it, on
    every way out; this thread is in the client host's network namespace meanwhile.

    A leftover of a demo that was killed is rebuilt; a lab whose hosts still run
    something belongs to a demo running now, and is left alone.
    """
    lab = netlab.Lab(LAB_PREFIX)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)  # trio's own inside run
    try:
        if lab.exists() and any(
            p.pid != os.getpid() for h in lab.status().hosts for p in h.processes
        ):
            raise DemoError(
                f"lab {LAB_PREFIX} is in use (another `ftproxy demo --packet`?); "
                f"if not, remove it with `sudo ftproxy lab --prefix {LAB_PREFIX} down`"
            )
        try:
            lab.up(force=True)
            with _network_namespace(lab.namespace("client")):
                yield lab
        finally:
            _uninterrupted(lab.down)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _uninterrupted(action: Callable[[], object]) -> None:
    """Run ``action`` with Ctrl-C and SIGTERM held off: a clean-up must not stop half way."""
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in held}
    try:
        action()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _network_namespace(name: str) -> Iterator[None]:
    """Move this thread into the named network namespace (``ip netns add NAME``) and
    back: every socket it opens meanwhile belongs to that namespace. Processes
    started from here go to their own host with ``ip netns exec``."""
    libc = ctypes.CDLL(None, use_errno=True)

    def enter(fd: int, what: str) -> None:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot enter the network namespace of {what}: {os.strerror(err)}")

    with (
        open("/proc/thread-self/ns/net", "rb") as home,
        open(os.path.join("/var/run/netns", name), "rb") as target,
    ):
        enter(target.fileno(), name)
        try:
            yield
        finally:
            enter(home.fileno(), "this process")


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
        if isinstance(leaf, DemoError | netlab.LabError):
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
