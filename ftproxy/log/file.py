"""Log files: a magic line with the format version, then length-prefixed records
(the frames of ``ftproxy.core.framing``, the log channel's own).

A recorder killed mid-write leaves a partial last record; readers report it as
a truncated tail (the complete records before it are still good) rather than as
corruption. Anything else that does not decode is a LogFormatError that says
where.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from ftproxy.core.framing import LENGTH, frame
from ftproxy.core.records import (
    FORMAT_VERSION,
    Entry,
    Header,
    Output,
    Record,
    WireError,
    decode_record,
    encode_record,
)

MAGIC: Final = b"FTLOG\x00"
_VERSION: Final = struct.Struct("<H")
_LENGTH: Final = LENGTH
MAX_RECORD: Final = 64 * 1024 * 1024


class LogFormatError(Exception):
    """A log file that cannot be read; the message says which file and where."""


class LogVersionError(LogFormatError):
    """A log written in a format version this ftproxy does not read."""


class LogWriter:
    """Appends records to a log file; buffered, flushed by ``flush`` and ``close``."""

    def __init__(self, path: str | os.PathLike[str], header: Header) -> None:
        self.path = Path(path)
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._buffer = bytearray(MAGIC + _VERSION.pack(FORMAT_VERSION))
        self.bytes_written = 0
        self.append(header)

    def append(self, record: Record) -> None:
        self._buffer += frame(encode_record(record))

    def flush(self) -> None:
        if self._buffer:
            self._file.write(self._buffer)
            self.bytes_written += len(self._buffer)
            self._buffer.clear()
        self._file.flush()

    def abandon(self) -> None:
        """Close without writing what is buffered (a write already failed)."""
        self._buffer.clear()
        with contextlib.suppress(OSError):
            self._file.close()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            os.fsync(self._file.fileno())
            self._file.close()


@dataclass
class LogContents:
    """A whole log read into memory."""

    header: Header
    records: list[Record]
    truncated_at: int | None = None  # byte offset of an incomplete last record
    entries: int = field(init=False)

    def __post_init__(self) -> None:
        self.entries = sum(1 for r in self.records if isinstance(r, Entry))

    def outputs(self) -> Iterator[Output]:
        return (r for r in self.records if isinstance(r, Output))


def encoded_size(contents: LogContents) -> int:
    """Bytes the complete records take in a log file (a truncated tail not counted)."""
    records: list[Record] = [contents.header, *contents.records]
    return (
        len(MAGIC)
        + _VERSION.size
        + sum(_LENGTH.size + len(encode_record(record)) for record in records)
    )


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, Record]]:
    """Yield ``(offset, record)`` for each complete record, header first.

    A partial last record ends the iteration by raising ``LogTruncated``.
    """
    name = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LogFormatError(f"{name}: cannot read the log: {exc.strerror}") from None
    prefix = len(MAGIC) + _VERSION.size
    if len(data) < prefix or not data.startswith(MAGIC):
        raise LogFormatError(f"{name}: not an ftproxy log (no FTLOG magic at the start)")
    (version,) = _VERSION.unpack_from(data, len(MAGIC))
    if version != FORMAT_VERSION:
        newer = "a newer" if version > FORMAT_VERSION else "an older"
        raise LogVersionError(
            f"{name}: log format version {version} was written by {newer} ftproxy; "
            f"this one reads version {FORMAT_VERSION} only (replies changed meaning between "
            "versions): replay or show it with the ftproxy that recorded it"
        )
    view = memoryview(data)
    offset = prefix
    index = 0
    while offset < len(data):
        if offset + _LENGTH.size > len(data):
            raise LogTruncated(name, offset)
        (length,) = _LENGTH.unpack_from(data, offset)
        if length > MAX_RECORD:
            raise LogFormatError(
                f"{name}: record {index} at byte {offset} claims {length} bytes, "
                f"more than the limit {MAX_RECORD}: the file is corrupt"
            )
        end = offset + _LENGTH.size + length
        if end > len(data):
            raise LogTruncated(name, offset)
        try:
            record = decode_record(view[offset + _LENGTH.size : end])
        except WireError as exc:
            raise LogFormatError(
                f"{name}: record {index} at byte {offset} does not decode: {exc}"
            ) from None
        if (index == 0) != isinstance(record, Header):
            what = "does not start with a header" if index == 0 else "has a second header"
            raise LogFormatError(f"{name}: the log {what} (record {index}, byte {offset})")
        yield offset, record
        offset = end
        index += 1
    if index == 0:
        raise LogFormatError(f"{name}: the log has no header")


class LogTruncated(LogFormatError):
    """The log ends inside a record: the recorder stopped mid-write."""

    def __init__(self, name: str, offset: int) -> None:
        super().__init__(
            f"{name}: the last record, at byte {offset}, is incomplete "
            "(the recorder was probably killed while writing it)"
        )
        self.offset = offset


def read_log(path: str | os.PathLike[str]) -> LogContents:
    """Read a whole log. A truncated tail is tolerated and reported in ``truncated_at``."""
    records: list[Record] = []
    truncated_at: int | None = None
    try:
        for _, record in iter_records(path):
            records.append(record)
    except LogTruncated as exc:
        if not records:
            raise LogFormatError(f"{os.fspath(path)}: the log has no complete header") from None
        truncated_at = exc.offset
    header = records[0]
    assert isinstance(header, Header)
    return LogContents(header=header, records=records[1:], truncated_at=truncated_at)
