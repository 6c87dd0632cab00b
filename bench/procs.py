"""Child processes of the benchmark: start, wait for readiness, CPU time, stop.

Every process gets a session (process group) of its own, so that stopping it
also stops what it started (an ftproxy supervisor's guest). Output goes to
files in a scratch directory, never to pipes nobody drains.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "examples" / "kv.py"
FTPROXY = [sys.executable, "-m", "ftproxy.cli", "--log-format", "json"]
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def free_port_block(count: int) -> int:
    """A port B such that B .. B+count-1 were all free, below the ephemeral range.

    (pyraft serves clients on P and Raft on P+1: adjacent ports that an
    ephemeral pick elsewhere must not take.)
    """
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
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
