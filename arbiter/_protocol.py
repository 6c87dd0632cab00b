"""The arbiter's wire protocol, sans I/O (in the style of h11).

A :class:`Connection` turns bytes into events and events into bytes; it never
touches a socket or a clock, so the trio server, the client, the tests and any
other event loop drive the same code.

Framing: each message is a 4-byte little-endian length, then a msgpack body
(``msgspec``, array-like, tagged by an integer). A frame longer than
``max_frame_size`` is refused as soon as its length arrives.

A conversation (one line per frame, client on the left)::

    Hello(version, nonce_c, secure)  ─▶
                                     ◀─  Hello(version, nonce_s, secure)
                                     ◀─  Proof(mac_s)
    Proof(mac_c)                     ─▶                  both sides: Authenticated
    TestAndSet(key, candidate)       ─▶
                                     ◀─  Decision(key, winner, won)
    Query(key)                       ─▶
                                     ◀─  Decision(key, winner, won=False) | Undecided(key)
    ...
    Error(reason)                    ◀─▶ either side, any time, then it closes

The connection sends ``Hello`` and ``Proof`` itself (see :mod:`ftproxy.core.auth`
for the handshake): after every :meth:`Connection.next_event`, the caller
writes out :meth:`Connection.data_to_send`. The caller's own events go through
:meth:`Connection.send`, which returns their bytes (preceded by any handshake
bytes still queued, so order on the wire is always right). A client, say::

    conn = Connection(Side.CLIENT, secret)
    while True:
        event = conn.next_event()
        await stream.send_all(conn.data_to_send())
        if event is NEED_DATA:
            conn.receive_data(await stream.receive_some())  # b"" at the end
        elif isinstance(event, Authenticated):
            await stream.send_all(conn.send(TestAndSet("pair-7/gen-3", "backup")))
        elif isinstance(event, Decision):
            return event
        ...

The opening (``Hello``, ``Proof``), the framing and the error rules are
``ftproxy.core.session``'s, shared with the log channel. Every message moves the
connection through :data:`_TRANSITIONS`, the one table of what may be sent by
whom in which state. The same table serves both ends:
the client sends one request at a time and the server proves first, so both
ends see the conversation in the same order. A message the table does not
allow is a :class:`LocalProtocolError` when we try to send it (nothing is sent
and the connection is unchanged) and a :class:`RemoteProtocolError` when the
peer sends it (the connection enters ``State.ERROR``; its caller may still
send an :class:`Error` to tell the peer why, then closes).

``Hello`` never changes its first three fields, so any future version still
gets a clear "unsupported version" answer from this one.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec

from ftproxy.core.auth import Side
from ftproxy.core.session import (
    NEED_DATA,
    Authenticated,
    ConnectionClosed,
    Error,
    Hello,
    LocalProtocolError,
    Proof,
    ProtocolError,
    RemoteProtocolError,
    Session,
    common_rows,
    encode_unchecked,
)
from ftproxy.core.session import _NeedData as _NeedData

__all__ = [
    "MAX_FRAME_SIZE",
    "MAX_NAME_LENGTH",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Authenticated",
    "Connection",
    "ConnectionClosed",
    "Decision",
    "Error",
    "Event",
    "Hello",
    "LocalProtocolError",
    "Message",
    "Proof",
    "ProtocolError",
    "Query",
    "RemoteProtocolError",
    "Side",
    "State",
    "TestAndSet",
    "Undecided",
    "encode_frame",
]

# 2: frames after the opening are sealed (``ftproxy.core.session``).
PROTOCOL_VERSION: Final = 2
MAX_FRAME_SIZE: Final = 64 * 1024
MAX_NAME_LENGTH: Final = 1024
MAX_REASON_LENGTH: Final = 1024
AUTH_CONTEXT: Final = b"ftproxy-arbiter"

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LENGTH)]


# --- Messages (on the wire; Hello, Proof and Error are ftproxy.core.session's) ----------


class TestAndSet(msgspec.Struct, tag=3, array_like=True, frozen=True):
    """Ask to be ``key``'s winner: the first candidate to ask wins, for good."""

    __test__ = False  # not a pytest test class, whatever its name says

    key: Name
    candidate: Name


class Query(msgspec.Struct, tag=4, array_like=True, frozen=True):
    """Ask whether ``key`` was decided, without taking part."""

    key: Name


class Decision(msgspec.Struct, tag=5, array_like=True, frozen=True):
    """``key`` was won by ``winner``; ``won`` says whether that is the asking candidate.

    In reply to a :class:`Query`, which names no candidate, ``won`` is False.
    """

    key: Name
    winner: Name
    won: bool


class Undecided(msgspec.Struct, tag=6, array_like=True, frozen=True):
    """Nobody has won ``key`` yet (the reply to a :class:`Query` only)."""

    key: Name


Message: TypeAlias = Hello | Proof | Error | TestAndSet | Query | Decision | Undecided
Request: TypeAlias = TestAndSet | Query
Reply: TypeAlias = Decision | Undecided
Event: TypeAlias = Authenticated | TestAndSet | Query | Decision | Undecided | ConnectionClosed


# --- The state machine ---------------------------------------------------------------


class State(enum.Enum):
    """Where a connection's conversation stands; both ends pass the same states."""

    AWAIT_CLIENT_HELLO = enum.auto()
    AWAIT_SERVER_HELLO = enum.auto()
    AWAIT_SERVER_PROOF = enum.auto()
    AWAIT_CLIENT_PROOF = enum.auto()
    IDLE = enum.auto()
    AWAIT_DECISION = enum.auto()  # a TestAndSet is outstanding
    AWAIT_ANSWER = enum.auto()  # a Query is outstanding
    CLOSED = enum.auto()
    ERROR = enum.auto()  # the peer broke the protocol; we may only send an Error


_CLIENT: Final = Side.CLIENT
_SERVER: Final = Side.SERVER

_TRANSITIONS: Final[dict[tuple[State, Side, type[Any]], State]] = {
    **common_rows(State, authenticated=State.IDLE),
    (State.IDLE, _CLIENT, TestAndSet): State.AWAIT_DECISION,
    (State.IDLE, _CLIENT, Query): State.AWAIT_ANSWER,
    (State.AWAIT_DECISION, _SERVER, Decision): State.IDLE,
    (State.AWAIT_ANSWER, _SERVER, Decision): State.IDLE,
    (State.AWAIT_ANSWER, _SERVER, Undecided): State.IDLE,
}


def encode_frame(message: Message) -> bytes:
    """Frame one message, unchecked (the connection checks; tests use this to misbehave)."""
    return encode_unchecked(message)


class Connection(Session):
    """One end of an arbiter connection: bytes in, events out; events in, bytes out.

    ``secret=None`` runs in insecure mode, which the peer must share. ``nonce``
    exists for tests (a fixed nonce makes the byte stream reproducible).
    """

    VERSION = PROTOCOL_VERSION
    AUTH_CONTEXT = AUTH_CONTEXT
    NAME = "arbiter protocol"
    State = State
    TRANSITIONS = _TRANSITIONS
    DECODER = msgspec.msgpack.Decoder(Message)

    def __init__(
        self,
        role: Side,
        secret: bytes | None,
        *,
        max_frame_size: int = MAX_FRAME_SIZE,
        nonce: bytes | None = None,
    ) -> None:
        self._pending: Request | None = None
        super().__init__(role, secret, max_frame_size=max_frame_size, nonce=nonce)

    def next_event(self) -> Event | Literal[_NeedData.NEED_DATA]:
        """Return the next event from the received bytes, or ``NEED_DATA``.

        Handshake messages produce no event of their own (but may queue bytes:
        write out :meth:`data_to_send` afterwards); the end of the handshake is
        reported as :class:`Authenticated`.
        """
        event: Event | Literal[_NeedData.NEED_DATA] = super().next_event()
        return event

    def send(self, event: TestAndSet | Query | Decision | Undecided | Error) -> bytes:
        """Return the bytes that send ``event`` (after any queued handshake bytes)."""
        return super().send(event)

    def _incoming_problem(self, message: Any) -> str | None:
        if isinstance(message, Decision | Undecided):
            return self._reply_problem(message)
        return None

    def _outgoing_problem(self, message: Any) -> str | None:
        if isinstance(message, Error) and len(message.reason) > MAX_REASON_LENGTH:
            return f"an Error reason is limited to {MAX_REASON_LENGTH} characters"
        if isinstance(message, Decision | Undecided):
            return self._reply_problem(message)
        return None

    def _on_message(self, message: Any) -> Any:
        self._sent(message)
        return message

    def _sent(self, message: Any) -> None:
        if isinstance(message, TestAndSet | Query):
            self._pending = message
        elif isinstance(message, Decision | Undecided):
            self._pending = None

    def _reply_problem(self, reply: Reply) -> str | None:
        """What is wrong with ``reply`` as the answer to the outstanding request, if anything."""
        request = self._pending
        if request is None or reply.key != request.key:
            wanted = "no request" if request is None else f"key {request.key!r}"
            return f"reply for key {reply.key!r} does not match {wanted}"
        if isinstance(reply, Decision):
            if isinstance(request, TestAndSet):
                if reply.won != (reply.winner == request.candidate):
                    return (
                        f"decision says won={reply.won} for winner {reply.winner!r} "
                        f"to candidate {request.candidate!r}"
                    )
            elif reply.won:
                return "decision in reply to a query says won=True"
        return None
