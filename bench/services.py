"""The configurations under test, each a running service clients can load.

A ``Service`` knows where clients connect, which processes make up its primary
side and its backup side (for CPU accounting), and, for ftproxy's replicated
pair, where the primary's admin endpoint answers ``GET /status``.

Starting is split from waiting (``start_*`` returns at once, ``Service.ready``
waits), so that several configurations boot at the same time.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import (
    FTPROXY,
    HOST,
    KV,
    ROOT,
    Proc,
    admin_status,
    free_port,
    wait_accepting,
)
from ftproxy.tools.etcdlocal import EtcdCluster

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
    # Started on port 0: learns its ports from its processes' output (once, in ready()).
    boot: Callable[[Service, float], None] | None = None

    def ready(self, timeout: float = 60.0) -> Service:
        """Wait until every replica printed its readiness line (and, started on
        port 0, said which ports it took)."""
        if self.boot is not None:
            boot, self.boot = self.boot, None
            boot(self, timeout)
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

    @property
    def procs(self) -> list[Proc]:
        """Every process of the service: primaries, backups and the rest."""
        return self.primary + self.backup + self.others

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


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


# Services of the load matrix take port 0 and report what they got, so that two of
# them (or anything else on the machine) never race for a port picked in advance.
GUEST_PORT = 6380  # the port kv.py asks for inside a supervisor: mapped to port 0
_KV_LISTENING = re.compile(r"kv listening on [^\s:]+:(\d+)")


def _port_of(address: object) -> int:
    """The port of a logged address: ``"host:port"`` or ``[host, port]``."""
    if isinstance(address, str):
        return int(address.rsplit(":", 1)[1])
    if isinstance(address, list | tuple):
        return int(address[1])
    raise ValueError(f"not an address: {address!r}")


def _listening_port(proc: Proc, timeout: float) -> int:
    """The real port a supervisor bound for its guest's listening socket."""
    return _port_of(proc.wait_for_event("listening", timeout)["address"])


def start_bare(scratch: Path, env: dict[str, str] | None = None) -> Service:
    """Configuration 1: ``python examples/kv.py`` on real sockets, no supervisor."""
    proc = Proc("bare", [sys.executable, str(KV), "--port", "0"], scratch, env=env)

    def boot(service: Service, timeout: float) -> None:
        proc.wait_for_output(READY, timeout)
        found = _KV_LISTENING.search(proc.stdout_path.read_text(errors="replace"))
        if found is None:
            raise RuntimeError(f"{proc.name} printed no 'kv listening on HOST:PORT' line")
        service.port = int(found[1])

    return Service("bare", 0, primary=[proc], boot=boot)


def start_record(scratch: Path, env: dict[str, str] | None = None, tree: Path = ROOT) -> Service:
    """Configuration 2: ``ftproxy record``, one replica logging to a file, no backup.

    ``tree``: the ftproxy checkout it runs from (its cwd, so its imports and kv.py).
    """
    log_path = scratch / "record.ftlog"
    command = [
        *FTPROXY,
        "record",
        "--log",
        str(log_path),
        "--map",
        f"{GUEST_PORT}={HOST}:0",
        "--",
        str(tree / KV.relative_to(ROOT)),
        "--port",
        str(GUEST_PORT),
    ]
    proc = Proc("record", command, scratch, env=env, cwd=tree)

    def boot(service: Service, timeout: float) -> None:
        service.port = _listening_port(proc, timeout)

    return Service("record", 0, primary=[proc], log_path=log_path, boot=boot)


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
        wait_accepting(self.port, 30, "the arbiter listens")

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
    """An etcd cluster on loopback (ftproxy.tools.etcdlocal) as the arbiter of every pair."""

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
    ephemeral: bool = False,
) -> Service:
    """Configurations 3 and 4: ``ftproxy primary`` and ``ftproxy backup`` on loopback.

    Default timings (heartbeat 50 ms, peer timeout 500 ms, max lag 100 ms). The
    backup takes over the primary's address, or with ``two_addresses`` serves
    on one of its own (``--map``), as on two hosts: then a primary that is
    stopped, not dead, cannot keep it from going live. The pair authenticates
    and seals its frames as its arbiter does (``Arbiter.secret_file``).
    ``ephemeral`` (the load matrix, where nothing fails over): every port is port 0,
    reported back.
    """
    if ephemeral:
        return _start_ephemeral_pair(
            name, scratch, arbiter, output_rule=output_rule, env=env, tree=tree
        )
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


def _start_ephemeral_pair(
    name: str,
    scratch: Path,
    arbiter: Arbiter | EtcdArbiter,
    *,
    output_rule: bool,
    env: dict[str, str] | None = None,
    tree: Path = ROOT,
    backup_flags: tuple[str, ...] = (),
) -> Service:
    """A pair whose every port is port 0: the backup starts once the primary has
    said where its log channel listens; the client port is the primary's mapped one."""
    generation = arbiter.next_generation()
    guest = _guest_args(tree)
    common = _replica_flags(arbiter)
    primary_command = [
        *FTPROXY,
        "primary",
        "--log-listen",
        f"{HOST}:0",
        "--map",
        f"{GUEST_PORT}={HOST}:0",
        "--generation",
        str(generation),
        *common,
        *([] if output_rule else ["--no-output-rule"]),
        *guest,
    ]
    primary = Proc(f"{name}-g{generation}-primary", primary_command, scratch, env=env, cwd=tree)

    def boot(service: Service, timeout: float) -> None:
        service.log_port = _port_of(
            primary.wait_for_event("waiting_for_backup", timeout)["address"]
        )
        backup_command = _backup_command(service.log_port, arbiter, tree, backup_flags)
        backup = Proc(f"{name}-g{generation}-backup", backup_command, scratch, env=env, cwd=tree)
        service.backup.append(backup)
        # The primary serves /status once its backup has joined.
        service.admin_port = _port_of(primary.wait_for_event("admin_listening", timeout)["address"])
        service.backup_admin_port = _port_of(
            backup.wait_for_event("admin_listening", timeout)["address"]
        )
        service.port = service.takeover_port = _listening_port(primary, timeout)

    return Service(name, 0, primary=[primary], boot=boot)


def start_healed_pair(
    name: str,
    scratch: Path,
    arbiter: Arbiter | EtcdArbiter,
    *,
    env: dict[str, str] | None = None,
    tree: Path = ROOT,
) -> Service:
    """The pair as it serves after a failover: a first pair (output rule, every port
    port 0) whose primary is killed with SIGKILL; its backup goes live and takes a new
    backup on its own --log-listen, which catches up, so the pair is protected again
    (its next generation) and served by the re-protecting replica (``Reprotector``)."""
    first = _start_ephemeral_pair(
        name,
        scratch,
        arbiter,
        output_rule=True,
        env=env,
        tree=tree,
        # Live, it serves on a port of its own (port 0), and takes its backup on another.
        backup_flags=("--log-listen", f"{HOST}:0", "--map", f"{GUEST_PORT}={HOST}:0"),
    )
    arbiter.next_generation()  # the healed pair's: no later pair may take it
    boot_first = first.boot
    assert boot_first is not None

    def boot(service: Service, timeout: float) -> None:
        boot_first(service, timeout)
        (first_primary,), (survivor,) = service.primary, service.backup
        for proc in (first_primary, survivor):
            proc.wait_for_output(READY, timeout)
        first_primary.kill()
        log_port = _port_of(survivor.wait_for_event("waiting_for_backup", timeout)["address"])
        joiner_command = _backup_command(log_port, arbiter, tree)
        joiner = Proc(f"{name}-joiner", joiner_command, scratch, env=env, cwd=tree)
        survivor.wait_for_event("pair_protected", timeout)
        service.others.append(first_primary)
        service.primary, service.backup = [survivor], [joiner]
        service.log_port = log_port
        service.port = service.takeover_port = _listening_port(survivor, timeout)
        service.admin_port = service.backup_admin_port
        service.backup_admin_port = _port_of(
            joiner.wait_for_event("admin_listening", timeout)["address"]
        )
        joiner.wait_for_event("backup_protected", timeout)

    first.boot = boot
    return first


def _backup_command(
    log_port: int, arbiter: Arbiter | EtcdArbiter, tree: Path, flags: tuple[str, ...] = ()
) -> list[str]:
    """An ephemeral-port backup of kv.py joining the log channel on ``log_port``."""
    return [
        *FTPROXY,
        "backup",
        "--primary",
        f"{HOST}:{log_port}",
        *_replica_flags(arbiter),
        *flags,
        *_guest_args(tree),
    ]


def _replica_flags(arbiter: Arbiter | EtcdArbiter) -> list[str]:
    """What every ephemeral-port replica is given: its arbiter, security, an admin port."""
    return ["--arbiter", arbiter.address, *_security(arbiter.secret_file), "--admin", f"{HOST}:0"]


def _guest_args(tree: Path) -> list[str]:
    return ["--", str(tree / KV.relative_to(ROOT)), "--port", str(GUEST_PORT)]


def _security(secret_file: Path | None) -> list[str]:
    return ["--insecure"] if secret_file is None else ["--secret-file", str(secret_file)]
