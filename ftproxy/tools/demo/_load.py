"""The clients: the socket demo's writers, the packet demo's one connection, what they were told."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from ftproxy.tools.demo._config import EVENTS_SHOWN, STALL_REPORTED_S, DemoError
from ftproxy.tools.resp import CONNECTION_ERRORS, Reply, RespConnection, connect_retrying

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
