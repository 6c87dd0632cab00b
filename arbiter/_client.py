"""The built-in arbiter's client, from trio: one connection per question.

:func:`test_and_set` and :func:`query` raise :class:`ArbiterUnavailable` when
the arbiter cannot be reached or does not answer in time (whether the question
was decided is then unknown; asking again is safe, since the winner asking
again wins again). They raise :class:`~arbiter.RemoteProtocolError` when the
arbiter answers but the two sides cannot talk: different secrets, one side
insecure, another protocol version. Retrying does not cure that.

:func:`test_and_set_retrying` is what a replica calls before acting alone: it
asks until the arbiter answers, logging each failure, and never gives up on its
own (the caller cancels it).

:class:`BuiltinArbiter` is the same client behind the :class:`~arbiter.Arbiter`
interface. Each free function also takes any :class:`~arbiter.Arbiter` in place
of an address (then its own secret and timing apply), so that code written
for the built-in arbiter asks whichever one was configured.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Final

import structlog
import trio

from arbiter._interface import (
    DEFAULT_TIMEOUT,
    Arbiter,
    ArbiterRefused,
    ArbiterTiming,
    ArbiterUnavailable,
    ask_until_answered,
)
from arbiter._protocol import (
    MAX_REASON_LENGTH,
    Authenticated,
    Connection,
    ConnectionClosed,
    Decision,
    Error,
    Query,
    RemoteProtocolError,
    Request,
    Side,
    State,
    TestAndSet,
    Undecided,
)
from ftproxy.shell.pump import pump_event

__all__ = [
    "DEFAULT_TIMEOUT",
    "Address",
    "ArbiterUnavailable",
    "BuiltinArbiter",
    "format_address",
    "parse_address",
    "query",
    "test_and_set",
    "test_and_set_retrying",
]

Address = tuple[str, int]
_RECEIVE_SIZE: Final = 65536

logger = structlog.get_logger()


@dataclass(frozen=True)
class BuiltinArbiter:
    """The built-in test-and-set server at ``address`` (``ftproxy arbiter``)."""

    address: Address
    secret: bytes | None = field(repr=False)
    timing: ArbiterTiming = field(default_factory=ArbiterTiming)

    @property
    def kind(self) -> str:
        return "builtin"

    def describe(self) -> str:
        return format_address(self.address)

    async def test_and_set(self, key: str, candidate: str) -> Decision:
        reply = await self._ask(TestAndSet(key, candidate))
        assert isinstance(reply, Decision)  # the protocol refuses anything else
        return reply

    async def query(self, key: str) -> Decision | Undecided:
        return await self._ask(Query(key))

    async def _ask(self, request: Request) -> Decision | Undecided:
        try:
            return await _ask(
                self.address, request, self.secret, self.timing.answer_s, self.timing.connect_s
            )
        except RemoteProtocolError as exc:
            raise ArbiterRefused(str(exc)) from None


def parse_address(text: str) -> Address:
    """Parse ``HOST:PORT`` (``[V6]:PORT`` for an IPv6 literal) into ``(host, port)``."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port_text)


async def test_and_set(
    address: Address | Arbiter,
    key: str,
    candidate: str,
    secret: bytes | None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Decision:
    """Ask the arbiter at ``address`` to make ``candidate`` the winner of ``key``.

    Return the decision: ``won`` is True when ``candidate`` is (or already was)
    the winner; otherwise ``winner`` names who is.
    """
    if not isinstance(address, tuple):
        return await address.test_and_set(key, candidate)
    reply = await _ask(address, TestAndSet(key, candidate), secret, timeout)
    assert isinstance(reply, Decision)  # the protocol refuses anything else
    return reply


async def query(
    address: Address | Arbiter,
    key: str,
    secret: bytes | None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Decision | Undecided:
    """Ask the arbiter at ``address`` whether ``key`` was decided (``won`` is always False)."""
    if not isinstance(address, tuple):
        return await address.query(key)
    return await _ask(address, Query(key), secret, timeout)


async def test_and_set_retrying(
    address: Address | Arbiter,
    key: str,
    candidate: str,
    secret: bytes | None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    initial_backoff: float = 0.05,
    max_backoff: float = 2.0,
) -> Decision:
    """Like :func:`test_and_set`, but ask again while the arbiter is unavailable.

    Each failure is logged as ``arbiter_unreachable`` and followed by a pause
    that doubles from ``initial_backoff`` up to ``max_backoff``. Only an answer,
    a protocol error (which retrying cannot cure) or cancellation ends it.
    """
    timing = ArbiterTiming(timeout, timeout, initial_backoff, max_backoff)
    where = BuiltinArbiter(address, secret, timing) if isinstance(address, tuple) else address

    async def ask() -> Decision:
        return await test_and_set(address, key, candidate, secret, timeout=timeout)

    return await ask_until_answered(where, ask, timing, key=key, candidate=candidate)


async def _ask(
    address: Address,
    request: Request,
    secret: bytes | None,
    timeout: float,
    connect_timeout: float | None = None,
) -> Decision | Undecided:
    with trio.move_on_after(timeout):
        return await _exchange(address, request, secret, connect_timeout or timeout)
    where = format_address(address)
    raise ArbiterUnavailable(f"the arbiter at {where} did not answer within {timeout:g} s")


async def _exchange(
    address: Address, request: Request, secret: bytes | None, connect_timeout: float
) -> Decision | Undecided:
    where = format_address(address)
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(*address)
    except trio.TooSlowError:
        raise ArbiterUnavailable(
            f"cannot connect to the arbiter at {where} within {connect_timeout:g} s"
        ) from None
    except OSError as exc:
        raise ArbiterUnavailable(f"cannot connect to the arbiter at {where}: {exc}") from None
    async with stream:
        return await converse(stream, request, secret, where)


async def converse(
    stream: trio.abc.Stream, request: Request, secret: bytes | None, where: str
) -> Decision | Undecided:
    """One question on an open ``stream`` to the arbiter (``where``: its name in errors).

    Any ``trio.abc.Stream``: the built-in client's TCP connection, or a test's
    memory stream to an in-process server."""
    conn = Connection(Side.CLIENT, secret)

    async def receive() -> bytes:
        return bytes(await stream.receive_some(_RECEIVE_SIZE))

    try:
        while True:
            event = await pump_event(conn, receive, stream.send_all)
            if isinstance(event, Authenticated):
                await stream.send_all(conn.send(request))
            elif isinstance(event, Decision | Undecided):
                return event
            elif isinstance(event, ConnectionClosed):
                raise ArbiterUnavailable(
                    f"the arbiter at {where} closed the connection before answering"
                )
            else:  # pragma: no cover - the protocol refuses requests sent to a client
                raise AssertionError(f"unexpected event {event!r}")
    except RemoteProtocolError as exc:
        if conn.state is State.ERROR:
            # Tell the arbiter why, so that its log says more than "disconnected".
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                await stream.send_all(conn.send(Error(str(exc)[:MAX_REASON_LENGTH])))
        raise RemoteProtocolError(f"arbiter at {where}: {exc}") from None
    except (trio.BrokenResourceError, OSError) as exc:
        raise ArbiterUnavailable(f"lost the connection to the arbiter at {where}: {exc}") from None


def format_address(address: Address) -> str:
    """``HOST:PORT`` (``[V6]:PORT`` for an IPv6 literal)."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Not pytest tests, whatever their names say (test modules import them).
test_and_set.__test__ = False  # type: ignore[attr-defined]
test_and_set_retrying.__test__ = False  # type: ignore[attr-defined]
