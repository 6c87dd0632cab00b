"""An authenticated, framed conversation driven by one transition table, sans I/O.

Both of ftproxy's connections, the log channel (``ftproxy.core.channel``) and the
arbiter's (``arbiter._protocol``), are such a conversation. They share:

- framing (``ftproxy.core.framing``) and msgspec msgpack bodies, array-like with
  integer tags; ``Hello``, ``Proof`` and ``Error`` are tags 0-2 everywhere,
  and a protocol's own messages start at 3;
- the opening: the client's ``Hello(version, nonce, secure)``, the server's
  ``Hello`` and ``Proof``, the client's ``Proof`` (``ftproxy.core.auth`` says why
  this order), after which both sides report ``Authenticated``;
- the limits before the proof: until the peer has proved the secret, a frame
  may be at most ``OPENING_FRAME_LIMIT`` bytes (a Hello is under 100), so an
  unauthenticated peer cannot make this side buffer megabytes;
- sealing after it: in a secure conversation every frame after the opening is
  sealed with keys the opening derived for this connection alone
  (``ftproxy.core.sealing``); a frame that does not open is the peer's fault, a
  RemoteProtocolError like any other broken frame. ``--insecure`` stays plain;
- the rules: every message moves the conversation through the subclass's
  ``TRANSITIONS`` table; a message the table does not allow is a
  LocalProtocolError when this side tries to send it (nothing is sent) and a
  RemoteProtocolError when the peer does (the session enters ``ERROR``, from
  which only an ``Error`` may still be sent to say why).

A subclass supplies its ``State`` enum (with the opening's members
``AWAIT_CLIENT_HELLO``, ``AWAIT_SERVER_HELLO``, ``AWAIT_SERVER_PROOF``,
``AWAIT_CLIENT_PROOF``, and ``CLOSED`` and ``ERROR``), the table (its own rows
plus ``common_rows``), its message decoder, its version and
auth context, and ``_on_message`` for its own messages.
"""

from __future__ import annotations

import contextlib
import enum
from typing import Annotated, Any, ClassVar, Final, Literal, TypeAlias

import msgspec

from ftproxy.core.auth import AuthenticationError, Handshake, Side
from ftproxy.core.framing import FrameBuffer, FrameError, frame
from ftproxy.core.sealing import TAG_SIZE, Opener, Sealer, SealError

OPENING_FRAME_LIMIT: Final = 4096
"""The largest frame a peer may send before it has proved the secret."""

Blob = Annotated[bytes, msgspec.Meta(max_length=256)]
Reason = Annotated[str, msgspec.Meta(max_length=4096)]


class Hello(msgspec.Struct, tag=0, array_like=True, frozen=True):
    """First message of each side: protocol version and authentication challenge.

    Its fields never change, so a peer of any version gets a clear answer.
    """

    version: int
    nonce: Blob
    secure: bool


class Proof(msgspec.Struct, tag=1, array_like=True, frozen=True):
    """The sender's proof that it knows the shared secret (empty when insecure)."""

    mac: Blob


class Error(msgspec.Struct, tag=2, array_like=True, frozen=True):
    """The sender gives up on the conversation, and says why; it closes next."""

    reason: Reason


class Authenticated(msgspec.Struct, frozen=True):
    """The opening is done and the peer proved the secret (``secure=False``: both insecure)."""

    secure: bool


class ConnectionClosed(msgspec.Struct, frozen=True):
    """The peer closed its end (at a frame boundary); nothing more will arrive."""


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
"""Returned by ``next_event`` when it needs more bytes."""


class ProtocolError(Exception):
    """Something broke the protocol; the two subclasses say whose fault it was."""


class LocalProtocolError(ProtocolError):
    """This side misused the session (a bug in the caller); nothing was sent."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: garbage, another version, failed authentication, refusal."""


class PeerAborted(RemoteProtocolError):
    """The peer gave up on the conversation with an ``Error``, and ``reason`` says why:
    a decision of the peer's, not a broken frame."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


Kind: TypeAlias = type[Any]


def common_rows(state: Any, authenticated: Any) -> dict[tuple[Any, Side, Kind], Any]:
    """The rows every table has.

    The opening (the client's Hello, the server's Hello and Proof, the client's
    Proof, ending in ``authenticated``); either side may give up (Error) or hang
    up in any live state; after the peer broke the protocol we may still tell it why.
    """
    client, server = Side.CLIENT, Side.SERVER
    rows: dict[tuple[Any, Side, Kind], Any] = {
        (state.AWAIT_CLIENT_HELLO, client, Hello): state.AWAIT_SERVER_HELLO,
        (state.AWAIT_SERVER_HELLO, server, Hello): state.AWAIT_SERVER_PROOF,
        (state.AWAIT_SERVER_PROOF, server, Proof): state.AWAIT_CLIENT_PROOF,
        (state.AWAIT_CLIENT_PROOF, client, Proof): authenticated,
    }
    live = [s for s in state if s.name not in ("CLOSED", "ERROR")]
    for s in live:
        for role in Side:
            rows[s, role, Error] = state.CLOSED
            rows[s, role, ConnectionClosed] = state.CLOSED
    rows.update({(state.ERROR, role, Error): state.CLOSED for role in Side})
    return rows


class Session:
    """One end of an authenticated conversation; bytes in, events out."""

    VERSION: ClassVar[int]
    AUTH_CONTEXT: ClassVar[bytes]
    NAME: ClassVar[str]  # for messages: "log channel", "arbiter protocol"
    State: ClassVar[Any]
    TRANSITIONS: ClassVar[dict[tuple[Any, Side, Kind], Any]]
    DECODER: ClassVar[msgspec.msgpack.Decoder[Any]]
    _encoder: ClassVar[msgspec.msgpack.Encoder] = msgspec.msgpack.Encoder()

    def __init__(
        self,
        role: Side,
        secret: bytes | None,
        *,
        max_frame_size: int,
        nonce: bytes | None = None,
    ) -> None:
        self.role: Final = role
        self.max_frame_size: Final = max_frame_size
        self._handshake = Handshake(role, secret, context=self.AUTH_CONTEXT, nonce=nonce)
        self._frames = FrameBuffer(min(max_frame_size, OPENING_FRAME_LIMIT))
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._state = self.State.AWAIT_CLIENT_HELLO
        self._outgoing = bytearray()
        self._error: RemoteProtocolError | None = None
        if role is Side.CLIENT:
            self._emit(self._hello())

    @property
    def state(self) -> Any:
        """Where the conversation stands."""
        return self._state

    @property
    def secure(self) -> bool:
        """Whether this side authenticates with a secret."""
        return self._handshake.secure

    @property
    def sealed(self) -> bool:
        """Whether frames are sealed now (a secure conversation past its opening)."""
        return self._sealer is not None

    @property
    def failed(self) -> bool:
        """Whether the peer broke the protocol (``next_event`` raises it again)."""
        return self._error is not None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events."""
        return self._frames.buffered

    # -- input ---------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Hand over bytes read from the peer; ``b""`` means the peer closed its end."""
        if self._frames.eof:
            raise LocalProtocolError("receive_data() called after the end of the stream")
        self._frames.receive_data(data)

    def next_event(self) -> Any | Literal[_NeedData.NEED_DATA]:
        """The next event, or NEED_DATA; write out ``data_to_send()`` after each call.

        Raises RemoteProtocolError when the peer broke the protocol, again on
        every later call.
        """
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._state is self.State.CLOSED:
            return ConnectionClosed()
        while True:
            try:
                body = self._frames.next_frame()
            except FrameError as exc:
                raise self._fail(str(exc)) from None
            if body is None:
                if not self._frames.eof:
                    return NEED_DATA
                self._transition(self.role.peer, ConnectionClosed)
                return ConnectionClosed()
            if self._opener is not None:
                body = self._open(self._opener, body)
            try:
                message = self.DECODER.decode(body)
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                # msgspec reports a string that is not UTF-8 as UnicodeDecodeError.
                raise self._fail(f"malformed message: {exc}") from None
            event = self._receive(message)
            if event is not None:
                return event

    def _receive(self, message: Any) -> Any:
        sender = self.role.peer
        kind = type(message)
        if (self._state, sender, kind) not in self.TRANSITIONS:
            raise self._fail(
                f"unexpected {kind.__name__} from the {self._side(sender)} "
                f"in state {self._state.name}"
            )
        if isinstance(message, Error):
            self._transition(sender, Error)
            self._error = PeerAborted(
                f"the {self._side(sender)} aborted the connection, saying: {message.reason}",
                message.reason,
            )
            raise self._error
        if isinstance(message, Hello):
            if message.version != self.VERSION:
                raise self._fail(
                    f"the {self._side(sender)} speaks {self.NAME} version {message.version}; "
                    f"this side speaks version {self.VERSION}"
                )
            try:
                self._handshake.receive_challenge(message.nonce, message.secure)
            except AuthenticationError as exc:
                raise self._fail(f"authentication failed: {exc}") from None
            self._transition(sender, Hello)
            if self.role is Side.SERVER:
                self._emit(self._hello())
                self._emit(Proof(self._handshake.proof()))
            return None
        if isinstance(message, Proof):
            try:
                self._handshake.verify(message.mac)
            except AuthenticationError as exc:
                raise self._fail(f"authentication failed: {exc}") from None
            self._transition(sender, Proof)
            if self.role is Side.CLIENT:
                self._emit(Proof(self._handshake.proof()))
            self._opened()
            return Authenticated(secure=self._handshake.secure)
        problem = self._incoming_problem(message)
        if problem is not None:
            raise self._fail(problem)
        self._transition(sender, kind)
        return self._on_message(message)

    def _incoming_problem(self, message: Any) -> str | None:
        """What is wrong with a message the table allows, if anything (subclasses check)."""
        return None

    def _on_message(self, message: Any) -> Any:
        """The event for one of the protocol's own messages (default: the message)."""
        return message

    # -- output --------------------------------------------------------------

    def send(self, message: Any) -> bytes:
        """The bytes that send ``message``, after any queued opening bytes.

        Raises LocalProtocolError, sending nothing, when this side may not send
        ``message`` now or it breaks a field limit.
        """
        kind = type(message)
        if kind in (Hello, Proof) or (self._state, self.role, kind) not in self.TRANSITIONS:
            raise LocalProtocolError(
                f"a {self._side(self.role)} cannot send {kind.__name__} in state {self._state.name}"
            )
        problem = self._outgoing_problem(message)
        if problem is not None:
            raise LocalProtocolError(problem)
        body = self._encode_checked(message)
        self._transition(self.role, kind)
        self._sent(message)
        if self._sealer is not None:
            body = self._sealer.seal(body)
        return self.data_to_send() + frame(body)

    def forge(self, message: Any) -> bytes:
        """Frame (and, past the opening, seal) ``message`` or raw body bytes as this
        side's next frame, skipping every check: tests use it to misbehave as an
        authenticated peer."""
        body = message if isinstance(message, bytes) else self._encoder.encode(message)
        if self._sealer is not None:
            body = self._sealer.seal(body)
        return frame(body)

    def _outgoing_problem(self, message: Any) -> str | None:
        """What is wrong with a message this side wants to send, if anything."""
        return None

    def _sent(self, message: Any) -> None:
        """Bookkeeping after one of our messages passed the table."""

    def data_to_send(self) -> bytes:
        """Return (and forget) the opening bytes the session has queued."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    # -- internals -----------------------------------------------------------

    def _side(self, role: Side) -> str:
        return role.value

    def _hello(self) -> Hello:
        return Hello(self.VERSION, self._handshake.nonce, self._handshake.secure)

    def _emit(self, message: Hello | Proof) -> None:
        self._transition(self.role, type(message))
        self._outgoing += frame(self._encode_checked(message))

    def _opened(self) -> None:
        """The peer proved the secret: lift the opening's frame limit, seal from now on."""
        if self._handshake.secure:
            sending, receiving = self._handshake.frame_keys()
            self._sealer, self._opener = Sealer(sending), Opener(receiving)
            self._frames.max_frame_size = self.max_frame_size + TAG_SIZE
        else:
            self._frames.max_frame_size = self.max_frame_size

    def _open(self, opener: Opener, sealed: bytes) -> bytes:
        try:
            return opener.open(sealed)
        except SealError as exc:
            if opener.count == 0:
                # A peer that refused our proof could not derive our keys: its
                # Error comes plain. Take its word (it only ends the conversation).
                with contextlib.suppress(msgspec.MsgspecError, UnicodeDecodeError):
                    message = self.DECODER.decode(sealed)
                    if isinstance(message, Error):
                        return sealed
            raise self._fail(str(exc)) from None

    def _transition(self, sender: Side, kind: Kind) -> None:
        self._state = self.TRANSITIONS[self._state, sender, kind]

    def _encode_checked(self, message: Any) -> bytes:
        """The message's body (unframed, unsealed), checked against the peer's limits."""
        # Decoding what we encoded applies the same limits the peer will.
        try:
            body = self._encoder.encode(message)
            self.DECODER.decode(body)
        except (msgspec.MsgspecError, UnicodeError) as exc:
            raise LocalProtocolError(f"cannot send {message!r:.200}: {exc}") from None
        if len(body) > self.max_frame_size:
            raise LocalProtocolError(f"{type(message).__name__} is larger than the frame limit")
        return body

    def _fail(self, reason: str) -> RemoteProtocolError:
        self._state = self.State.ERROR
        self._error = RemoteProtocolError(reason)
        return self._error


def encode_unchecked(message: Any) -> bytes:
    """Frame one message without any check or seal (tests use this to misbehave)."""
    return frame(Session._encoder.encode(message))
