"""The arbiter's durable state: which candidate won which key.

One append-only file, ``decisions.log``, in the data directory: a magic string
and a format version, then one record per decision, each a 4-byte length, a
CRC-32 of the body and a msgpack body ``[key, winner, decided_ns]``. A decision
is written and fsynced before :meth:`Store.decide` returns, so before any
reply announces it; records are never rewritten, so a decision can only be
lost with the disk.

An incomplete last record is what a crash in the middle of an append leaves;
that append was never acknowledged, so opening the store drops it (and says
so). Anything else that does not read back is corruption: opening fails with a
:class:`StoreCorruptError` naming the file and offset, and the arbiter does not
start. An exclusive lock on the file keeps two arbiters off one directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
import zlib
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import msgspec
import structlog

__all__ = ["FILE_NAME", "Store", "StoreCorruptError", "StoreError"]

FILE_NAME: Final = "decisions.log"
FORMAT_VERSION: Final = 1
MAGIC: Final = b"FTARBITER\x00"
_VERSION: Final = struct.Struct("<H")
_RECORD_HEADER: Final = struct.Struct("<II")  # body length, CRC-32 of the body
_HEADER_SIZE: Final = len(MAGIC) + _VERSION.size
MAX_RECORD: Final = 64 * 1024

logger = structlog.get_logger()


class StoreError(Exception):
    """The store cannot be opened or written; the message says which file and why."""


class StoreCorruptError(StoreError):
    """The store's file holds something other than decisions."""


class _Record(msgspec.Struct, array_like=True, frozen=True):
    key: str
    winner: str
    decided_ns: int


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(_Record)


class Store:
    """A durable key -> winner map with test-and-set; open it with :meth:`open`."""

    def __init__(self, path: Path, fd: int, decisions: dict[str, str], size: int) -> None:
        # Use Store.open(); this only assembles an opened store.
        self.path: Final = path
        self._fd: int | None = fd
        self._decisions = decisions
        self._size = size
        self._failed: str | None = None

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str]) -> Self:
        """Open (creating when needed) the store in ``data_dir`` and load every decision."""
        directory = Path(data_dir)
        path = directory / FILE_NAME
        try:
            created_dir = _make_directory(directory)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"{path}: cannot open the arbiter's store: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"{path}: another arbiter is using this data directory") from None
            decisions, size = _load(path, fd)
            if created_dir:
                _fsync_directory(directory.parent)
            return cls(path, fd, decisions, size)
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"{path}: cannot load the arbiter's store: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise

    def get(self, key: str) -> str | None:
        """Return ``key``'s winner, or None when undecided."""
        return self._decisions.get(key)

    def decide(self, key: str, candidate: str) -> tuple[str, bool]:
        """Test-and-set: make ``candidate`` the winner of ``key`` unless it has one.

        Return ``(winner, won)``. A new decision is on disk (fsynced) when this
        returns. After a failed write the store refuses every later decision:
        what reached the disk is unknown until it is opened again.
        """
        winner = self._decisions.get(key)
        if winner is not None:
            return winner, winner == candidate
        if self._failed is not None:
            raise StoreError(f"{self.path}: the store failed earlier ({self._failed})")
        if self._fd is None:
            raise StoreError(f"{self.path}: the store is closed")
        body = _encoder.encode(_Record(key, candidate, time.time_ns()))
        record = _RECORD_HEADER.pack(len(body), zlib.crc32(body)) + body
        try:
            _write_all(self._fd, record, self._size)
            os.fsync(self._fd)
        except OSError as exc:
            self._failed = exc.strerror or str(exc)
            raise StoreError(f"{self.path}: cannot record a decision: {self._failed}") from None
        self._size += len(record)
        self._decisions[key] = candidate
        return candidate, True

    def __len__(self) -> int:
        return len(self._decisions)

    def items(self) -> list[tuple[str, str]]:
        """Every decision as ``(key, winner)``, in the order they were made."""
        return list(self._decisions.items())

    def close(self) -> None:
        """Release the file (and its lock); idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _make_directory(directory: Path) -> bool:
    """Create ``directory`` if missing; return whether it was created."""
    try:
        directory.mkdir(parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(directory)) from None
        return False
    return True


def _load(path: Path, fd: int) -> tuple[dict[str, str], int]:
    """Read the store's file; return the decisions and the size of its good part."""
    data = _read_all(fd)
    if len(data) < _HEADER_SIZE:
        if not (MAGIC + _VERSION.pack(FORMAT_VERSION)).startswith(data):
            raise StoreCorruptError(f"{path}: not an arbiter store (no FTARBITER magic)")
        # New, or a crash while it was being created: (re)write the header.
        header = MAGIC + _VERSION.pack(FORMAT_VERSION)
        os.ftruncate(fd, 0)
        _write_all(fd, header, 0)
        os.fsync(fd)
        _fsync_directory(path.parent)
        return {}, len(header)
    if not data.startswith(MAGIC):
        raise StoreCorruptError(f"{path}: not an arbiter store (no FTARBITER magic)")
    (version,) = _VERSION.unpack_from(data, len(MAGIC))
    if version != FORMAT_VERSION:
        raise StoreCorruptError(
            f"{path}: store format version {version}; this arbiter reads version {FORMAT_VERSION}"
        )
    decisions: dict[str, str] = {}
    offset = _HEADER_SIZE
    view = memoryview(data)
    while offset < len(data):
        end = offset + _RECORD_HEADER.size
        if end <= len(data):
            length, crc = _RECORD_HEADER.unpack_from(data, offset)
            if length > MAX_RECORD:
                raise StoreCorruptError(
                    f"{path}: record at byte {offset} claims {length} bytes, "
                    f"more than the limit {MAX_RECORD}: the store is corrupt"
                )
            end += length
        if end > len(data):
            # An append cut short by a crash: it was never acknowledged.
            logger.warning(
                "store_tail_dropped", path=str(path), offset=offset, size=len(data) - offset
            )
            os.ftruncate(fd, offset)
            os.fsync(fd)
            return decisions, offset
        body = view[offset + _RECORD_HEADER.size : end]
        if zlib.crc32(body) != crc:
            raise StoreCorruptError(
                f"{path}: record at byte {offset} fails its checksum: the store is corrupt"
            )
        try:
            record = _decoder.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise StoreCorruptError(
                f"{path}: record at byte {offset} does not decode ({exc}): the store is corrupt"
            ) from None
        previous = decisions.setdefault(record.key, record.winner)
        if previous != record.winner:
            raise StoreCorruptError(
                f"{path}: key {record.key!r} is decided twice ({previous!r}, then "
                f"{record.winner!r} at byte {offset}): the store is corrupt"
            )
        offset = end
    return decisions, offset


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
