"""Starting the demo's processes (the replicas, the lab's arbiter), watching, stopping them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ftproxy.shell.fence import children
from ftproxy.tools.demo._config import (
    ADMIN_TIMEOUT_S,
    KV_SCRIPT,
    READY_MARKER,
    RECEIVE_SIZE,
    REFRESH_S,
    STDERR_TAIL_LINES,
    STOP_TIMEOUT_S,
    DemoError,
)
from ftproxy.tools.procs import FTPROXY_COMMAND, free_port, is_guest, summarize_stderr
from ftproxy.tools.status import AdminUnavailable, fetch_status

# --- The replicas ---------------------------------------------------------------------


@dataclass
class Replica:
    """A primary or backup process, its guest, and what its admin endpoint last said
    (``--packet`` runs its arbiter process as one too, with no guest and no admin)."""

    name: str
    process: trio.Process
    admin: str
    stderr_path: Path
    ready: trio.Event = field(default_factory=trio.Event)
    guest_pids: list[int] = field(default_factory=list)
    status: dict[str, Any] | None = None
    unreachable: str = ""
    exit_expected: bool = False
    fate: str = "killed"  # what the demo did to it, once ``exit_expected``

    async def watch_stdout(self) -> None:
        """Read the replica's stdout (its guest's too) to the end: set ``ready`` at the
        guest's listening line, and fail the demo if the replica ends unexpectedly."""
        assert self.process.stdout is not None
        pending = b""
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            while data := await self.process.stdout.receive_some(RECEIVE_SIZE):
                pending += data
                *lines, pending = pending.split(b"\n")
                if not self.ready.is_set() and any(READY_MARKER.encode() in x for x in lines):
                    self.guest_pids = await trio.to_thread.run_sync(children, self.process.pid)
                    self.ready.set()
        code = await self.process.wait()
        if not self.exit_expected:
            raise DemoError(f"the {self.name} exited (code {code}){await self.stderr_tail()}")

    async def poll_status(self) -> None:
        """Fetch the replica's status about five times a second, for the live view."""
        while True:
            try:
                self.status = await fetch_status(self.admin, timeout=ADMIN_TIMEOUT_S)
                self.unreachable = ""
            except AdminUnavailable as exc:
                self.status, self.unreachable = None, exc.reason
            await trio.sleep(REFRESH_S)

    async def kill(self) -> None:
        """SIGKILL the supervisor, then its guest. In this order: a supervisor that
        outlived its guest, even briefly, would see the guest fail and stop in order,
        which is not the crash the demo is about."""
        self.exit_expected = True
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        for pid in self.guest_pids:
            if is_guest(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    async def stop(self) -> None:
        """Kill the replica and its guest and reap the replica; safe to call twice."""
        if not self.exit_expected:
            self.fate = "stopped"
        await self.kill()
        with trio.move_on_after(STOP_TIMEOUT_S):
            await self.process.wait()

    async def stderr_tail(self) -> str:
        """The last lines the replica logged, for an error message."""
        try:
            text = await trio.Path(self.stderr_path).read_text(errors="replace")
        except OSError:
            return ""
        tail = summarize_stderr(text, STDERR_TAIL_LINES)
        return "; its stderr ends with: " + " / ".join(tail) if tail else "; no stderr"


@dataclass(frozen=True)
class Launch:
    """How to start one replica: its role's arguments, its admin endpoint, where."""

    name: str
    role_args: list[str]
    admin: str
    netns: str | None = None  # a lab host's network namespace (``--packet``)


def in_netns(netns: str | None, command: Sequence[str]) -> list[str]:
    """``command``, run inside the network namespace ``netns`` if there is one
    (``ip netns exec`` execs in place: the process's pid is the command's own)."""
    return ["ip", "netns", "exec", netns, *command] if netns else list(command)


async def start_replica(
    launch: Launch,
    service_port: int,
    workdir: Path,
    auth: Sequence[str],
    guest: Path = KV_SCRIPT,
) -> Replica:
    """Start ``ftproxy ROLE`` for kv.py (``auth``: ``--insecure`` or ``--secret-file F``)."""
    command = [
        *FTPROXY_COMMAND,
        *launch.role_args,
        "--admin",
        launch.admin,
        *auth,
        "--",
        str(guest),
        "--port",
        str(service_port),
    ]
    return await start_process(launch.name, in_netns(launch.netns, command), launch.admin, workdir)


async def start_process(name: str, command: list[str], admin: str, workdir: Path) -> Replica:
    """Start ``command``, stdout piped, stderr in a file of the workdir.

    Its own session keeps a Ctrl-C at the terminal for the demo, which then stops it.
    """
    stderr_path = workdir / f"{name}.stderr"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=workdir,
            start_new_session=True,
        )
    return Replica(name, process, admin, stderr_path)


@dataclass(frozen=True)
class Ports:
    """The pair's ports on HOST: the service, the log channel, the admin endpoints."""

    service: int
    log: int
    primary_admin: int
    backup_admin: int
    arbiter: str  # the --arbiter address: the embedded arbiter's HOST:PORT, or etcd://...
    backup_log: int = 0  # --rounds: where the backup takes the next backup once live


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on HOST (the harness's picks: never twice a run)."""
    return [free_port() for _ in range(count)]
