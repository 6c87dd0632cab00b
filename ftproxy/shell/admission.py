"""Limits for connections whose peer has not proved anything yet, on every port.

A listener that anyone can reach must not let strangers take what the
replica needs: its time (an opening that never finishes), its memory (frame
limits are the sessions' business, ``ftproxy.core.session``), its descriptors and
its attention (a pairing that waits for one silent connection). So every port
of a replica and of the arbiter accepts through an :class:`Admission`:

- a connection is refused (accepted and closed at once) when the descriptor
  it got leaves fewer than ``reserve`` below the soft ``RLIMIT_NOFILE``: the
  kernel hands out the lowest free descriptor, so a high number means the
  ones below are taken; what is left stays for the replica's own needs (the
  arbiter client, the log channel, service clients);
- each connection gets ``opening_timeout`` seconds to prove itself (its
  handler calls :meth:`Gate.proved`), or it is closed;
- at most ``max_unproven`` connections may be unproven at once; one more
  closes the oldest unproven one (a legitimate peer proves itself in one round
  trip, so the oldest is the one least likely to be legitimate, and a new peer
  is never locked out by a standing flood);
- openings run concurrently (:func:`serve_with_limits`, one task each), so no
  connection waits for another's.

Every refusal is logged with the peer's address, at most ``burst`` a second
per port; the rest are counted and the count logged once the second is over.
"""

from __future__ import annotations

import contextlib
import errno
import math
import resource
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

import structlog
import trio

__all__ = [
    "MAX_UNPROVEN",
    "OPENING_TIMEOUT_S",
    "RESERVED_DESCRIPTORS",
    "Admission",
    "Gate",
    "RejectionLog",
    "descriptors_left",
    "peer_name",
    "serve_with_limits",
]

OPENING_TIMEOUT_S: Final = 2.0
MAX_UNPROVEN: Final = 64
RESERVED_DESCRIPTORS: Final = 64
_ACCEPT_CAPACITY_ERRNOS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_CAPACITY_PAUSE_S: Final = 0.1

log = structlog.get_logger()


def peer_name(sock: Any) -> str:
    """``host:port`` of a socket's peer ("?" once it is gone)."""
    try:
        address = sock.getpeername()
    except OSError:
        return "?"
    if not isinstance(address, tuple) or len(address) < 2:
        return str(address) or "?"  # a Unix socket's peer has no port
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def descriptors_left(fd: int) -> int:
    """At most how many descriptors are free once ``fd`` is taken (lowest-free allocation)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return int(soft) - fd - 1


class RejectionLog:
    """One log line per refusal, with the peer's address, at most ``burst`` per ``period``."""

    def __init__(
        self, event: str, *, port: str, level: str = "warning", burst: int = 10, period: float = 1.0
    ) -> None:
        self.event = event
        self.port = port
        self.level = level
        self.burst = burst
        self.period = period
        self._window_start = -math.inf
        self._in_window = 0
        self._suppressed = 0
        self.total = 0

    def __call__(self, peer: str, reason: str, **fields: Any) -> None:
        self.total += 1
        now = trio.current_time()
        if now - self._window_start >= self.period:
            if self._suppressed:
                log.warning(
                    "rejections_suppressed", port=self.port, count=self._suppressed, last=reason
                )
            self._window_start, self._in_window, self._suppressed = now, 0, 0
        if self._in_window >= self.burst:
            self._suppressed += 1
            return
        self._in_window += 1
        getattr(log, self.level)(self.event, port=self.port, peer=peer, reason=reason, **fields)


class Gate:
    """One connection's admission: its opening's deadline, until it proves itself."""

    def __init__(self, peer: str, deadline: float, on_proved: Callable[[Gate], None]) -> None:
        self.peer = peer
        self._on_proved = on_proved
        self.scope = trio.CancelScope(deadline=deadline)
        self.proven = False
        self.why: str | None = None  # set when the admission closes it

    def proved(self) -> None:
        """The peer proved itself: no deadline and no cap apply to it any more."""
        self.proven = True
        self.scope.deadline = math.inf
        self._on_proved(self)

    @property
    def refused(self) -> bool:
        """Whether the admission closed this connection before it proved itself."""
        return self.scope.cancelled_caught and not self.proven

    def _shed(self, why: str) -> None:
        self.why = why
        self.scope.cancel()


class Admission:
    """The limits of one listening port (``what`` names it in the log)."""

    def __init__(
        self,
        what: str,
        *,
        max_unproven: int = MAX_UNPROVEN,
        opening_timeout: float = OPENING_TIMEOUT_S,
        reserve: int = RESERVED_DESCRIPTORS,
        rejections: RejectionLog | None = None,
    ) -> None:
        self.what = what
        self.max_unproven = max_unproven
        self.opening_timeout = opening_timeout
        self.reserve = reserve
        self.reject = rejections or RejectionLog("connection_rejected", port=what)
        self._unproven: dict[Gate, None] = {}  # insertion order: oldest first

    @property
    def unproven(self) -> int:
        return len(self._unproven)

    def admit(self, sock: Any) -> bool:
        """Whether a just-accepted socket may stay; if not, it is closed and logged."""
        left = descriptors_left(sock.fileno())
        if left >= self.reserve:
            return True
        self.reject(peer_name(sock), "too few descriptors left", left=left, reserve=self.reserve)
        sock.close()
        return False

    @contextlib.contextmanager
    def opening(self, peer: str) -> Iterator[Gate]:
        """The block in which a connection must prove itself; it is cancelled if it does not.

        After the block, ``gate.refused`` says whether that happened (it is logged).
        """
        gate = Gate(peer, trio.current_time() + self.opening_timeout, self._proved)
        self._unproven[gate] = None
        while len(self._unproven) > self.max_unproven:
            oldest = next(iter(self._unproven))
            self._unproven.pop(oldest)
            oldest._shed(f"shed: more than {self.max_unproven} connections were unproven at once")
        try:
            with gate.scope:
                yield gate
        finally:
            self._unproven.pop(gate, None)
            if gate.refused:
                why = gate.why or f"did not finish the opening within {self.opening_timeout:g} s"
                self.reject(peer, why)

    def _proved(self, gate: Gate) -> None:
        self._unproven.pop(gate, None)


async def serve_with_limits(
    listeners: list[trio.SocketListener],
    handler: Callable[[trio.SocketStream, Gate], Awaitable[None]],
    admission: Admission,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on every listener until cancelled; each connection runs ``handler`` in its own
    task, inside its gate (the handler calls ``gate.proved()`` once the peer proved itself)."""

    async def run(stream: trio.SocketStream) -> None:
        try:
            with admission.opening(peer_name(stream.socket)) as gate:
                await handler(stream, gate)
        except BaseException:
            stream.socket.close()  # cancelled or failed: nobody took the stream
            raise
        if gate.refused:
            stream.socket.close()

    async def accept_loop(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                admission.reject("?", f"accept failed: {exc.strerror}")
                await trio.sleep(_CAPACITY_PAUSE_S)
                continue
            if admission.admit(stream.socket):
                nursery.start_soon(run, stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, nursery)
        task_status.started()
