"""The guest pipe: what a guest asks at an exit and what its supervisor answers.

This module is imported by the guest runtime (inside the user's process) and by
the supervisor, so it imports nothing beyond ``marshal`` and ``struct``.

Framing: a 4-byte little-endian length, then a ``marshal`` body written with
version 2, which has no back-references, so equal values always encode to
equal bytes (the log stores replies verbatim and replay feeds the same bytes).

Guest -> supervisor: one frame is a list of messages. Outputs stream in frames
of their own when the guest's buffer fills, and always precede the exit request
that ends a frame; the supervisor tags each output with the seq of the last
reply the guest consumed, so outputs carry no seq themselves.

    (OP_SEND, sock, data)
    (OP_SENDTO, sock, data, addr)
    (OP_SHUTDOWN, sock, how)
    (OP_CLOSE, sock)
    (OP_FRAME, 0, frame)                    # packet mode: an Ethernet frame to transmit
    (OP_EXIT, icount, kind, args, digest)   # always the last message of a frame
    (OP_STACK, text)                        # the guest's answer to a halt

Supervisor -> guest: one frame per exit request, the reply. Its head
(``REPLY_HEAD``) is the length and the exit the reply answers: the icount,
kind and digest of the request (a halt's icount is ``ANY_EXIT``). A guest
given a reply for another exit stops there with its stack (OP_STACK), as at a
halt: a replaying supervisor writes replies ahead of the requests, from the
log, so the guest never waits for them, and a diverged guest must stop where
it diverged. The body:

    (mono_gain, result)                     # result depends on the exit kind
    (mono_gain, result, wall_shift)         # the same, and the wall clock moves
    (None, reason)                          # halt: send OP_STACK, then exit

Every reply is logged, so every byte of one counts. The clock travels as small
deltas, which marshal writes as 5-byte ints, where absolute nanoseconds would
take 11-15 bytes. Both ends know the guest's virtual clock: between exits its
monotonic clock advances ``clock_step_ns`` per device call, and its wall clock
is the monotonic clock plus an offset. At an exit at ``icount``, the reply
moves the monotonic clock ``mono_gain`` ns beyond that virtual value (real
time passed while the guest computed or waited) and, only when the host's wall
clock moved away from the guest's (see ``ftproxy.shell.world.WorldClock``), changes
the wall offset by ``wall_shift`` ns. ``GuestClock`` is that arithmetic; the
guest runtime does the same inline. The values are exact at any size (marshal
writes big ints as longs); the first reply carries the whole host clock, as
gains from zero. ``encode_reply`` and ``split_reply`` build and take apart
replies for the supervisor's side.

Exit kinds, their args and results:

    KIND_BOOT     ()          -> (seed, pid, exit_every, clock_step_ns, hostname, network)
    KIND_WAIT     (timeout_ns, readable, writable, pressured) -> (index, blob, events)
    KIND_BIND     (sock, family, type, addr)          -> (errno, addr)
    KIND_LISTEN   (sock, backlog)                     -> errno
    KIND_CONNECT  (sock, family, addr, timeout_ns)    -> (errno, local_addr, peer_addr)
    KIND_RESOLVE  (host, port, family, type, proto, flags) -> (gai_error, [addrinfo, ...])

``network`` is None in socket mode. In packet mode it is ``(mac, ip, prefix_len,
gateway)``: the guest runs its own TCP/IP stack (``ftproxy.netstack``) for that
address, answers BIND, LISTEN and CONNECT itself, and exchanges only Ethernet
frames with its supervisor: EV_FRAME events in, OP_FRAME outputs out.

``timeout_ns`` is -1 for "no timeout". In a wait, ``readable`` lists the sockets
whose input (data, EOF, reset, new connections, datagrams) ends the wait,
``writable`` the sockets whose send buffer is full, and ``pressured`` sockets
whose buffer is past half full (their progress is reported but does not wake).

A wait's result carries stream input apart from the other events, because it
is most of a log's bytes and a marshal tuple per chunk would cost 20 bytes of
framing (a 59-byte SET would log as 79): ``index`` packs one ``DATA_INDEX``
(conn, length) pair per chunk, 6 bytes, and ``blob`` is the chunks end to end,
in that order. Every chunk is an ``EV_DATA`` event for its conn, delivered
before the other events (``unpack_data`` and ``wait_events`` give them back as
event tuples). ``events`` is a list of the other events, or None when there
are none:

    (EV_ACCEPT, listener, conn, peer_addr, local_addr)
    (EV_DATA, conn, data)                   # only as unpacked from index and blob
    (EV_EOF, conn)
    (EV_RESET, conn, errno)
    (EV_SENT, conn, total_bytes_written)    # cumulative, so a repeat is harmless
    (EV_DGRAM, sock, data, addr)
    (EV_SIGNAL, signum)
    (EV_FRAME, frame)                       # packet mode: a received Ethernet frame

Addresses are tuples as the ``socket`` module uses them: ``(host, port)`` for
IPv4, ``(host, port, flowinfo, scope_id)`` for IPv6.
"""

from __future__ import annotations

import marshal
import struct
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Sequence

MARSHAL_VERSION: Final = 2
LENGTH: Final = struct.Struct("<I")
MAX_FRAME: Final = 64 * 1024 * 1024
# A reply's frame starts with its length and the exit it answers (icount, kind
# and the digest of the outputs before it). The guest uses a reply only when it
# names the exit the guest is at: a replaying supervisor may write replies
# ahead of the requests, and a guest that diverged must stop where it diverged,
# not run on with replies meant for another execution. ANY_EXIT answers
# whichever exit the guest is at (a halt).
REPLY_HEAD: Final = struct.Struct("<IqiI")  # length, icount, kind, digest
ANY_EXIT: Final = -1

# The pipe's fds in the guest process: fixed, so that nothing about them
# differs between a primary and a backup guest.
REPLY_FD: Final = 3
REQUEST_FD: Final = 4

OP_EXIT: Final = 0
OP_SEND: Final = 1
OP_SENDTO: Final = 2
OP_SHUTDOWN: Final = 3
OP_CLOSE: Final = 4
OP_STACK: Final = 5
OP_FRAME: Final = 6

KIND_BOOT: Final = 0
KIND_WAIT: Final = 1
KIND_BIND: Final = 2
KIND_LISTEN: Final = 3
KIND_CONNECT: Final = 4
KIND_RESOLVE: Final = 5

KIND_NAMES: Final = {
    KIND_BOOT: "boot",
    KIND_WAIT: "wait",
    KIND_BIND: "bind",
    KIND_LISTEN: "listen",
    KIND_CONNECT: "connect",
    KIND_RESOLVE: "resolve",
}

OP_NAMES: Final = {
    OP_EXIT: "exit",
    OP_SEND: "send",
    OP_SENDTO: "sendto",
    OP_SHUTDOWN: "shutdown",
    OP_CLOSE: "close",
    OP_STACK: "stack",
    OP_FRAME: "frame",
}

EV_ACCEPT: Final = 0
EV_DATA: Final = 1
EV_EOF: Final = 2
EV_RESET: Final = 3
EV_SENT: Final = 4
EV_DGRAM: Final = 5
EV_SIGNAL: Final = 6
EV_FRAME: Final = 7

EVENT_NAMES: Final = {
    EV_ACCEPT: "accept",
    EV_DATA: "data",
    EV_EOF: "eof",
    EV_RESET: "reset",
    EV_SENT: "sent",
    EV_DGRAM: "dgram",
    EV_SIGNAL: "signal",
    EV_FRAME: "frame",
}

# Sockets the guest creates are numbered by the guest from FIRST_GUEST_SOCK;
# connections the supervisor accepts on the guest's behalf are numbered by the
# supervisor from FIRST_ACCEPTED_SOCK, so the two never collide.
FIRST_GUEST_SOCK: Final = 1000
FIRST_ACCEPTED_SOCK: Final = 1 << 30

# Pinned policy defaults (the log header records the values used).
DEFAULT_EXIT_EVERY: Final = 200
DEFAULT_CLOCK_STEP_NS: Final = 1000
# The guest's virtual send buffer per stream socket: bounded so that
# asyncio's drain() waits when the supervisor cannot write fast enough.
SEND_BUFFER: Final = 256 * 1024
# One stream input chunk in a wait result's index: (conn, length).
DATA_INDEX: Final = struct.Struct("<IH")
# The most input a single event hands the guest for one socket: what the
# index's 16-bit length holds.
RECV_CHUNK: Final = 0xFFFF


class ProtocolError(Exception):
    """The other end of the guest pipe sent something that is not a frame."""


def encode(value: Any) -> bytes:
    """Encode ``value`` as one frame (length prefix included)."""
    body = marshal.dumps(value, MARSHAL_VERSION)
    return LENGTH.pack(len(body)) + body


def encode_body(value: Any) -> bytes:
    """Encode ``value`` as a frame body, without the length prefix."""
    return marshal.dumps(value, MARSHAL_VERSION)


def decode_body(body: bytes | bytearray | memoryview) -> Any:
    """Decode a frame body; raise ProtocolError when it is not one."""
    try:
        return marshal.loads(body)
    except (EOFError, ValueError, TypeError) as exc:
        raise ProtocolError(f"undecodable frame body ({len(body)} bytes): {exc}") from None


def reply_frame(icount: int, kind: int, digest: int, body: bytes) -> bytes:
    """A reply's frame: its head (length, the exit it answers) and its body."""
    return REPLY_HEAD.pack(len(body), icount, kind, digest) + body


def frame_length(header: bytes | bytearray | memoryview) -> int:
    """Read a frame's length prefix; raise ProtocolError past MAX_FRAME."""
    (length,) = LENGTH.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes is larger than the limit {MAX_FRAME}")
    return int(length)


class GuestClock:
    """The guest's virtual clocks as a sequence of replies sets them (exact ints).

    The supervisor's world clock, a backup taking over and the log tools keep
    one to know the absolute time of every reply; the guest runtime does the
    same arithmetic inline, on its hot path.
    """

    __slots__ = ("icount", "mono_ns", "step_ns", "wall_offset_ns")

    def __init__(self, step_ns: int) -> None:
        self.step_ns = step_ns
        self.icount = 0  # the icount of the last reply applied
        self.mono_ns = 0  # the guest's monotonic clock at that reply
        self.wall_offset_ns = 0  # wall clock minus monotonic clock

    def mono_at(self, icount: int) -> int:
        """The guest's monotonic clock at ``icount``, with no exit since the last reply."""
        return self.mono_ns + (icount - self.icount) * self.step_ns

    def wall_at(self, icount: int) -> int:
        return self.mono_at(icount) + self.wall_offset_ns

    def apply(self, icount: int, mono_gain: int, wall_shift: int) -> None:
        """Take the clock part of the reply to the exit at ``icount``."""
        self.mono_ns = self.mono_at(icount) + mono_gain
        self.wall_offset_ns += wall_shift
        self.icount = icount

    def deltas_to(self, icount: int, mono_ns: int, wall_ns: int) -> tuple[int, int]:
        """The (mono_gain, wall_shift) of a reply at ``icount`` that sets the clocks to
        these absolute values; applied here too."""
        mono_gain = mono_ns - self.mono_at(icount)
        wall_shift = wall_ns - mono_ns - self.wall_offset_ns
        self.apply(icount, mono_gain, wall_shift)
        return mono_gain, wall_shift


def encode_reply(mono_gain: int, wall_shift: int, result: Any) -> bytes:
    """A reply body: the wall shift is left out when it is 0 (nearly always)."""
    if wall_shift:
        return marshal.dumps((mono_gain, result, wall_shift), MARSHAL_VERSION)
    return marshal.dumps((mono_gain, result), MARSHAL_VERSION)


def split_reply(value: Any) -> tuple[int, int, Any]:
    """A decoded reply's (mono_gain, wall_shift, result); ProtocolError if it is not one."""
    if (
        isinstance(value, tuple)
        and len(value) in (2, 3)
        and all(isinstance(part, int) and not isinstance(part, bool) for part in value[::2])
    ):
        return value[0], (value[2] if len(value) == 3 else 0), value[1]
    raise ProtocolError(f"not a (mono_gain, result[, wall_shift]) reply: {value!r:.80}")


def pack_data(chunks: Sequence[tuple[int, bytes]]) -> tuple[bytes, bytes]:
    """A wait result's (index, blob) for these (conn, data) chunks, in order."""
    index = b"".join([DATA_INDEX.pack(conn, len(data)) for conn, data in chunks])
    return index, b"".join([data for _, data in chunks])


def unpack_data(index: bytes, blob: bytes) -> list[tuple[int, bytes]]:
    """The (conn, data) chunks of a wait result; ProtocolError if they do not add up."""
    if len(index) % DATA_INDEX.size:
        raise ProtocolError(f"data index of {len(index)} bytes is not whole entries")
    chunks: list[tuple[int, bytes]] = []
    offset = 0
    for conn, length in DATA_INDEX.iter_unpack(index):
        chunks.append((conn, blob[offset : offset + length]))
        offset += length
    if offset != len(blob):
        raise ProtocolError(f"data index covers {offset} bytes of a {len(blob)}-byte blob")
    return chunks


def wait_result(
    events: Sequence[tuple[Any, ...]],
) -> tuple[bytes, bytes, list[tuple[Any, ...]] | None]:
    """The wire form of a wait result given as event tuples (EV_DATA ones packed)."""
    chunks = [(event[1], event[2]) for event in events if event[0] == EV_DATA]
    index, blob = pack_data(chunks)
    return index, blob, [event for event in events if event[0] != EV_DATA] or None


def wait_events(result: Any) -> list[tuple[Any, ...]]:
    """A wait result's events as tuples, in delivery order: data first, as the guest
    takes them. ProtocolError when the result is not (index, blob, events)."""
    if not (isinstance(result, tuple | list) and len(result) == 3):
        raise ProtocolError("a wait result is (index, blob, events)")
    index, blob, others = result
    if not (isinstance(index, bytes) and isinstance(blob, bytes)):
        raise ProtocolError("a wait result's index and blob are bytes")
    if others is None:
        others = []
    if not isinstance(others, list | tuple):
        raise ProtocolError("a wait result's events are a list or None")
    data = [(EV_DATA, conn, chunk) for conn, chunk in unpack_data(index, blob)]
    return [*data, *others]
