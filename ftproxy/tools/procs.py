"""Starting ftproxy's processes and watching them: the one harness of the demo, bench/
and tests/.

A :class:`Proc` runs in a session (process group) of its own, so that stopping it also
stops what it started in its group; its stdout and stderr go to files in a scratch
directory, never to pipes nobody drains (``pipes=True``: through pipes that threads
copy to those files, keeping each stdout line's arrival time, how a test measures a
stall, and telling when the output is complete). It can be started through a launcher
(``Lab.run``: inside a lab host's network namespace) and be fed on stdin. Readiness is
a line on stdout (:meth:`Proc.wait_for_output`), a structlog event on stderr
(:meth:`Proc.wait_for_event`), a port that accepts (:func:`wait_accepting`) or an admin
endpoint's ``GET /status`` (:func:`admin_status`). Ports come from :func:`free_port`; a
process's children from the fencer's /proc reader (``ftproxy.shell.fence.children``).
The demo runs its replicas as trio processes of its own, and shares the command, the
ports and the /proc readers here.
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
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final

from ftproxy.shell.fence import children

HOST: Final = "127.0.0.1"
# ``ftproxy`` as this interpreter runs it, logging JSON lines that the harness reads.
FTPROXY_COMMAND: Final = (sys.executable, "-m", "ftproxy.cli", "--log-format", "json")
POLL_S: Final = 0.02

# --- Ports ---------------------------------------------------------------------------

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


# --- Waiting -------------------------------------------------------------------------


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` (OSError counts as not yet) until true; TimeoutError after
    ``timeout`` seconds, naming ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g}s: {what}")
        time.sleep(POLL_S)


def wait_accepting(port: int, timeout: float, what: str, host: str = HOST) -> None:
    """Wait until ``host:port`` accepts a TCP connection (a process is listening)."""

    def accepts() -> bool:
        socket.create_connection((host, port), timeout=1).close()
        return True

    wait_until(accepts, timeout, what)


def admin_status(port: int, timeout: float = 5.0, host: str = HOST) -> dict[str, Any]:
    """A replica's ``GET /status`` (its admin endpoint on ``host:port``) as a mapping."""
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=timeout) as reply:
        return dict(json.loads(reply.read()))


# --- Processes -----------------------------------------------------------------------


# How a Proc starts its command: ``subprocess.Popen`` itself, or anything called the same
# way, e.g. ``functools.partial(lab.run, host)`` to start it inside a lab host.
Launcher = Callable[..., "subprocess.Popen[bytes]"]


class Proc:
    """One child process, its stdout and stderr kept in files under ``scratch``.

    ``stdin=True`` gives it a pipe to write to (:meth:`close_stdin` is its end of
    input). ``pipes=True`` reads its stdout and stderr through pipes, in threads that
    write the same files: each stdout line's arrival time is kept (:meth:`timed_lines`),
    and :meth:`wait_output` tells when its output is complete, i.e. when every process
    that inherited it (a guest, in a session of its own) closed it.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        scratch: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        launch: Launcher = subprocess.Popen,
        stdin: bool = False,
        pipes: bool = False,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.stdout_path = scratch / f"{name}.stdout"
        self.stderr_path = scratch / f"{name}.stderr"
        self._timed: list[tuple[float, str]] = []
        self._readers: list[threading.Thread] = []
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = launch(
                self.command,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else out,
                stderr=subprocess.PIPE if pipes else err,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.pid = self.popen.pid
        if pipes:
            assert self.popen.stdout is not None and self.popen.stderr is not None
            for stream, path, timed in (
                (self.popen.stdout, self.stdout_path, self._timed),
                (self.popen.stderr, self.stderr_path, None),
            ):
                reader = threading.Thread(
                    target=_copy_lines, args=(stream, path, timed), name=path.name, daemon=True
                )
                reader.start()
                self._readers.append(reader)

    def wait_for_output(self, marker: str, timeout: float = 60.0) -> None:
        """Wait until the process printed ``marker`` on stdout."""
        self.wait_for(lambda: marker in self.stdout(), timeout, f"printing {marker!r}")

    def wait_for_event(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the process logged structlog ``event`` (JSON lines on stderr); return it.

        How a service started on port 0 tells which port it took.
        """
        found: dict[str, Any] = {}

        def logged() -> bool:
            for record in self.events():
                if record.get("event") == event:
                    found.update(record)
                    return True
            return False

        self.wait_for(logged, timeout, f"logging {event!r}")
        return found

    def wait_for(self, seen: Callable[[], bool], timeout: float, doing: str) -> None:
        """Poll ``seen`` until true; fail, with the end of stderr, if the process exits
        first or ``timeout`` passes (``doing``: what it was waited for, in the error)."""

        def check() -> bool:
            exited = self.popen.poll()  # before looking: what it did before exiting counts
            if exited is not None and not self._output_complete():
                exited = None  # not all of its output is read yet
            if seen():
                return True
            if exited is not None:
                raise RuntimeError(
                    f"{self.name} exited with {exited} before {doing}; "
                    f"stderr ends with:\n{self.stderr_tail()}"
                )
            return False

        try:
            wait_until(check, timeout, f"{self.name} {doing}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; stderr ends with:\n{self.stderr_tail()}") from None

    def stdout(self) -> str:
        """Everything the process printed on stdout so far."""
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout_lines(self) -> list[str]:
        """The lines the process printed on stdout so far, each without its newline."""
        if self._readers:
            return [line for _, line in self.timed_lines()]  # whole lines only
        return self.stdout().splitlines()

    def wait_for_lines(
        self, done: Callable[[list[str]], bool], timeout: float, what: str
    ) -> list[str]:
        """Wait until ``done(lines)`` holds for the stdout lines so far; return them
        (``what``: what was waited for, in the error)."""
        self.wait_for(lambda: done(self.stdout_lines()), timeout, what)
        return self.stdout_lines()

    def timed_lines(self) -> list[tuple[float, str]]:
        """The stdout lines so far, each with the monotonic time it was read
        (with ``pipes``; otherwise none)."""
        return list(self._timed)

    def close_stdin(self) -> None:
        """End the process's input (with ``stdin=True``); safe to call twice."""
        if self.popen.stdin is not None:
            self.popen.stdin.close()

    def stderr(self) -> str:
        """Everything the process wrote on stderr so far (its log)."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def events(self) -> list[dict[str, Any]]:
        """The structlog events the process logged so far (its JSON lines on stderr)."""
        out: list[dict[str, Any]] = []
        for line in self.stderr().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def stderr_tail(self, lines: int = 15) -> str:
        return "\n".join(self.stderr().splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        """User+system CPU of this process and its descendants still alive (Linux /proc)."""
        return tree_cpu(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to this process alone, if it still runs."""
        if self.alive():
            self.popen.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        """Its exit code, once it exited (subprocess.TimeoutExpired after ``timeout``)."""
        return self.popen.wait(timeout=timeout)

    def wait_output(self, timeout: float = 20.0) -> None:
        """With ``pipes``: wait until its stdout and stderr are complete, every process
        that shares them gone (subprocess.TimeoutExpired after ``timeout``)."""
        deadline = time.monotonic() + timeout
        for reader in self._readers:
            reader.join(timeout=max(0.0, deadline - time.monotonic()))
        if not self._output_complete():
            raise subprocess.TimeoutExpired(self.command, timeout)

    def _output_complete(self) -> bool:
        return not any(reader.is_alive() for reader in self._readers)

    def kill(self) -> None:
        """SIGKILL this process alone (not its group): what a crash looks like."""
        self.signal(signal.SIGKILL)
        self.popen.wait()

    def pause(self) -> None:
        """SIGSTOP this process alone: silent, its sockets still open (a hung host)."""
        self.signal(signal.SIGSTOP)

    def stop(self) -> None:
        """SIGKILL the whole process group, and reap the leader; safe to call twice."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait_output(timeout=5)
        self.close_stdin()


def _copy_lines(stream: IO[bytes], path: Path, timed: list[tuple[float, str]] | None) -> None:
    """Copy ``stream`` to the end of ``path`` line by line until EOF, noting in ``timed``
    (if given) when each line arrived."""
    with stream, open(path, "ab", buffering=0) as out:
        for raw in stream:
            arrived = time.monotonic()
            out.write(raw)
            if timed is not None:
                timed.append((arrived, raw.decode(errors="replace").rstrip("\n")))


# --- /proc ---------------------------------------------------------------------------


def is_guest(pid: int) -> bool:
    """Whether ``pid`` still is an ftproxy guest process, so that a reused pid is left alone."""
    try:
        return b"ftproxy.guest" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


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
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        pending.extend(children(current))
    return total


# --- Logs ----------------------------------------------------------------------------


def summarize_stderr(text: str, lines: int = 3) -> list[str]:
    """The last meaningful lines of a replica's stderr: JSON log lines shortened to
    their event and reason, traceback decoration (``|``, ``+--``, ``^^^``) dropped."""
    kept: list[str] = []
    for raw in text.splitlines():
        line = raw.strip().lstrip("|+- ").strip()
        if not line or set(line) <= set("^~ "):
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "event" in record:
                reason = record.get("reason") or record.get("error")
                line = f"{record['event']}" + (f" ({reason})" if reason else "")
        kept.append(line)
    return kept[-lines:]
