"""Starting the configurations under test: kv.py bare, and kv.py under ftproxy record."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "examples" / "kv.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_line(process: subprocess.Popen[str], marker: str, timeout: float = 30.0) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
        if ready:
            line = process.stdout.readline()
            if not line:
                break
            if marker in line:
                return
    raise RuntimeError(f"{process.args!r} did not print {marker!r} within {timeout}s")


@dataclass
class Service:
    """A running configuration: where clients connect, and its processes."""

    name: str
    port: int
    process: subprocess.Popen[str]
    log_path: Path | None = None

    def cpu_seconds(self) -> float:
        """User+system CPU of the service's process tree so far (Linux /proc)."""
        return _tree_cpu(self.process.pid)


def _tree_cpu(pid: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        pending.extend(int(c) for c in children)
    return total


@contextlib.contextmanager
def bare_kv() -> Iterator[Service]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(KV), "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_line(process, "listening")
        yield Service("bare", port, process)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


@contextlib.contextmanager
def recorded_kv() -> Iterator[Service]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "kv.ftlog"
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ftproxy.cli",
                "--log-format",
                "json",
                "record",
                "--log",
                str(log_path),
                "--",
                str(KV),
                "--port",
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            _wait_for_line(process, "listening")
            yield Service("record", port, process, log_path)
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
