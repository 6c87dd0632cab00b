"""The log channel between primary and backup, sans I/O (in the style of h11).

A :class:`Channel` turns bytes into events and events into bytes; it never
touches a socket or a clock. The backup connects (the client), the primary
accepts (the server). One line per frame, backup on the left::

    Hello(version, nonce_b, secure)  ─▶
                                     ◀─  Hello(version, nonce_p, secure)
                                     ◀─  Proof(mac_p)
    Proof(mac_b)                     ─▶                both sides: Authenticated
    Join(argv)                       ─▶
                                     ◀─  Welcome(pair, generation, header)
    ...streaming, in any order...
                                     ◀─  Entries([entry, ...])    (a batch: group commit)
    Ack(received, replayed)          ─▶  (cumulative; sent on receipt)
    Heartbeat()                      ◀▶
    Error(reason)                    ◀▶  either side, any time, then it closes

``Join`` carries the backup's guest command line: the primary refuses (with an
Error that says why) a backup that would run another program. The transitions
are the one table ``_TRANSITIONS``; a message it does not allow is a
LocalProtocolError when we try to send it and a RemoteProtocolError when the
peer does. ``Hello`` keeps its first fields in every version, so a peer of
another version always gets a clear answer.
"""

from __future__ import annotations

import enum
from typing import Annotated, Final, Literal, TypeAlias

import msgspec

from ftproxy.auth import AuthenticationError, Handshake, Role
from ftproxy.framing import FrameBuffer, FrameError, frame
from ftproxy.wire import Entry, Header

CHANNEL_VERSION: Final = 1
MAX_FRAME_SIZE: Final = 64 * 1024 * 1024
AUTH_CONTEXT: Final = b"ftproxy-log-channel"

Blob = Annotated[bytes, msgspec.Meta(max_length=256)]
Reason = Annotated[str, msgspec.Meta(max_length=4096)]


class Hello(msgspec.Struct, tag=0, array_like=True, frozen=True):
    version: int
    nonce: Blob
    secure: bool


class Proof(msgspec.Struct, tag=1, array_like=True, frozen=True):
    mac: Blob


class Join(msgspec.Struct, tag=2, array_like=True, frozen=True):
    """The backup asks to replicate; ``argv`` is the guest command line it was given."""

    argv: list[str]


class Welcome(msgspec.Struct, tag=3, array_like=True, frozen=True):
    """The primary takes the backup: the pair, its generation and the log header."""

    pair: str
    generation: int
    header: Header


class Entries(msgspec.Struct, tag=4, array_like=True, frozen=True):
    entries: list[Entry]


class Ack(msgspec.Struct, tag=5, array_like=True, frozen=True):
    """The backup holds every entry up to ``received`` and has replayed up to ``replayed``."""

    received: int
    replayed: int


class Heartbeat(msgspec.Struct, tag=6, array_like=True, frozen=True):
    pass


class Error(msgspec.Struct, tag=7, array_like=True, frozen=True):
    """The sender gives up on the connection, and says why; it closes next."""

    reason: Reason


Message: TypeAlias = Hello | Proof | Join | Welcome | Entries | Ack | Heartbeat | Error

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Message)


class Authenticated(msgspec.Struct, frozen=True):
    """The handshake is done and the peer proved the secret (or both are insecure)."""

    secure: bool


class ConnectionClosed(msgspec.Struct, frozen=True):
    """The peer closed its end."""


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA

ChannelEvent: TypeAlias = (
    Authenticated | Join | Welcome | Entries | Ack | Heartbeat | ConnectionClosed
)


class ProtocolError(Exception):
    """Something broke the channel's protocol."""


class LocalProtocolError(ProtocolError):
    """This side misused the channel (a bug in the caller); nothing was sent."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: garbage, wrong version, failed authentication, refusal."""


class State(enum.Enum):
    AWAIT_CLIENT_HELLO = enum.auto()
    AWAIT_SERVER_HELLO = enum.auto()
    AWAIT_SERVER_PROOF = enum.auto()
    AWAIT_CLIENT_PROOF = enum.auto()
    AWAIT_JOIN = enum.auto()
    AWAIT_WELCOME = enum.auto()
    STREAMING = enum.auto()
    CLOSED = enum.auto()
    ERROR = enum.auto()


BACKUP: Final = Role.CLIENT
PRIMARY: Final = Role.SERVER
_Kind: TypeAlias = type[Message] | type[ConnectionClosed]
_LIVE: Final = [s for s in State if s not in (State.CLOSED, State.ERROR)]

_TRANSITIONS: Final[dict[tuple[State, Role, _Kind], State]] = {
    (State.AWAIT_CLIENT_HELLO, BACKUP, Hello): State.AWAIT_SERVER_HELLO,
    (State.AWAIT_SERVER_HELLO, PRIMARY, Hello): State.AWAIT_SERVER_PROOF,
    (State.AWAIT_SERVER_PROOF, PRIMARY, Proof): State.AWAIT_CLIENT_PROOF,
    (State.AWAIT_CLIENT_PROOF, BACKUP, Proof): State.AWAIT_JOIN,
    (State.AWAIT_JOIN, BACKUP, Join): State.AWAIT_WELCOME,
    (State.AWAIT_WELCOME, PRIMARY, Welcome): State.STREAMING,
    (State.STREAMING, PRIMARY, Entries): State.STREAMING,
    (State.STREAMING, BACKUP, Ack): State.STREAMING,
    (State.STREAMING, PRIMARY, Heartbeat): State.STREAMING,
    (State.STREAMING, BACKUP, Heartbeat): State.STREAMING,
    **{(s, role, Error): State.CLOSED for s in _LIVE for role in Role},
    **{(s, role, ConnectionClosed): State.CLOSED for s in _LIVE for role in Role},
    **{(State.ERROR, role, Error): State.CLOSED for role in Role},
}


def encode_message(message: Message) -> bytes:
    """Frame one message, unchecked (tests use this to misbehave)."""
    return frame(_encoder.encode(message))


class Channel:
    """One end of a log channel. ``role`` is BACKUP (connects) or PRIMARY (accepts)."""

    def __init__(
        self,
        role: Role,
        secret: bytes | None,
        *,
        max_frame_size: int = MAX_FRAME_SIZE,
        nonce: bytes | None = None,
    ) -> None:
        self.role: Final = role
        self._handshake = Handshake(role, secret, context=AUTH_CONTEXT, nonce=nonce)
        self._frames = FrameBuffer(max_frame_size)
        self._state = State.AWAIT_CLIENT_HELLO
        self._outgoing = bytearray()
        self._error: RemoteProtocolError | None = None
        if role is BACKUP:
            self._emit(self._hello())

    @property
    def state(self) -> State:
        return self._state

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the peer; ``b""`` when it closed its end."""
        if self._frames.eof:
            raise LocalProtocolError("receive_data() after the end of the stream")
        self._frames.receive_data(data)

    def next_event(self) -> ChannelEvent | Literal[_NeedData.NEED_DATA]:
        """The next event, or NEED_DATA. Write out data_to_send() after each call."""
        if self._error is not None:
            raise RemoteProtocolError(str(self._error))
        if self._state is State.CLOSED:
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
            try:
                message = _decoder.decode(body)
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                raise self._fail(f"malformed message: {exc}") from None
            event = self._receive(message)
            if event is not None:
                return event

    def _receive(self, message: Message) -> ChannelEvent | None:
        sender = self.role.peer
        kind = type(message)
        if (self._state, sender, kind) not in _TRANSITIONS:
            raise self._fail(
                f"unexpected {kind.__name__} from the {_side(sender)} in state {self._state.name}"
            )
        self._transition(sender, kind)
        match message:
            case Error(reason):
                self._error = RemoteProtocolError(f"the {_side(sender)} refused: {reason}")
                raise self._error
            case Hello(version, nonce, secure):
                if version != CHANNEL_VERSION:
                    raise self._fail(
                        f"the {_side(sender)} speaks log channel version {version}; "
                        f"this side speaks version {CHANNEL_VERSION}"
                    )
                try:
                    self._handshake.receive_challenge(nonce, secure)
                except AuthenticationError as exc:
                    raise self._fail(f"authentication failed: {exc}") from None
                if self.role is PRIMARY:
                    self._emit(self._hello())
                    self._emit(Proof(self._handshake.proof()))
                return None
            case Proof(mac):
                try:
                    self._handshake.verify(mac)
                except AuthenticationError as exc:
                    raise self._fail(f"authentication failed: {exc}") from None
                if self.role is BACKUP:
                    self._emit(Proof(self._handshake.proof()))
                return Authenticated(secure=self._handshake.secure)
            case Join() | Welcome() | Entries() | Ack() | Heartbeat():
                return message
        raise AssertionError(f"unhandled message {message!r}")  # pragma: no cover

    def send(self, message: Join | Welcome | Entries | Ack | Heartbeat | Error) -> bytes:
        """The bytes that send ``message``, after any queued handshake bytes."""
        kind = type(message)
        if (self._state, self.role, kind) not in _TRANSITIONS:
            raise LocalProtocolError(
                f"the {_side(self.role)} cannot send {kind.__name__} in state {self._state.name}"
            )
        data = encode_message(message)
        self._transition(self.role, kind)
        return self.data_to_send() + data

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def _hello(self) -> Hello:
        return Hello(CHANNEL_VERSION, self._handshake.nonce, self._handshake.secure)

    def _emit(self, message: Hello | Proof) -> None:
        self._transition(self.role, type(message))
        self._outgoing += encode_message(message)

    def _transition(self, sender: Role, kind: _Kind) -> None:
        self._state = _TRANSITIONS[self._state, sender, kind]

    def _fail(self, reason: str) -> RemoteProtocolError:
        self._state = State.ERROR
        self._error = RemoteProtocolError(reason)
        return self._error


def _side(role: Role) -> str:
    return "backup" if role is BACKUP else "primary"
