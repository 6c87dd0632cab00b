"""Length-prefixed frames over a byte stream, sans I/O.

Every framed connection of ftproxy (the log channel, the arbiter's) uses the
same framing: a 4-byte little-endian length, then the body. A frame longer
than the limit is refused as soon as its length arrives, before its body is
buffered.
"""

from __future__ import annotations

import struct
from typing import Final

LENGTH: Final = struct.Struct("<I")


class FrameError(Exception):
    """The byte stream is not a sequence of acceptable frames."""


def frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


class FrameBuffer:
    """Collects received bytes and hands out whole frame bodies."""

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self.eof = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as frames."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means the peer closed its end."""
        if data:
            self._buffer += data
        else:
            self.eof = True

    def next_frame(self) -> bytes | None:
        """The next whole frame body, or None until more bytes arrive (or ever, after EOF)."""
        buffer = self._buffer
        if len(buffer) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(buffer)
            if length > self.max_frame_size:
                raise FrameError(
                    f"frame of {length} bytes is larger than the limit of {self.max_frame_size}"
                )
            end = LENGTH.size + length
            if len(buffer) >= end:
                body = bytes(buffer[LENGTH.size : end])
                del buffer[:end]
                return body
        if self.eof and buffer:
            raise FrameError(f"the peer closed the connection inside a frame ({len(buffer)} bytes)")
        return None
