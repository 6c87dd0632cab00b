"""Running ftproxy as a user does, in real processes, for the tests."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ftproxy.core.records import Output
from ftproxy.log.file import read_log
from ftproxy.shell.replay import ReplayResult, replay

# The one free-port helper of tests/, bench/ and the demo: below the kernel's ephemeral
# range and never the same port twice in a run, so that no bind(0) or outgoing connection
# (another test's, another helper's) takes it between our pick and the process's bind.
from ftproxy.tools.procs import free_port as free_port
from ftproxy.tools.resp import ErrorReply, RespClient

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GUESTS = Path(__file__).resolve().parent / "guests"
FTPROXY = [sys.executable, "-m", "ftproxy.cli", "--log-format", "json"]


def _netns_usable() -> bool:
    if shutil.which("ip") is None:
        return False
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, check=False)
    return done.returncode == 0


# Tests that build a lab of network namespaces (each with a prefix of its own).
needs_lab = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces)"),
    pytest.mark.skipif(not _netns_usable(), reason="`ip netns` is unavailable"),
]
needs_nft = pytest.mark.skipif(shutil.which("nft") is None, reason="partitions need nft")


def read_line_until(stream, marker: str, timeout: float = 20.0) -> list[str]:
    """Read lines from ``stream`` until one contains ``marker``; fail past ``timeout``."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no line with {marker!r} within {timeout}s; got {lines}")
        ready, _, _ = select.select([stream], [], [], remaining)
        if not ready:
            continue
        line = stream.readline()
        if not line:
            raise AssertionError(f"stream closed before {marker!r}; got {lines}")
        lines.append(line)
        if marker in line:
            return lines


class Recording:
    """``ftproxy record`` of a guest, started and stopped the way a user would."""

    def __init__(
        self,
        log: Path,
        script: Path | str,
        *args: str,
        ready_marker: str = "listening",
        record_args: tuple[str, ...] = (),
        cwd: Path = ROOT,
    ) -> None:
        self.log = log
        self.cwd = cwd
        self.command = [
            *FTPROXY,
            "record",
            "--log",
            str(log),
            *record_args,
            "--",
            str(script),
            *args,
        ]
        self.ready_marker = ready_marker
        self.process: subprocess.Popen[str] | None = None
        self.stdout_lines: list[str] = []
        self.stderr = ""

    def __enter__(self) -> Recording:
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.cwd,
        )
        if self.ready_marker:
            assert self.process.stdout is not None
            self.stdout_lines = read_line_until(self.process.stdout, self.ready_marker)
        return self

    def stop(self, signum: int | None = signal.SIGINT, timeout: float = 20.0) -> int:
        """Signal the recorder as Ctrl-C would (None: let it end); return its exit code."""
        assert self.process is not None
        if signum is not None and self.process.poll() is None:
            self.process.send_signal(signum)
        out, err = self.process.communicate(timeout=timeout)
        self.stdout_lines += out.splitlines(keepends=True)
        self.stderr = err
        return self.process.returncode

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def replay_log(path: Path) -> ReplayResult:
    """Replay in-process and check the counts against the log itself."""
    contents = read_log(path)
    result = trio.run(lambda: replay(contents, stdout=subprocess.DEVNULL))
    outputs = [r for r in contents.records if isinstance(r, Output)]
    assert result.entries == contents.entries
    assert result.outputs == len(outputs)
    assert result.output_bytes == sum(len(o.data) for o in outputs)
    return result


def run_ftproxy(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FTPROXY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ},
    )


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}; got {data!r}")
        data += chunk
        assert len(data) < limit
    return data


class Resp(RespClient):
    """The project's RESP client, replies checked exactly: an error reply comes back
    as a RuntimeError value instead of being raised."""

    def __init__(self, port: int) -> None:
        super().__init__(port, timeout=10.0)

    def command(self, *parts: str | bytes) -> object:
        self.send(parts)
        return self.read()

    def read(self) -> object:
        reply = self.read_reply()
        return RuntimeError(reply.message) if isinstance(reply, ErrorReply) else reply


def signal_name(code: int) -> str:
    return signal.Signals(-code).name if code < 0 else str(code)


def metric_samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, for every sample of every family."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
