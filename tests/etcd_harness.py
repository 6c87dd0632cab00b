"""Real etcd clusters for the tests (ftproxy.tools.etcdlocal), TLS by trustme, auth via etcdctl.

One fixture, ``etcd``, starts clusters (``etcd(3)``, ``etcd(1, tls=True)``) that
are stopped at the end of the test; :func:`enable_auth` turns etcd's
authentication on the way an operator does, with ``etcdctl``.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ftproxy.tools.etcdlocal import EtcdCluster, ServerTls, start_cluster

needs_etcd = pytest.mark.skipif(
    shutil.which("etcd") is None or shutil.which("etcdctl") is None,
    reason="etcd is not installed (Debian: apt-get install etcd-server etcd-client)",
)


@dataclass(frozen=True)
class ClientTls:
    """Files a client uses to reach a TLS cluster: the CA, its certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def flags(self) -> list[str]:
        paths = ("--etcd-ca", self.ca), ("--etcd-cert", self.cert), ("--etcd-key", self.key)
        return [item for flag, path in paths for item in (flag, str(path))]


def make_tls(directory: Path) -> tuple[ServerTls, ClientTls]:
    """A CA (trustme), a server certificate for 127.0.0.1 and a client certificate."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("ftproxy-replica")
    ca_path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    paths = {}
    for name, issued in (("server", server), ("client", client)):
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        paths[name] = (cert, key)
    return (
        ServerTls(ca_path, *paths["server"]),
        ClientTls(ca_path, *paths["client"]),
    )


class EtcdFactory:
    """Starts clusters under a test's tmp_path; stops every one of them afterwards."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clusters: list[EtcdCluster] = []
        self.client_tls: ClientTls | None = None

    def __call__(self, size: int = 1, *, tls: bool = False) -> EtcdCluster:
        workdir = self.tmp / f"etcd{len(self.clusters)}"
        server_tls = None
        client_pair = None
        if tls:
            server_tls, self.client_tls = make_tls(workdir / "tls")
            client_pair = (self.client_tls.cert, self.client_tls.key)
        cluster = start_cluster(workdir, size, tls=server_tls, client_tls=client_pair)
        self.clusters.append(cluster)
        return cluster

    def stop(self) -> None:
        for cluster in self.clusters:
            cluster.stop()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdFactory]:
    factory = EtcdFactory(tmp_path)
    yield factory
    factory.stop()


def etcdctl_ok(cluster: EtcdCluster, *args: str) -> str:
    done = cluster.etcdctl(*args)
    assert done.returncode == 0, f"etcdctl {' '.join(args)}: {done.stderr}"
    return done.stdout


def enable_auth(cluster: EtcdCluster, tmp: Path, user: str = "ftproxy") -> Path:
    """Turn on etcd's authentication: a root user, and ``user`` allowed ``ftproxy/`` only.

    Return the file holding ``user``'s password (mode 600), as a replica is given it.
    """
    password = f"{user}-password-1"
    root = ["--user", "root:root-password-1"]
    etcdctl_ok(cluster, "user", "add", "root:root-password-1")
    etcdctl_ok(cluster, "role", "add", "ftproxy")
    etcdctl_ok(
        cluster, "role", "grant-permission", "ftproxy", "--prefix=true", "readwrite", "ftproxy/"
    )
    etcdctl_ok(cluster, "user", "add", f"{user}:{password}")
    etcdctl_ok(cluster, "user", "grant-role", user, "ftproxy")
    etcdctl_ok(cluster, "auth", "enable")
    assert "ftproxy" in etcdctl_ok(cluster, *root, "user", "list")
    path = tmp / f"{user}.password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def stored_winner(cluster: EtcdCluster, key: str, *auth: str) -> str:
    """The value of ``ftproxy/KEY`` as etcdctl reads it ('' when absent)."""
    out = etcdctl_ok(cluster, *auth, "get", f"ftproxy/{key}", "--print-value-only")
    return out.strip()


class BlackHole:
    """A loopback port whose SYNs go unanswered, as a host that drops packets.

    A listener with a backlog of 0 that never accepts: once its queue is full, the
    kernel drops every further SYN, so a connect neither succeeds nor is refused.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = int(self.listener.getsockname()[1])
        self.fillers: list[socket.socket] = []
        for _ in range(8):
            filler = socket.socket()
            filler.settimeout(0.2)
            try:
                filler.connect(("127.0.0.1", self.port))
            except TimeoutError:
                filler.close()
                return  # the queue is full: this SYN was dropped
            self.fillers.append(filler)
        raise AssertionError("the listen queue never filled")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.listener.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()
