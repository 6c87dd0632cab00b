"""Child processes of the benchmark: start, wait for readiness, CPU time, stop.

Every process gets a session (process group) of its own, so that stopping it
also stops what it started (an ftproxy supervisor's guest). Output goes to
files in a scratch directory, never to pipes nobody drains.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "examples" / "kv.py"
FTPROXY = [sys.executable, "-m", "ftproxy.cli", "--log-format", "json"]
HOST = "127.0.0.1"


_HANDED_OUT: set[int] = set()
_PICK_LOW = 20000


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for bind(0) and connect() (Linux)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a process to bind a moment later.

    Chosen below the kernel's ephemeral range, so that no bind(0) or outgoing
    connection elsewhere on the machine (redis-benchmark's clients, other
    tests) takes it in the meantime, and never the same one twice in this run,
    so that two of our services do not race for it either. Where a service can
    take port 0 and report it, that is better still (bench/services.py).
    """
    rng = random.Random()
    high = _ephemeral_low()
    for _ in range(500):
        port = rng.randrange(_PICK_LOW, high) if high > _PICK_LOW + 1000 else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def free_port_block(count: int) -> int:
    """A port B such that B .. B+count-1 were all free, below the ephemeral range.

    (pyraft serves clients on P and Raft on P+1: adjacent ports that an
    ephemeral pick elsewhere must not take.)
    """
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(_PICK_LOW, 32000 - count)
        if _HANDED_OUT & set(range(base, base + count)):
            continue
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind((HOST, port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        _HANDED_OUT.update(range(base, base + count))
        return base
    raise RuntimeError(f"no {count} adjacent free ports")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (OSError counts as not yet) until true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.02)


class Proc:
    """One child process, its stdout and stderr kept in files under ``scratch``."""

    def __init__(
        self,
        name: str,
        command: list[str],
        scratch: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.command = command
        self.stdout_path = scratch / f"{name}.stdout"
        self.stderr_path = scratch / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def wait_for_output(self, marker: str, timeout: float = 60.0) -> None:
        """Wait until the process printed ``marker`` on stdout."""

        def printed() -> bool:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode} before printing "
                    f"{marker!r}; stderr ends with:\n{self.stderr_tail()}"
                )
            return marker in self.stdout_path.read_text(errors="replace")

        try:
            wait_until(printed, timeout, f"{self.name} prints {marker!r}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; stderr ends with:\n{self.stderr_tail()}") from None

    def wait_for_event(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the process logged structlog ``event`` (JSON lines on stderr); return it.

        How a service started on port 0 tells which port it took.
        """
        found: dict[str, Any] = {}

        def logged() -> bool:
            exited = self.popen.poll()
            for line in self.stderr_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("event") == event:
                        found.update(record)
                        return True
            if exited is not None:
                raise RuntimeError(
                    f"{self.name} exited with {exited} before logging {event!r}; "
                    f"stderr ends with:\n{self.stderr_tail()}"
                )
            return False

        try:
            wait_until(logged, timeout, f"{self.name} logs {event!r}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; stderr ends with:\n{self.stderr_tail()}") from None
        return found

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def cpu_seconds(self) -> float:
        """User+system CPU of this process and its descendants still alive (Linux /proc)."""
        return tree_cpu(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL this process alone (not its group): what a crash looks like."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def pause(self) -> None:
        """SIGSTOP this process alone: silent, its sockets still open (a hung host)."""
        if self.alive():
            self.popen.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        """SIGKILL the whole process group, and reap the leader."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()


def tree_cpu(pid: int) -> float:
    """CPU seconds (user+system) of ``pid`` and its live descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(stat[11]) + int(stat[12])) / ticks
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text()
                pending.extend(int(c) for c in children.split())
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return total
