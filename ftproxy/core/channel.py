"""The log channel between primary and backup, sans I/O (in the style of h11).

A :class:`Channel` turns bytes into events and events into bytes; it never
touches a socket or a clock. The backup connects (the client), the primary
accepts (the server). One line per frame, backup on the left::

    Hello(version, nonce_b, secure)  ─▶
                                     ◀─  Hello(version, nonce_p, secure)
                                     ◀─  Proof(mac_p)
    Proof(mac_b)                     ─▶                both sides: Authenticated
    Join(argv)                       ─▶
                                     ◀─  Welcome(pair, generation, header, primary)
                                     ◀─  Protected(generation, seq)  (once caught up)
    ...streaming, in any order...
                                     ◀─  Entries([entry, ...])    (a batch: group commit)
    Ack(received, replayed)          ─▶  (cumulative; sent on receipt)
    Heartbeat()                      ◀▶
                                     ◀─  Waiting(seq, icount, kind, digest)  (a heartbeat too)
    Diverged(seq, icount, report, outputs) ─▶  the backup's guest did not do what
                                     ◀─  RecordedOutputs(seq, outputs)   the primary's did
                                     ◀─  Handover(seq, icount, kind, digest)  (switchover)
    HandedOver(generation, seq)      ─▶  (the backup won the arbiter and serves now)
    Error(reason)                    ◀▶  either side, any time, then it closes

A control client (``ftproxy switchover``) opens the channel as a backup does,
with the pair's secret, and asks instead of joining::

    Switchover()                     ─▶
                                     ◀─  SwitchoverOutcome(done, reason)   then it closes

``Join`` carries the backup's guest command line: the primary refuses (with an
Error that says why) a backup that would run another program. A backup may
go live only after ``Protected``: a primary waiting for its first backup sends
it at once; a live replica taking a new backup (re-protection) sends it once
the joiner has received every entry of its log. The opening, the
framing and the error rules are ``ftproxy.core.session``'s, shared with the
arbiter's protocol; the transitions are the one table ``_TRANSITIONS``.
"""

from __future__ import annotations

import enum
from typing import Any, Final, Literal, TypeAlias

import msgspec

from ftproxy.core.auth import Side
from ftproxy.core.records import Entry, Header, Output
from ftproxy.core.session import (
    NEED_DATA,
    Authenticated,
    ConnectionClosed,
    Error,
    Hello,
    LocalProtocolError,
    PeerAborted,
    Proof,
    ProtocolError,
    RemoteProtocolError,
    Session,
    _NeedData,
    common_rows,
    encode_unchecked,
)

__all__ = [
    "BACKUP",
    "CHANNEL_VERSION",
    "NEED_DATA",
    "PRIMARY",
    "Ack",
    "Authenticated",
    "Channel",
    "ChannelEvent",
    "ConnectionClosed",
    "Diverged",
    "Entries",
    "Error",
    "HandedOver",
    "Handover",
    "Heartbeat",
    "Hello",
    "Join",
    "LocalProtocolError",
    "PeerAborted",
    "Proof",
    "Protected",
    "ProtocolError",
    "RecordedOutputs",
    "RemoteProtocolError",
    "Sendable",
    "State",
    "Switchover",
    "SwitchoverOutcome",
    "Waiting",
    "Welcome",
    "encode_message",
]

# 2: entries carry guest-pipe replies of log format version 2 (``ftproxy.core.records``).
# 3: frames after the opening are sealed (``ftproxy.core.session``); Welcome says who
#    the primary is, for fencing (``ftproxy.shell.fence``); Waiting, Diverged and
#    RecordedOutputs (a running pair checks its outputs); Protected (a backup may
#    go live only once it was told so).
# 4: Handover and HandedOver (a planned switchover); Switchover and
#    SwitchoverOutcome (the authenticated control request that asks for one).
CHANNEL_VERSION: Final = 4
MAX_FRAME_SIZE: Final = 64 * 1024 * 1024
AUTH_CONTEXT: Final = b"ftproxy-log-channel"


class ProcessIdentity(msgspec.Struct, array_like=True, frozen=True):
    """One process, named so that another host or a recycled pid cannot match it."""

    host: str  # boot id and hostname
    pid: int
    start_time: int  # clock ticks after boot (/proc/PID/stat, field 22)


class Join(msgspec.Struct, tag=3, array_like=True, frozen=True):
    """The backup asks to replicate; ``argv`` is the guest command line it was given."""

    argv: list[str]


class Welcome(msgspec.Struct, tag=4, array_like=True, frozen=True):
    """The primary takes the backup: the pair, its generation and the log header.

    ``primary`` names the primary's supervisor process, so that a backup on the
    same host can fence it (``ftproxy.shell.fence``).
    """

    pair: str
    generation: int
    header: Header
    primary: ProcessIdentity | None = None


class Entries(msgspec.Struct, tag=5, array_like=True, frozen=True):
    """A batch of log entries, in seq order (group commit)."""

    entries: list[Entry]


class Ack(msgspec.Struct, tag=6, array_like=True, frozen=True):
    """The backup holds every entry up to ``received`` and has replayed up to ``replayed``."""

    received: int
    replayed: int


class Heartbeat(msgspec.Struct, tag=7, array_like=True, frozen=True):
    """Nothing to say, but alive."""


class Waiting(msgspec.Struct, tag=10, array_like=True, frozen=True):
    """Sent instead of a heartbeat: the primary's guest has waited a while at the exit
    that will be entry ``seq``, at ``icount``, with ``digest`` of its outputs so far.
    The digest of the outputs before an exit otherwise reaches the backup only with
    that exit's entry, when input comes: this lets it check the outputs of an idle
    service within a heartbeat."""

    seq: int
    icount: int
    kind: int
    digest: int


class Diverged(msgspec.Struct, tag=8, array_like=True, frozen=True):
    """The backup's guest diverged at entry ``seq``: it stops. ``report`` is what the
    backup knows (both sides as it sees them, its guest's stack); ``outputs`` are its
    guest's outputs after entry ``seq - 1``, for the primary to compare with its own."""

    seq: int
    icount: int
    report: str
    outputs: list[Output]


class RecordedOutputs(msgspec.Struct, tag=9, array_like=True, frozen=True):
    """The primary's answer to Diverged: its guest's outputs after entry ``seq``."""

    seq: int
    outputs: list[Output]


class Protected(msgspec.Struct, tag=11, array_like=True, frozen=True):
    """The backup holds the log up to ``seq``: the pair is protected under ``generation``.

    From here on the primary's outputs wait for this backup's acks, and the
    backup may go live if the primary dies; before it, it may not.
    """

    generation: int
    seq: int


class Handover(msgspec.Struct, tag=12, array_like=True, frozen=True):
    """A planned switchover: the backup holds and has replayed every entry up to
    ``seq``; no more will come. The primary's guest is held at the exit that would
    have been entry ``seq + 1`` (``icount``, ``kind``, ``digest`` of its outputs, as
    in Waiting), and the primary releases nothing from now on: the backup claims
    the pair through the arbiter, goes live at that exit, and says HandedOver."""

    seq: int
    icount: int
    kind: int
    digest: int


class HandedOver(msgspec.Struct, tag=13, array_like=True, frozen=True):
    """The backup won the arbiter for ``generation`` and serves from entry ``seq + 1``."""

    generation: int
    seq: int


class Switchover(msgspec.Struct, tag=14, array_like=True, frozen=True):
    """A control client (not a backup) asks the primary to hand the service to its backup."""


class SwitchoverOutcome(msgspec.Struct, tag=15, array_like=True, frozen=True):
    """The answer to Switchover: ``done`` (the backup serves now) or not, and why.
    ``refused``: nothing changed (no backup, or not caught up); otherwise the
    handover was tried and did not end in time."""

    done: bool
    refused: bool
    reason: str


# What either side may send once the opening is done (``Channel.send``).
Sendable: TypeAlias = (
    Join
    | Welcome
    | Entries
    | Ack
    | Heartbeat
    | Waiting
    | Diverged
    | RecordedOutputs
    | Protected
    | Handover
    | HandedOver
    | Switchover
    | SwitchoverOutcome
    | Error
)
Message: TypeAlias = Hello | Proof | Sendable
ChannelEvent: TypeAlias = (
    Authenticated
    | Join
    | Welcome
    | Entries
    | Ack
    | Heartbeat
    | Waiting
    | Diverged
    | RecordedOutputs
    | Protected
    | Handover
    | HandedOver
    | Switchover
    | SwitchoverOutcome
    | ConnectionClosed
)


class State(enum.Enum):
    AWAIT_CLIENT_HELLO = enum.auto()
    AWAIT_SERVER_HELLO = enum.auto()
    AWAIT_SERVER_PROOF = enum.auto()
    AWAIT_CLIENT_PROOF = enum.auto()
    AWAIT_JOIN = enum.auto()
    AWAIT_WELCOME = enum.auto()
    AWAIT_OUTCOME = enum.auto()  # a control client asked for a switchover
    STREAMING = enum.auto()
    CLOSED = enum.auto()
    ERROR = enum.auto()


BACKUP: Final = Side.CLIENT
PRIMARY: Final = Side.SERVER

_TRANSITIONS: Final[dict[tuple[State, Side, type[Any]], State]] = {
    **common_rows(State, authenticated=State.AWAIT_JOIN),
    (State.AWAIT_JOIN, BACKUP, Join): State.AWAIT_WELCOME,
    (State.AWAIT_WELCOME, PRIMARY, Welcome): State.STREAMING,
    (State.STREAMING, PRIMARY, Entries): State.STREAMING,
    (State.STREAMING, BACKUP, Ack): State.STREAMING,
    (State.STREAMING, PRIMARY, Heartbeat): State.STREAMING,
    (State.STREAMING, BACKUP, Heartbeat): State.STREAMING,
    (State.STREAMING, PRIMARY, Waiting): State.STREAMING,
    (State.STREAMING, BACKUP, Diverged): State.STREAMING,
    (State.STREAMING, PRIMARY, RecordedOutputs): State.STREAMING,
    (State.STREAMING, PRIMARY, Protected): State.STREAMING,
    (State.STREAMING, PRIMARY, Handover): State.STREAMING,
    (State.STREAMING, BACKUP, HandedOver): State.STREAMING,
    (State.AWAIT_JOIN, BACKUP, Switchover): State.AWAIT_OUTCOME,
    (State.AWAIT_OUTCOME, PRIMARY, SwitchoverOutcome): State.CLOSED,
}


def encode_message(message: Message) -> bytes:
    """Frame one message, unchecked (tests use this to misbehave)."""
    return encode_unchecked(message)


class Channel(Session):
    """One end of a log channel. ``role`` is BACKUP (connects) or PRIMARY (accepts)."""

    VERSION = CHANNEL_VERSION
    AUTH_CONTEXT = AUTH_CONTEXT
    NAME = "log channel"
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
        super().__init__(role, secret, max_frame_size=max_frame_size, nonce=nonce)

    def next_event(self) -> ChannelEvent | Literal[_NeedData.NEED_DATA]:
        """The next event, or NEED_DATA. Write out data_to_send() after each call."""
        event: ChannelEvent | Literal[_NeedData.NEED_DATA] = super().next_event()
        return event

    def send(self, message: Sendable) -> bytes:
        """The bytes that send ``message``, after any queued opening bytes."""
        return super().send(message)

    def _side(self, role: Side) -> str:
        return "backup" if role is BACKUP else "primary"
