"""The configurations under test, each a running service clients can load.

A ``Service`` knows where clients connect, which processes make up its primary
side and its backup side (for CPU accounting), and, for ftproxy's replicated
pair, where the primary's admin endpoint answers ``GET /status``.

Starting is split from waiting (``start_*`` returns at once, ``Service.ready``
waits), so that several configurations boot at the same time.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import FTPROXY, HOST, KV, ROOT, Proc, free_port, wait_until
from ftproxy.etcdlocal import EtcdCluster

READY = "listening"


@dataclass
class Service:
    """A configuration under test, started; ``ready()`` before loading it."""

    name: str
    port: int
    primary: list[Proc] = field(default_factory=list)
    backup: list[Proc] = field(default_factory=list)
    others: list[Proc] = field(default_factory=list)
    admin_port: int | None = None
    backup_admin_port: int | None = None
    log_port: int | None = None  # the primary's --log-listen port
    takeover_port: int | None = None  # where the backup serves once live
    log_path: Path | None = None
    ready_marker: str | None = READY

    def ready(self, timeout: float = 60.0) -> Service:
        """Wait until every replica printed its readiness line."""
        if self.ready_marker is not None:
            for proc in self.primary + self.backup:
                proc.wait_for_output(self.ready_marker, timeout)
        return self

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds used so far by the primary side and by the backup side."""
        return (
            sum(p.cpu_seconds() for p in self.primary),
            sum(p.cpu_seconds() for p in self.backup),
        )

    def status(self) -> dict[str, Any] | None:
        """The primary's ``GET /status``, for ftproxy's replicated pair; else None."""
        if self.admin_port is None:
            return None
        return admin_status(self.admin_port)

    def channel_bytes(self) -> int | None:
        """Bytes the primary has sent on the log channel so far (TCP counters, via ss)."""
        if self.log_port is None:
            return None
        return log_channel_bytes_sent(self.log_port)

    def log_bytes(self) -> int | None:
        """Size of ``ftproxy record``'s log file so far; None for other configurations."""
        if self.log_path is None:
            return None
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        for proc in self.primary + self.backup + self.others:
            proc.stop()


def admin_status(port: int, timeout: float = 5.0) -> dict[str, Any]:
    """A replica's ``GET /status`` as a mapping."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/status", timeout=timeout) as reply:
        return dict(json.loads(reply.read()))


def log_channel_bytes_sent(port: int) -> int | None:
    """``bytes_sent`` of the established TCP connection whose local port is ``port``.

    Read from the kernel with ``ss -ti`` (iproute2): what really crossed the log
    channel, framing and heartbeats included. None if ss is missing or shows none.
    """
    try:
        done = subprocess.run(
            ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.findall(r"\bbytes_sent:(\d+)", done.stdout)
    return sum(int(v) for v in found) if found else None


def start_bare(scratch: Path, env: dict[str, str] | None = None) -> Service:
    """Configuration 1: ``python examples/kv.py`` on real sockets, no supervisor."""
    port = free_port()
    proc = Proc("bare", [sys.executable, str(KV), "--port", str(port)], scratch, env=env)
    return Service("bare", port, primary=[proc])


def start_record(scratch: Path, env: dict[str, str] | None = None, tree: Path = ROOT) -> Service:
    """Configuration 2: ``ftproxy record``, one replica logging to a file, no backup.

    ``tree``: the ftproxy checkout it runs from (its cwd, so its imports and kv.py).
    """
    port = free_port()
    log_path = scratch / "record.ftlog"
    kv = tree / KV.relative_to(ROOT)
    command = [*FTPROXY, "record", "--log", str(log_path), "--", str(kv), "--port", str(port)]
    proc = Proc("record", command, scratch, env=env, cwd=tree)
    return Service("record", port, primary=[proc], log_path=log_path)


@dataclass
class Arbiter:
    """One ``ftproxy arbiter`` for every pair of the run (each pair its own generation)."""

    scratch: Path
    port: int = field(default_factory=free_port)
    proc: Proc | None = None
    # None: --insecure (plain frames); a path: --secret-file (sealed frames).
    secret_file: Path | None = None
    _generation: int = 0

    def start(self) -> Arbiter:
        command = [
            *FTPROXY,
            "arbiter",
            "--listen",
            f"{HOST}:{self.port}",
            "--data-dir",
            str(self.scratch / f"arbiter-{self.port}"),
            *_security(self.secret_file),
        ]
        self.proc = Proc(f"arbiter-{self.port}", command, self.scratch)
        return self

    def wait_listening(self) -> None:
        wait_until(
            lambda: socket.create_connection((HOST, self.port), timeout=1).close() is None,
            30,
            "the arbiter listens",
        )

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def next_generation(self) -> int:
        self._generation += 1
        return self._generation

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@dataclass
class EtcdArbiter:
    """An etcd cluster on loopback (ftproxy.etcdlocal) as the arbiter of every pair."""

    cluster: EtcdCluster
    _generation: int = 0
    # None: --insecure (plain log-channel frames); a path: --secret-file (sealed).
    secret_file: Path | None = None

    @property
    def address(self) -> str:
        return self.cluster.address

    def next_generation(self) -> int:
        self._generation += 1
        return self._generation


def start_pair(
    name: str,
    scratch: Path,
    arbiter: Arbiter | EtcdArbiter,
    *,
    output_rule: bool = True,
    two_addresses: bool = False,
    env: dict[str, str] | None = None,
    tree: Path = ROOT,
) -> Service:
    """Configurations 3 and 4: ``ftproxy primary`` and ``ftproxy backup`` on loopback.

    Default timings (heartbeat 50 ms, peer timeout 500 ms, max lag 100 ms). The
    backup takes over the primary's address, or with ``two_addresses`` serves
    on one of its own (``--map``), as on two hosts: then a primary that is
    stopped, not dead, cannot keep it from going live. The pair authenticates
    and seals its frames as its arbiter does (``Arbiter.secret_file``).
    """
    port = free_port()
    log_port = free_port()
    primary_admin = free_port()
    backup_admin = free_port()
    generation = arbiter.next_generation()
    guest = ["--", str(tree / KV.relative_to(ROOT)), "--port", str(port)]
    common = ["--arbiter", arbiter.address, *_security(arbiter.secret_file)]
    primary_command = [
        *FTPROXY,
        "primary",
        "--log-listen",
        f"{HOST}:{log_port}",
        "--admin",
        f"{HOST}:{primary_admin}",
        "--generation",
        str(generation),
        *common,
        *([] if output_rule else ["--no-output-rule"]),
        *guest,
    ]
    takeover_port = free_port() if two_addresses else port
    mapping = ["--map", f"{port}={HOST}:{takeover_port}"] if two_addresses else []
    backup_command = [
        *FTPROXY,
        "backup",
        "--primary",
        f"{HOST}:{log_port}",
        "--admin",
        f"{HOST}:{backup_admin}",
        *common,
        *mapping,
        *guest,
    ]
    primary = Proc(f"{name}-g{generation}-primary", primary_command, scratch, env=env, cwd=tree)
    backup = Proc(f"{name}-g{generation}-backup", backup_command, scratch, env=env, cwd=tree)
    return Service(
        name,
        port,
        primary=[primary],
        backup=[backup],
        admin_port=primary_admin,
        backup_admin_port=backup_admin,
        log_port=log_port,
        takeover_port=takeover_port,
    )


def _security(secret_file: Path | None) -> list[str]:
    return ["--insecure"] if secret_file is None else ["--secret-file", str(secret_file)]
