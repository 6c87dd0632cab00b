"""A primary, a backup and an arbiter in real processes, started as a user would."""

from __future__ import annotations

import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from support import EXAMPLES, FTPROXY, ROOT, free_port

from bench.clients import start_clients, stop_clients
from ftproxy.tools.procs import Proc, wait_accepting, wait_until
from ftproxy.tools.procs import admin_status as status
from ftproxy.tools.resp import Reply, encode_command, receive_reply

__all__ = ["KV", "Cluster", "KvClient", "Load", "Process", "status", "wait_until"]

KV = EXAMPLES / "kv.py"


class Process(Proc):
    """One ftproxy process of a test (ftproxy.tools.procs' harness), started in the
    repository as a user's clone would run it."""

    def __init__(self, name: str, command: list[str], log_dir: Path, cwd: Path = ROOT) -> None:
        super().__init__(name, command, log_dir, cwd=cwd)


@dataclass
class Cluster:
    """Arbiter, primary and backup for examples/kv.py on loopback."""

    tmp: Path
    service_port: int = field(default_factory=free_port)
    backup_service_port: int | None = None  # another address for the backup (two "hosts")
    arbiter_port: int = field(default_factory=free_port)
    log_port: int = field(default_factory=free_port)
    primary_admin: int = field(default_factory=free_port)
    backup_admin: int = field(default_factory=free_port)
    primary_args: tuple[str, ...] = ()
    # The guest's command line (default: examples/kv.py on the service port).
    guest: tuple[str, ...] = ()
    # Another arbiter than the built-in one started here (an etcd:// address), and its flags.
    arbiter_address: str | None = None
    arbiter_args: tuple[str, ...] = ()
    backup_args: tuple[str, ...] = ()
    # --secret-file for every process (None: --insecure)
    secret_file: Path | None = None
    # A command prefix per process name ("arbiter", "primary", "backup"), e.g. prlimit.
    wrap: dict[str, tuple[str, ...]] = field(default_factory=dict)
    processes: dict[str, Process] = field(default_factory=dict)

    def security(self) -> list[str]:
        if self.secret_file is None:
            return ["--insecure"]
        return ["--secret-file", str(self.secret_file)]

    def start_arbiter(self) -> Process:
        command = [
            *self.wrap.get("arbiter", ()),
            *FTPROXY,
            "arbiter",
            "--listen",
            f"127.0.0.1:{self.arbiter_port}",
            "--data-dir",
            str(self.tmp / "arbiter"),
            *self.security(),
        ]
        process = Process("arbiter", command, self.tmp)
        self.processes["arbiter"] = process
        wait_accepting(self.arbiter_port, 20, "the arbiter listens")
        return process

    def replica_command(self, role: str, *extra: str, guest: tuple[str, ...] = ()) -> list[str]:
        where = (
            ["--log-listen", f"127.0.0.1:{self.log_port}"]
            if role == "primary"
            else ["--primary", f"127.0.0.1:{self.log_port}"]
        )
        admin = self.primary_admin if role == "primary" else self.backup_admin
        mapping: list[str] = []
        if role == "backup" and self.backup_service_port is not None:
            mapping = ["--map", f"{self.service_port}=127.0.0.1:{self.backup_service_port}"]
        guest = guest or self.guest or (str(KV), "--port", str(self.service_port))
        return [
            *self.wrap.get(role, ()),
            *FTPROXY,
            role,
            *where,
            "--arbiter",
            self.arbiter_address or f"127.0.0.1:{self.arbiter_port}",
            *self.arbiter_args,
            "--admin",
            f"127.0.0.1:{admin}",
            *self.security(),
            *mapping,
            *extra,
            "--",
            *guest,
        ]

    def replica(
        self,
        name: str,
        command: str,
        *flags: str,
        admin: int,
        guest: tuple[str, ...] = (),
        data: str = "",
    ) -> Process:
        """Start ``ftproxy COMMAND`` (primary, backup or run) with its own flags and data
        dir (``data-NAME``, or ``data-DATA`` to share one between runs of a node)."""
        guest = guest or (str(KV), "--port", str(self.service_port))
        process = Process(
            name,
            [
                *FTPROXY,
                command,
                *flags,
                "--arbiter",
                self.arbiter_address or f"127.0.0.1:{self.arbiter_port}",
                *self.arbiter_args,
                "--admin",
                f"127.0.0.1:{admin}",
                "--data-dir",
                str(self.tmp / f"data-{data or name}"),
                "--insecure",
                "--",
                *guest,
            ],
            self.tmp,
        )
        self.processes[name] = process
        return process

    def start(self) -> Cluster:
        if self.arbiter_address is None:
            self.start_arbiter()
        return self.start_replicas()

    def start_replicas(self, ready: str | None = "listening") -> Cluster:
        """Primary and backup, against an arbiter already up; ``ready``: their stdout marker."""
        self.start_primary()
        self.start_backup()
        if ready is not None:
            self.primary.wait_for_output(ready, 20)
            self.backup.wait_for_output(ready, 20)
        return self

    def start_primary(self) -> Process:
        command = self.replica_command("primary", *self.primary_args)
        self.processes["primary"] = Process("primary", command, self.tmp)
        return self.primary

    def start_backup(self, primary: str | None = None) -> Process:
        """The backup, joining the primary's log channel (or ``primary``: HOST:PORT)."""
        command = self.replica_command("backup", *self.backup_args)
        if primary is not None:
            at = command.index("--primary")
            command[at + 1] = primary
        self.processes["backup"] = Process("backup", command, self.tmp)
        return self.backup

    @property
    def primary(self) -> Process:
        return self.processes["primary"]

    @property
    def backup(self) -> Process:
        return self.processes["backup"]

    @property
    def arbiter(self) -> Process:
        return self.processes["arbiter"]

    def kill_primary(self) -> None:
        """SIGKILL the primary supervisor; its guest goes when its pipe closes."""
        self.primary.signal(signal.SIGKILL)
        self.primary.wait()

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()


class KvClient:
    """RESP on a connection made again after a failure (the project's parser,
    ftproxy.tools.resp): replies as they came, an error reply as an ErrorReply."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = bytearray()

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def call(self, *parts: str) -> Reply:
        """One command; raises OSError if the connection broke before the reply."""
        if self.sock is None:
            self.sock = self._connect()
            self.buffer.clear()
        try:
            self.sock.sendall(encode_command(*parts))
            return receive_reply(self.sock, self.buffer)
        except OSError:
            self.sock.close()
            self.sock = None
            raise


@dataclass
class Load:
    """Clients writing INCRs and SETs until stopped; every acknowledged write recorded."""

    port: int
    clients: int = 4
    acked_incr: dict[str, int] = field(default_factory=dict)
    acked_set: dict[str, str] = field(default_factory=dict)
    errors: int = 0
    stop_event: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self, index: int) -> None:
        client = KvClient(self.port)
        counter = f"ctr:{index}"
        n = 0
        while not self.stop_event.is_set():
            n += 1
            try:
                reply = client.call("INCR", counter)
                assert isinstance(reply, int), reply
                with self.lock:
                    self.acked_incr[counter] = reply
                key = f"key:{index}:{n}"
                if client.call("SET", key, str(n)) == "OK":
                    with self.lock:
                        self.acked_set[key] = str(n)
            except OSError:
                with self.lock:
                    self.errors += 1

    def start(self) -> Load:
        self.threads += start_clients(self.clients, self._run)
        return self

    def stop(self) -> None:
        stop_clients(self.stop_event, self.threads)

    def acknowledged(self) -> int:
        with self.lock:
            return sum(self.acked_incr.values()) + len(self.acked_set)

    def verify(self, port: int) -> None:
        """Every acknowledged write is there; an INCR is at most one ahead (unacknowledged)."""
        client = KvClient(port)
        for counter, acked in self.acked_incr.items():
            found = client.call("GET", counter)
            value = int(found) if isinstance(found, bytes) else -1
            assert acked <= value <= acked + 1, f"{counter}: acknowledged {acked}, found {value}"
        missing = [k for k, v in self.acked_set.items() if client.call("GET", k) != v.encode()]
        assert not missing, f"{len(missing)} acknowledged SETs lost, e.g. {missing[:3]}"
