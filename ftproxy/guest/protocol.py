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

Supervisor -> guest: one frame per exit request, the reply

    (wall_ns, mono_ns, result)              # result depends on the exit kind
    (None, reason)                          # halt: send OP_STACK, then exit

Exit kinds, their args and results:

    KIND_BOOT     ()          -> (seed, pid, exit_every, clock_step_ns, hostname, network)
    KIND_WAIT     (timeout_ns, readable, writable, pressured) -> [event, ...]
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

Events in a wait's result:

    (EV_ACCEPT, listener, conn, peer_addr, local_addr)
    (EV_DATA, conn, data)
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
from typing import Any, Final

MARSHAL_VERSION: Final = 2
LENGTH: Final = struct.Struct("<I")
MAX_FRAME: Final = 64 * 1024 * 1024

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
# The most input a single event hands the guest for one socket.
RECV_CHUNK: Final = 64 * 1024


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


def frame_length(header: bytes | bytearray | memoryview) -> int:
    """Read a frame's length prefix; raise ProtocolError past MAX_FRAME."""
    (length,) = LENGTH.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes is larger than the limit {MAX_FRAME}")
    return int(length)
