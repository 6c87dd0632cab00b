"""A real etcd cluster on loopback, for the demo, the benchmark and the tests.

Each member is a Debian ``etcd`` process (package ``etcd-server``) with a data
directory of its own and ports picked here; every write is fsynced, as in
production (etcd 3.4 has no switch to skip it). Members can be killed, frozen
(SIGSTOP), thawed and restarted on their data directory, one at a time, which
is all a failover experiment needs. Blocking calls: from trio, run them in a
thread.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from ftproxy.tools.procs import free_port

HOST: Final = "127.0.0.1"
PACKAGE: Final = "etcd-server"
START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 10.0
_HEALTH_TIMEOUT_S: Final = 1.0


class EtcdMissing(Exception):
    """etcd is not installed here; the message says which Debian package brings it."""


class EtcdFailed(Exception):
    """A member did not start, or the cluster did not become healthy in time."""


@dataclass(frozen=True)
class ServerTls:
    """TLS on the members' client port, with client certificates required."""

    ca: Path  # the CA that signed the server's certificate and the clients'
    cert: Path
    key: Path


def etcd_binary() -> str:
    """The path of ``etcd``, or :class:`EtcdMissing` naming the package to install."""
    found = shutil.which("etcd")
    if found is None:
        raise EtcdMissing(
            f"etcd is not installed: `apt-get install {PACKAGE}` (Debian) puts it on PATH"
        )
    return found


@dataclass
class Member:
    """One etcd process; it can be killed, frozen, thawed and started again."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    command: list[str]
    host: str = HOST
    popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self) -> None:
        """Start (or start again, on the same data directory)."""
        if self.running():
            return
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed when stopped
        self.popen = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crashed member (its data directory stays, for a restart)."""
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.kill()
            self.popen.wait()
        self._close_log()

    def freeze(self) -> None:
        """SIGSTOP: a hung member, its sockets still open."""
        if self.running():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.running():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class EtcdCluster:
    """``size`` members on loopback, started together; see :func:`start_cluster`."""

    workdir: Path
    members: list[Member]
    tls: ServerTls | None = None
    client_tls: tuple[Path, Path] | None = None  # (cert, key) for health checks with TLS

    @property
    def scheme(self) -> str:
        return "etcds" if self.tls is not None else "etcd"

    @property
    def endpoints(self) -> str:
        """``HOST:PORT,HOST:PORT,...``: every member's client address."""
        return ",".join(m.endpoint for m in self.members)

    @property
    def address(self) -> str:
        """The ``--arbiter`` address of this cluster (TLS files not included)."""
        return f"{self.scheme}://{self.endpoints}"

    def urls(self) -> str:
        """The members' client URLs, as ``etcdctl --endpoints`` takes them."""
        http = "https" if self.tls is not None else "http"
        return ",".join(f"{http}://{m.endpoint}" for m in self.members)

    def wait_healthy(
        self, timeout: float = START_TIMEOUT_S, members: list[Member] | None = None
    ) -> None:
        """Until every member given (default: all running ones) reports a leader."""
        deadline = time.monotonic() + timeout
        for member in members or [m for m in self.members if m.running()]:
            while not self._healthy(member):
                if not member.running():
                    raise EtcdFailed(
                        f"etcd member {member.name} exited before it was healthy; its log "
                        f"ends with: {member.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise EtcdFailed(
                        f"etcd member {member.name} on {member.endpoint} was not healthy within "
                        f"{timeout:g} s; its log ends with: {member.log_tail()}"
                    )
                time.sleep(0.05)

    def etcdctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``etcdctl`` (Debian's ``etcd-client``) against every member."""
        command = ["etcdctl", f"--endpoints={self.urls()}", *self._etcdctl_tls(), *args]
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "ETCDCTL_API": "3"},
        )

    def stop(self) -> None:
        for member in self.members:
            member.thaw()
            member.kill()

    def _etcdctl_tls(self) -> list[str]:
        if self.tls is None:
            return []
        flags = [f"--cacert={self.tls.ca}"]
        if self.client_tls is not None:
            flags += [f"--cert={self.client_tls[0]}", f"--key={self.client_tls[1]}"]
        return flags

    def _healthy(self, member: Member) -> bool:
        scheme = "https" if self.tls is not None else "http"
        context: ssl.SSLContext | None = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            if self.client_tls is not None:
                context.load_cert_chain(str(self.client_tls[0]), str(self.client_tls[1]))
        url = f"{scheme}://{member.endpoint}/health"
        try:
            with urllib.request.urlopen(url, timeout=_HEALTH_TIMEOUT_S, context=context) as reply:
                return bool(json.loads(reply.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False


def plan_members(
    workdir: Path,
    hosts: Sequence[str],
    *,
    ports: Sequence[tuple[int, int]] | None = None,
    tls: ServerTls | None = None,
) -> list[Member]:
    """One member per address in ``hosts`` (not started), as one new cluster.

    ``ports``: each member's (client, peer) ports; free loopback ports by default.
    A caller may also run a member's ``command`` elsewhere (in a network namespace).
    """
    binary = etcd_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    names = [f"m{i}" for i in range(len(hosts))]
    ports = ports or [(free_port(), free_port()) for _ in names]
    peers = [f"http://{host}:{peer}" for host, (_, peer) in zip(hosts, ports, strict=True)]
    initial = ",".join(f"{n}={url}" for n, url in zip(names, peers, strict=True))
    scheme = "https" if tls is not None else "http"
    members = []
    for name, host, peer_url, (client, peer) in zip(names, hosts, peers, ports, strict=True):
        client_url = f"{scheme}://{host}:{client}"
        command = [
            binary,
            "--name", name,
            "--data-dir", str(workdir / name),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"ftproxy-{workdir.name}",
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        if tls is not None:
            command += [
                "--cert-file", str(tls.cert),
                "--key-file", str(tls.key),
                "--trusted-ca-file", str(tls.ca),
                "--client-cert-auth",
            ]  # fmt: skip
        log_path = workdir / f"{name}.log"
        members.append(Member(name, client, peer, workdir / name, log_path, command, host))
    return members


def start_cluster(
    workdir: Path,
    size: int = 3,
    *,
    tls: ServerTls | None = None,
    client_tls: tuple[Path, Path] | None = None,
    wait: bool = True,
    timeout: float = START_TIMEOUT_S,
) -> EtcdCluster:
    """Start ``size`` etcd members on loopback under ``workdir`` and (``wait``) until
    they are healthy. On any failure every member started is killed before the error
    is raised."""
    members = plan_members(workdir, [HOST] * size, tls=tls)
    cluster = EtcdCluster(workdir, members, tls, client_tls)
    try:
        for member in members:
            member.start()
        if wait:
            cluster.wait_healthy(timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster
