"""Running ftproxy as a user does, in real processes, for the tests."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ftproxy.core.records import Output
from ftproxy.log.file import read_log
from ftproxy.shell.replay import ReplayResult, replay
from ftproxy.tools.procs import Proc

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


_RECORDINGS = itertools.count(1)


class Recording:
    """``ftproxy record`` of a guest, started and stopped the way a user would
    (ftproxy.tools.procs' harness: its stdout and stderr in files under ``log``'s folder)."""

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
        self.process: Proc | None = None

    def __enter__(self) -> Recording:
        # Its stdout and stderr beside the log, named apart from any other recording's.
        name = f"{self.log.name}.record-{next(_RECORDINGS)}"
        self.process = Proc(name, self.command, self.log.parent, cwd=self.cwd, pipes=True)
        if self.ready_marker:
            self.process.wait_for_output(self.ready_marker, timeout=20.0)
        return self

    @property
    def stdout_lines(self) -> list[str]:
        """What the recorder (and its guest) printed so far, line by line, newlines kept."""
        return self.process.stdout().splitlines(keepends=True) if self.process else []

    @property
    def stderr(self) -> str:
        """What the recorder logged so far."""
        return self.process.stderr() if self.process else ""

    def stop(self, signum: int | None = signal.SIGINT, timeout: float = 20.0) -> int:
        """Signal the recorder as Ctrl-C would (None: let it end); return its exit code
        once its output is complete (its guest's last words included)."""
        assert self.process is not None
        if signum is not None:
            self.process.signal(signum)
        code = self.process.wait(timeout)
        self.process.wait_output(timeout)
        return code

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None:
            self.process.stop()  # the recorder and anything of its left running


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
