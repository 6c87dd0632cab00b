"""Log records and their encoding (msgspec msgpack), versioned.

A log is a header followed by entries (the guest's non-deterministic inputs,
one per exit), outputs (what the guest emitted, tagged with the seq of the last
entry it had consumed) and, when the guest ended while recorded, an end record.

An entry stores the reply exactly as the guest received it (a marshal body of
the guest pipe, see ``ftproxy.guest.protocol``): replay hands the same bytes to
the replaying guest, so the two executions consume identical inputs.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

# 2: replies carry clock deltas and pack stream input apart (``ftproxy.guest.protocol``);
# a version 1 log's replies would mean something else to today's guest.
FORMAT_VERSION: Final = 2


class Policy(msgspec.Struct, array_like=True, frozen=True):
    """Settings the guest's execution depends on; pinned so replay matches."""

    exit_every: int
    clock_step_ns: int


class Network(msgspec.Struct, array_like=True, frozen=True):
    """Packet mode: the address the guest's own TCP/IP stack serves."""

    mac: bytes
    ip: str
    prefix_len: int
    gateway: str | None = None

    def boot_value(self) -> tuple[bytes, str, int, str | None]:
        """The form the guest's boot reply carries (see ``ftproxy.guest.protocol``)."""
        return (self.mac, self.ip, self.prefix_len, self.gateway)


class Header(msgspec.Struct, tag=0, array_like=True, frozen=True):
    """What a replica needs to start a guest that executes like the recorded one.

    ``network`` is None in socket mode; in packet mode the guest's stack is
    part of its execution, so its address is pinned here like the policy. So
    are the digests of the program's files, which each replica reads from its
    own disk.
    """

    version: int
    argv: list[str]
    env: dict[str, str]
    cwd: str
    python: str
    policy: Policy
    created_ns: int
    network: Network | None = None
    # The files the guest runs at start, {path: sha256 hex} (``ftproxy.shell.startfiles``).
    files: dict[str, str] = msgspec.field(default_factory=dict)


class Entry(msgspec.Struct, tag=1, array_like=True, frozen=True):
    """One exit of the guest: where it happened and what the guest was given."""

    seq: int
    icount: int
    kind: int
    digest: int
    reply: bytes


class Output(msgspec.Struct, tag=2, array_like=True, frozen=True):
    """One output of the guest, after the entry ``seq`` (0: before any entry)."""

    seq: int
    op: int
    sock: int
    data: bytes
    extra: Any = None


class End(msgspec.Struct, tag=3, array_like=True, frozen=True):
    """How the recording ended (absent when the recorder was killed)."""

    reason: str
    returncode: int | None


Record = Header | Entry | Output | End

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Record)


class WireError(Exception):
    """Bytes that should hold a record do not."""


def encode_record(record: Record) -> bytes:
    """Encode one record (no framing)."""
    return _encoder.encode(record)


def decode_record(body: bytes | memoryview) -> Record:
    """Decode one record; raise WireError when the bytes are not one."""
    try:
        record: Record = _decoder.decode(body)
        return record
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec reports a string that is not UTF-8 as UnicodeDecodeError.
        raise WireError(str(exc)) from None
