"""The log a replica holds since its guest booted: in memory, and on disk in its data dir.

With no checkpoint, the log is the guest's state: a live replica streams it,
from the first entry, to a new backup (``ftproxy.shell.reprotect``). Every replica
keeps the entries it logged or received in memory for that, and, given
``--data-dir``, writes them with the guest's outputs in the log file format
(``ftproxy.log.file``), so ``ftproxy log show`` and ``ftproxy replay`` read it.

A data dir belongs to one pair: a marker file names it, and a dir that names
another pair is refused. A failed write (a full disk) is reported once; the
replica goes on serving from memory and its status says the log is not safe
on disk (``protected: false``).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from ftproxy.core.records import Entry, Header, Output, Record
from ftproxy.log.file import LogWriter

log = structlog.get_logger()

LOG_NAME: Final = "log.ftlog"
PREVIOUS_LOG_NAME: Final = "previous.ftlog"
PAIR_MARKER: Final = "pair"
FLUSH_BYTES: Final = 64 * 1024
FLUSH_INTERVAL_S: Final = 0.05


class DataDirError(Exception):
    """A data dir this replica cannot use; the message says which and why."""


class LogStoreError(Exception):
    """The caller appended out of order (a bug, not the disk's fault)."""


def open_data_dir(data_dir: Path | None, pair: str) -> Path | None:
    """Claim ``data_dir`` for ``pair`` and return the log's path in it (None: no data dir).

    The log of an earlier run of the same pair is kept as ``previous.ftlog``
    (its guest is gone; the new guest's log starts from boot).
    """
    if data_dir is None:
        return None
    marker = data_dir / PAIR_MARKER
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if marker.exists():
            owner = marker.read_text().strip()
            if owner != pair:
                raise DataDirError(
                    f"{data_dir} holds the log of pair {owner!r}, not {pair!r}: give each "
                    f"pair its own --data-dir (or remove {data_dir} if pair {owner!r} is gone)"
                )
        else:
            marker.write_text(pair + "\n")
        path = data_dir / LOG_NAME
        if path.exists():
            path.replace(data_dir / PREVIOUS_LOG_NAME)
    except OSError as exc:
        raise DataDirError(f"cannot use {data_dir} as the data dir: {exc.strerror}") from None
    return path


class LogStore:
    """Every entry since boot, in seq order, plus (on disk) the outputs between them."""

    def __init__(self, header: Header, path: Path | None = None) -> None:
        self.header = header
        self.entries: list[Entry] = []
        self.bytes = 0
        self.path = path
        self.error: str | None = None
        self._writer: LogWriter | None = None
        self._pending = 0
        self._flushed_at = time.monotonic()
        if path is not None:
            try:
                self._writer = LogWriter(path, header)
            except OSError as exc:
                raise DataDirError(f"cannot write the log {path}: {exc.strerror}") from None

    @property
    def last_seq(self) -> int:
        return len(self.entries)

    def append_entry(self, entry: Entry) -> None:
        if entry.seq != len(self.entries) + 1:
            raise LogStoreError(f"entry {entry.seq} appended after {len(self.entries)}")
        self.entries.append(entry)
        self.bytes += len(entry.reply)
        self._write(entry, len(entry.reply))

    def append_output(self, record: Output) -> None:
        self._write(record, len(record.data))

    def _write(self, record: Record, size: int) -> None:
        if self._writer is None:
            return
        self._writer.append(record)
        self._pending += size + 16
        if self._pending >= FLUSH_BYTES or time.monotonic() - self._flushed_at >= FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered; a failure stops the disk log (and says why, once)."""
        if self._writer is None or not self._pending:
            return
        try:
            self._writer.flush()
        except OSError as exc:
            self._fail(exc)
        self._pending = 0
        self._flushed_at = time.monotonic()

    def _fail(self, exc: OSError) -> None:
        full = " (the disk is full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        self.error = f"writing the log to {self.path} failed{full}: {exc.strerror}"
        log.error(
            "log_write_failed",
            path=str(self.path),
            error=exc.strerror,
            entries=len(self.entries),
            consequence="the replica keeps serving; its log on disk is incomplete, "
            "so it reports protected: false",
        )
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.abandon()

    async def flush_periodically(self) -> None:
        """Keep the file at most FLUSH_INTERVAL_S behind, also when the guest is idle."""
        while self._writer is not None:
            await trio.sleep(FLUSH_INTERVAL_S)
            self.flush()

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as exc:
                self._fail(exc)

    @property
    def on_disk(self) -> bool:
        """Whether the disk log is whole (no data dir counts as whole: nothing to fail)."""
        return self.error is None

    def status(self) -> dict[str, Any]:
        return {
            "path": os.fspath(self.path) if self.path is not None else None,
            "entries": len(self.entries),
            "bytes": self.bytes,
            "error": self.error,
        }
