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

The connection sends ``Hello`` and ``Proof`` itself (see :mod:`ftproxy.auth`
for the handshake): after every :meth:`Connection.next_event`, the caller
writes out :meth:`Connection.data_to_send`. The caller's own events go through
:meth:`Connection.send`, which returns their bytes (preceded by any handshake
bytes still queued, so order on the wire is always right). A client, say::

    conn = Connection(Role.CLIENT, secret)
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

Every message moves the connection through :data:`_TRANSITIONS`, the one table
of what may be sent by whom in which state. The same table serves both ends:
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
import struct
from typing import Annotated, Final, Literal, TypeAlias

import msgspec

from ftproxy.auth import AuthenticationError, Handshake, Role

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
    "Role",
    "State",
    "TestAndSet",
    "Undecided",
    "encode_frame",
]

PROTOCOL_VERSION: Final = 1
MAX_FRAME_SIZE: Final = 64 * 1024
MAX_NAME_LENGTH: Final = 1024
MAX_REASON_LENGTH: Final = 1024
AUTH_CONTEXT: Final = b"ftproxy-arbiter"

_LENGTH: Final = struct.Struct("<I")

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
Blob = Annotated[bytes, msgspec.Meta(max_length=256)]
Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON_LENGTH)]


# --- Messages (on the wire) ----------------------------------------------------------


class Hello(msgspec.Struct, tag=0, array_like=True, frozen=True):
    """First message of each side: protocol version and authentication challenge."""

    version: int
    nonce: Blob
    secure: bool


class Proof(msgspec.Struct, tag=1, array_like=True, frozen=True):
    """The sender's proof that it knows the shared secret (empty when insecure)."""

    mac: Blob


class TestAndSet(msgspec.Struct, tag=2, array_like=True, frozen=True):
    """Ask to be ``key``'s winner: the first candidate to ask wins, for good."""

    __test__ = False  # not a pytest test class, whatever its name says

    key: Name
    candidate: Name


class Query(msgspec.Struct, tag=3, array_like=True, frozen=True):
    """Ask whether ``key`` was decided, without taking part."""

    key: Name


class Decision(msgspec.Struct, tag=4, array_like=True, frozen=True):
    """``key`` was won by ``winner``; ``won`` says whether that is the asking candidate.

    In reply to a :class:`Query`, which names no candidate, ``won`` is False.
    """

    key: Name
    winner: Name
    won: bool


class Undecided(msgspec.Struct, tag=5, array_like=True, frozen=True):
    """Nobody has won ``key`` yet (the reply to a :class:`Query` only)."""

    key: Name


class Error(msgspec.Struct, tag=6, array_like=True, frozen=True):
    """The sender gives up on the connection, and says why; it closes next."""

    reason: Reason


Message: TypeAlias = Hello | Proof | TestAndSet | Query | Decision | Undecided | Error
Request: TypeAlias = TestAndSet | Query
Reply: TypeAlias = Decision | Undecided

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Message)


# --- Local events (never on the wire) ------------------------------------------------


class Authenticated(msgspec.Struct, frozen=True):
    """The handshake is done and the peer is verified (``secure=False``: both insecure)."""

    secure: bool


class ConnectionClosed(msgspec.Struct, frozen=True):
    """The peer closed its end (at a frame boundary); nothing more will arrive."""


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
"""Returned by :meth:`Connection.next_event` when it needs more bytes."""

Event: TypeAlias = Authenticated | TestAndSet | Query | Decision | Undecided | ConnectionClosed


# --- Errors --------------------------------------------------------------------------


class ProtocolError(Exception):
    """Something broke the protocol; see the two subclasses for whose fault it was."""


class LocalProtocolError(ProtocolError):
    """This side misused the connection (a bug in the caller); nothing was sent."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: garbage, wrong version, failed authentication, or abort."""


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


_Transition: TypeAlias = tuple[State, Role, type[Message] | type[ConnectionClosed]]
_CLIENT: Final = Role.CLIENT
_SERVER: Final = Role.SERVER
_LIVE: Final = [state for state in State if state not in (State.CLOSED, State.ERROR)]

_TRANSITIONS: Final[dict[_Transition, State]] = {
    (State.AWAIT_CLIENT_HELLO, _CLIENT, Hello): State.AWAIT_SERVER_HELLO,
    (State.AWAIT_SERVER_HELLO, _SERVER, Hello): State.AWAIT_SERVER_PROOF,
    (State.AWAIT_SERVER_PROOF, _SERVER, Proof): State.AWAIT_CLIENT_PROOF,
    (State.AWAIT_CLIENT_PROOF, _CLIENT, Proof): State.IDLE,
    (State.IDLE, _CLIENT, TestAndSet): State.AWAIT_DECISION,
    (State.IDLE, _CLIENT, Query): State.AWAIT_ANSWER,
    (State.AWAIT_DECISION, _SERVER, Decision): State.IDLE,
    (State.AWAIT_ANSWER, _SERVER, Decision): State.IDLE,
    (State.AWAIT_ANSWER, _SERVER, Undecided): State.IDLE,
    # Either side may give up at any time, and may close its end at any time
    # (what an early close means is the caller's business: see ConnectionClosed).
    **{(state, role, Error): State.CLOSED for state in _LIVE for role in Role},
    **{(state, role, ConnectionClosed): State.CLOSED for state in _LIVE for role in Role},
    # After the peer broke the protocol we may still tell it why.
    **{(State.ERROR, role, Error): State.CLOSED for role in Role},
}


def encode_frame(message: Message) -> bytes:
    """Frame one message, unchecked (the connection checks; tests use this to misbehave)."""
    body = _encoder.encode(message)
    return _LENGTH.pack(len(body)) + body


class Connection:
    """One end of an arbiter connection: bytes in, events out; events in, bytes out.

    ``secret=None`` runs in insecure mode, which the peer must share. ``nonce``
    exists for tests (a fixed nonce makes the byte stream reproducible).
    """

    def __init__(
        self,
        role: Role,
        secret: bytes | None,
        *,
        max_frame_size: int = MAX_FRAME_SIZE,
        nonce: bytes | None = None,
    ) -> None:
        self.role: Final = role
        self.max_frame_size: Final = max_frame_size
        self._handshake = Handshake(role, secret, context=AUTH_CONTEXT, nonce=nonce)
        self._state = State.AWAIT_CLIENT_HELLO
        self._receive_buffer = bytearray()
        self._eof = False
        self._outgoing = bytearray()
        self._pending: Request | None = None
        self._error: RemoteProtocolError | None = None
        if role is Role.CLIENT:
            self._emit(self._hello())

    @property
    def state(self) -> State:
        """Where the conversation stands."""
        return self._state

    @property
    def secure(self) -> bool:
        """Whether this side authenticates with a secret."""
        return self._handshake.secure

    # --- Input -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Hand over bytes read from the peer; ``b""`` means the peer closed its end."""
        if self._eof:
            raise LocalProtocolError("receive_data() called after the end of the stream")
        if data:
            self._receive_buffer += data
        else:
            self._eof = True

    def next_event(self) -> Event | Literal[_NeedData.NEED_DATA]:
        """Return the next event from the received bytes, or ``NEED_DATA``.

        Handshake messages are handled here and produce no event of their own
        (but may queue bytes: write out :meth:`data_to_send` afterwards); the
        end of the handshake is reported as :class:`Authenticated`. Raises
        RemoteProtocolError when the peer broke the protocol, again on every
        later call.
        """
        if self._error is not None:
            raise RemoteProtocolError(str(self._error))
        if self._state is State.CLOSED:
            return ConnectionClosed()
        while True:
            body = self._next_frame()
            if body is None:
                if not self._eof:
                    return NEED_DATA
                self._transition(self.role.peer, ConnectionClosed)
                return ConnectionClosed()
            try:
                message = _decoder.decode(body)
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # bad UTF-8 is the latter
                raise self._fail(f"malformed message: {exc}") from None
            event = self._receive(message)
            if event is not None:
                return event

    def _next_frame(self) -> bytes | None:
        buffer = self._receive_buffer
        if len(buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer)
            if length > self.max_frame_size:
                raise self._fail(
                    f"frame of {length} bytes is larger than the limit of {self.max_frame_size}"
                )
            end = _LENGTH.size + length
            if len(buffer) >= end:
                body = bytes(buffer[_LENGTH.size : end])
                del buffer[:end]
                return body
        if self._eof and buffer:
            raise self._fail(f"the peer closed the connection inside a frame ({len(buffer)} bytes)")
        return None

    def _receive(self, message: Message) -> Event | None:
        sender = self.role.peer
        state = self._state
        kind = type(message)
        if (state, sender, kind) not in _TRANSITIONS:
            raise self._fail(
                f"unexpected {kind.__name__} from the {sender.value} in state {state.name}"
            )
        match message:
            case Error(reason):
                self._transition(sender, Error)
                self._error = RemoteProtocolError(
                    f"the {sender.value} aborted the connection, saying: {reason}"
                )
                raise self._error
            case Hello(version, nonce, secure):
                if version != PROTOCOL_VERSION:
                    raise self._fail(
                        f"the peer speaks arbiter protocol version {version}; "
                        f"this side speaks version {PROTOCOL_VERSION}"
                    )
                try:
                    self._handshake.receive_challenge(nonce, secure)
                except AuthenticationError as exc:
                    raise self._fail(f"authentication failed: {exc}") from None
                self._transition(sender, Hello)
                if self.role is Role.SERVER:
                    self._emit(self._hello())
                    self._emit(Proof(self._handshake.proof()))
                return None
            case Proof(mac):
                try:
                    self._handshake.verify(mac)
                except AuthenticationError as exc:
                    raise self._fail(f"authentication failed: {exc}") from None
                self._transition(sender, Proof)
                if self.role is Role.CLIENT:
                    self._emit(Proof(self._handshake.proof()))
                return Authenticated(secure=self._handshake.secure)
            case TestAndSet() | Query():
                self._pending = message
                self._transition(sender, kind)
                return message
            case Decision() | Undecided():
                problem = self._reply_problem(message)
                if problem is not None:
                    raise self._fail(problem)
                self._pending = None
                self._transition(sender, kind)
                return message
        raise AssertionError(f"unhandled message {message!r}")  # pragma: no cover

    # --- Output ----------------------------------------------------------------------

    def send(self, event: TestAndSet | Query | Decision | Undecided | Error) -> bytes:
        """Return the bytes that send ``event`` (after any queued handshake bytes).

        Raises LocalProtocolError, sending nothing, when this side may not send
        ``event`` now or the event breaks a field limit.
        """
        kind = type(event)
        # Hello and Proof never pass here: the connection sends them itself, so the
        # table has no state where the caller could.
        if (self._state, self.role, kind) not in _TRANSITIONS:
            raise LocalProtocolError(
                f"a {self.role.value} cannot send {kind.__name__} in state {self._state.name}"
            )
        if isinstance(event, Decision | Undecided):
            problem = self._reply_problem(event)
            if problem is not None:
                raise LocalProtocolError(problem)
        frame = self._encode_checked(event)
        if isinstance(event, TestAndSet | Query):
            self._pending = event
        elif isinstance(event, Decision | Undecided):
            self._pending = None
        self._transition(self.role, kind)
        return self.data_to_send() + frame

    def data_to_send(self) -> bytes:
        """Return (and forget) the handshake bytes the connection has queued."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    # --- Internals -------------------------------------------------------------------

    def _hello(self) -> Hello:
        return Hello(PROTOCOL_VERSION, self._handshake.nonce, self._handshake.secure)

    def _emit(self, message: Hello | Proof) -> None:
        self._transition(self.role, type(message))
        self._outgoing += self._encode_checked(message)

    def _transition(self, sender: Role, kind: type[Message] | type[ConnectionClosed]) -> None:
        self._state = _TRANSITIONS[self._state, sender, kind]

    def _encode_checked(self, message: Message) -> bytes:
        # Decoding what we encoded applies the same limits the peer will.
        try:
            frame = encode_frame(message)
            _decoder.decode(frame[_LENGTH.size :])
        except (msgspec.MsgspecError, UnicodeError) as exc:
            raise LocalProtocolError(f"cannot send {message!r}: {exc}") from None
        if len(frame) - _LENGTH.size > self.max_frame_size:
            raise LocalProtocolError(f"{type(message).__name__} is larger than the frame limit")
        return frame

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

    def _fail(self, reason: str) -> RemoteProtocolError:
        self._state = State.ERROR
        self._error = RemoteProtocolError(reason)
        return self._error
