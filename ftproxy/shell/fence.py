"""Fencing an old primary on the same host, as STONITH fences a node.

A backup that won the arbiter may find the service address still held: the
old primary is not dead but stopped (SIGSTOP, a debugger, a swap storm), and
its frozen socket still takes clients that nobody will answer. On one host the
backup can make sure: the primary said who it is in its Welcome (the host's
identity, its supervisor's pid and that process's start time, so a recycled
pid is never mistaken for it), and the backup SIGKILLs that supervisor and its
children (the guest) before binding. Killing is safe only after winning the
arbiter: the old primary then can never release another output anyway.

``--fence none`` leaves the old primary alone: the backup keeps trying to bind
and reports the address as busy (``/status`` ``address_busy``) instead of
claiming to serve. Across two hosts nothing here can reach the old primary:
there, packet mode moves the virtual IP (gratuitous ARP), or the site's own
fencing (power, switch port) must act.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path
from typing import Final, Literal

import structlog

from ftproxy.core.channel import ProcessIdentity

__all__ = ["FENCE_MODES", "Fencer", "ProcessIdentity", "host_identity", "identify_self"]

FenceMode = Literal["kill", "none"]
FENCE_MODES: Final[tuple[FenceMode, ...]] = ("kill", "none")

log = structlog.get_logger()


def host_identity() -> str:
    """This boot of this host: the kernel's boot id and the hostname."""
    boot_id = "?"
    with contextlib.suppress(OSError):
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{boot_id}/{socket.gethostname()}"


def start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold anything.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def identify_self() -> ProcessIdentity:
    pid = os.getpid()
    return ProcessIdentity(host_identity(), pid, start_time(pid) or 0)


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (a supervisor's guest), from /proc.

    Every thread of ``pid`` is asked: trio starts processes from a worker thread,
    and /proc lists a child under the thread that forked it.
    """
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


class Fencer:
    """What a backup may do to the primary it replaced, once it won the arbiter."""

    def __init__(self, mode: FenceMode, target: ProcessIdentity | None) -> None:
        self.mode = mode
        self.target = target
        self.busy: set[str] = set()  # addresses that stay held (reported in /status)
        self.fenced = False

    def fence(self, address: str) -> str | None:
        """Make the old primary let go of ``address``; return what was done (None: nothing)."""
        target = self.target
        if self.mode == "none":
            return None
        if target is None:
            log.warning("fence_impossible", address=address, reason="the primary did not say who")
            return None
        if target.host != host_identity():
            log.warning(
                "fence_impossible",
                address=address,
                reason="the old primary runs on another host",
                hint="use packet mode (the virtual IP moves) or the site's own fencing",
            )
            return None
        if start_time(target.pid) != target.start_time:
            return None  # it is gone (its pid may be another process's now)
        victims = [*children(target.pid), target.pid]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.fenced = True
        log.warning("primary_fenced", address=address, pids=victims, signal="SIGKILL")
        return f"SIGKILLed {victims}"
