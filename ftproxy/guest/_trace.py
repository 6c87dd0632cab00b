"""Per-request time stamps for the benchmark's critical-path breakdown.

``python -m bench breakdown`` starts the supervisors with ``FTPROXY_TRACE_DIR``
set; each process that calls ``enable`` then stamps a request at each stage of
its path with ``stamp(stage, seq)``: the stage, the log seq where known (-1
where not), and CLOCK_MONOTONIC in ns, which all processes on one host share.
Stamps go to a file-backed shared mapping of the process's own
(``ROLE-PID.trace`` in that directory), so they survive a SIGKILL and cost no
write at exit. Off (the variable unset when the process starts), ``stamp`` is
None and a call site costs one test: ``if _trace.stamp is not None: ...``.

It lives in the guest package because the guest runtime stamps too, and must
import little; the guest's variable is taken out of its environment before
the program runs.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Callable
from typing import Final

ENV: Final = "FTPROXY_TRACE_DIR"

# Stages, in the order a request meets them (see bench/breakdown.py for the path).
CLIENT_SENT: Final = 0  # the bench's client wrote the request
SUP_WOKE: Final = 1  # the supervisor woke up because client input is readable
SUP_READ: Final = 2  # the supervisor read the client's bytes (recv)
REPLY_WRITTEN: Final = 3  # the exit's reply, carrying them, is written to the guest pipe
GUEST_WOKE: Final = 4  # the guest read that reply
GUEST_WROTE: Final = 5  # the guest wrote its next frame (its outputs, then an exit)
OUTPUT_TAKEN: Final = 6  # the supervisor took an output of the guest's from the pipe
SHIP_STARTED: Final = 7  # the primary began sending a batch of entries
ENTRY_SHIPPED: Final = 8  # ... and the kernel took it
BACKUP_RECEIVED: Final = 9  # the backup decoded the batch
ACK_SENT: Final = 10  # the backup's ack for it went to the kernel
ACK_RECEIVED: Final = 11  # the primary decoded the ack
OUTPUT_RELEASED: Final = 12  # the primary let an output go (the output rule, or none)
CLIENT_WRITE: Final = 13  # the supervisor writes a reply to the client's socket
# (Stamps that start a hop are taken just before the system call that makes it,
# so that the process woken cannot stamp first.)
CLIENT_GOT: Final = 14  # the bench's client read the whole reply

STAGE_NAMES: Final = (
    "client_sent",
    "sup_woke",
    "sup_read",
    "reply_written",
    "guest_woke",
    "guest_wrote",
    "output_taken",
    "ship_started",
    "entry_shipped",
    "backup_received",
    "ack_sent",
    "ack_received",
    "output_released",
    "client_write",
    "client_got",
)

RECORD: Final = struct.Struct("<qqq")  # stage, seq, ns
COUNT: Final = struct.Struct("<q")
CAPACITY: Final = 1 << 20  # records per process (24 MiB of file)
# One byte in the trace directory, mapped by every process that stamps into it:
# non-zero, nobody stamps. The bench sets it around loads it does not trace
# (redis-benchmark's), which would otherwise fill the files before its own rounds.
PAUSE_FILE: Final = "paused"

stamp: Callable[[int, int], None] | None = None
_now = time.monotonic_ns  # taken before the guest's devices replace time.*


def enable(role: str) -> bool:
    """Start stamping if ``FTPROXY_TRACE_DIR`` is set; called once, at the process's start."""
    global stamp
    directory = os.environ.pop(ENV, None) if role == "guest" else os.environ.get(ENV)
    if not directory or stamp is not None:
        return False
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{role}-{os.getppid()}-{os.getpid()}.trace")
    size = COUNT.size + CAPACITY * RECORD.size
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        area = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    paused = _pause_flag(directory)
    pack_record = RECORD.pack_into
    pack_count = COUNT.pack_into
    now = _now
    count = 0

    def stamp_here(stage: int, seq: int = -1) -> None:
        nonlocal count
        if count < CAPACITY and not paused[0]:
            pack_record(area, COUNT.size + count * RECORD.size, stage, seq, now())
            count += 1
            pack_count(area, 0, count)

    stamp = stamp_here
    return True


def pause(directory: str, paused: bool) -> None:
    """Stop (``paused``) or resume the stamping of every process tracing into ``directory``."""
    flag = _pause_flag(directory)
    flag[0] = 1 if paused else 0
    flag.close()


def _pause_flag(directory: str) -> mmap.mmap:
    fd = os.open(os.path.join(directory, PAUSE_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size < 1:
            os.ftruncate(fd, 1)  # zero: stamping
        return mmap.mmap(fd, 1)
    finally:
        os.close(fd)


def directory() -> str | None:
    """Where stamps go, for a supervisor to pass on to its guest (None: tracing is off)."""
    return os.environ.get(ENV) if stamp is not None else None


def read(path: str) -> list[tuple[int, int, int]]:
    """The (stage, seq, ns) records of one trace file."""
    with open(path, "rb") as file:
        data = file.read()
    (count,) = COUNT.unpack_from(data, 0)
    return list(RECORD.iter_unpack(data[COUNT.size : COUNT.size + count * RECORD.size]))
