"""Failovers decided by a real etcd cluster: primary, backup and etcd members in real processes.

The claims are the built-in arbiter's (no acknowledged write lost, never two
replicas acting alone), now with no single arbiter process to lose: a member
down changes nothing, a lost quorum stops every decision until a member is
back, and the answers (and their key in etcd) are the same.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster, KvClient, Load, status, wait_until
from etcd_harness import enable_auth, needs_etcd, stored_winner
from support import FTPROXY, free_port

from ftproxy.tools.etcdlocal import EtcdCluster

EXIT_HALTED = 4
KEY = "ftproxy/generation/1"  # the default pair's first generation, under ftproxy/ in etcd
PEER_TIMEOUT_S = 0.5  # the replicas' default --peer-timeout-ms


def run_node(c: Cluster, name: str, log_port: int, admin: int, run: int) -> Any:
    """``ftproxy run`` with etcd as the arbiter: the same command every time."""
    return c.replica(
        f"{name}-{run}",
        "run",
        "--pair",
        "kv",
        "--log-listen",
        f"127.0.0.1:{log_port}",
        admin=admin,
        data=name,
    )


def role(admin_port: int) -> str:
    return str(status(admin_port)["role"])


def candidate(c: Cluster, name: str) -> str:
    return f"{name}@{socket.gethostname()}:{c.processes[name].popen.pid}"


def events(c: Cluster, name: str, event: str) -> list[dict[str, Any]]:
    return [e for e in c.processes[name].events() if e.get("event") == event]


@needs_etcd
def test_one_member_decides_a_kill_9_failover(etcd, cluster) -> None:
    members = etcd(1)
    c = cluster(arbiter_address=members.address).start()
    load = Load(c.service_port, clients=3).start()
    wait_until(lambda: load.acknowledged() > 50, 20, "the load is running")
    c.kill_primary()
    acked = load.acknowledged()
    wait_until(lambda: load.acknowledged() > acked + 50, 20, "writes go on after the failover")
    load.stop()
    assert role(c.backup_admin) == "live"
    load.verify(c.service_port)
    # The decision is in etcd, under the documented key, naming the backup.
    assert stored_winner(members, KEY) == candidate(c, "backup")
    [decided] = events(c, "backup", "arbiter_decided")
    assert decided["won"] is True and decided["arbiter"] == "etcd"
    assert status(c.backup_admin)["arbiter"]["address"] == members.address


@needs_etcd
def test_one_member_of_three_killed_before_the_failover(etcd, cluster) -> None:
    members = etcd(3)
    c = cluster(arbiter_address=members.address).start()
    load = Load(c.service_port, clients=2).start()
    wait_until(lambda: load.acknowledged() > 50, 20, "the load is running")
    members.members[0].kill()  # the first endpoint each replica tries
    c.kill_primary()
    wait_until(lambda: role(c.backup_admin) == "live", 20, "the backup goes live")
    acked = load.acknowledged()
    wait_until(lambda: load.acknowledged() > acked + 20, 20, "writes go on")
    load.stop()
    load.verify(c.service_port)
    assert stored_winner(members, KEY) == candidate(c, "backup")


@needs_etcd
def test_without_a_quorum_nobody_goes_live_and_exactly_one_does_after(etcd, cluster) -> None:
    members = etcd(3)
    # Two "hosts": the backup serves an address of its own, so the frozen primary
    # holding the service port cannot be what keeps it from going live.
    c = cluster(arbiter_address=members.address, backup_service_port=free_port()).start()
    load = Load(c.service_port, clients=2).start()
    wait_until(lambda: load.acknowledged() > 50, 20, "the load is running")
    load.stop()
    members.members[0].kill()
    members.members[1].kill()
    c.primary.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: role(c.backup_admin) == "arbitrating", 10, "the backup asks etcd")
        wait_until(
            lambda: len(events(c, "backup", "arbiter_unreachable")) >= 3,
            20,
            "the backup is told, again and again, that etcd has no quorum",
        )
        # However long the quorum is gone, nobody serves.
        for _ in range(10):
            assert role(c.backup_admin) == "arbitrating"
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", c.backup_service_port), timeout=1).close()
            time.sleep(0.1)
        members.members[1].start()
        wait_until(lambda: role(c.backup_admin) == "live", 30, "the backup goes live")
        assert c.backup_service_port is not None
        load.verify(c.backup_service_port)
    finally:
        c.primary.signal(signal.SIGCONT)
    # The primary, thawed, asks etcd, hears it lost, and halts: exactly one went live.
    assert c.primary.wait(timeout=30) == EXIT_HALTED
    assert not [e for e in events(c, "primary", "role_changed") if e.get("to") == "live"]
    assert stored_winner(members, KEY) == candidate(c, "backup")
    # Retries were paced on the peer timeout's scale, never seconds apart.
    pauses = [e["retry_in"] for e in events(c, "backup", "arbiter_unreachable")]
    assert max(pauses) <= PEER_TIMEOUT_S / 4, pauses


@needs_etcd
def test_a_frozen_primary_thawed_after_the_backup_won_through_etcd_emits_nothing(
    etcd, cluster
) -> None:
    members = etcd(3)
    c = cluster(arbiter_address=members.address, backup_service_port=free_port()).start()
    stale = KvClient(c.service_port)
    assert stale.call("INCR", "stale") == 1
    c.primary.signal(signal.SIGSTOP)
    try:
        assert stale.sock is not None
        stale.sock.sendall(b"*2\r\n$4\r\nINCR\r\n$5\r\nstale\r\n")  # waits in the kernel
        wait_until(lambda: role(c.backup_admin) == "live", 20, "the backup goes live")
    finally:
        c.primary.signal(signal.SIGCONT)
    assert c.primary.wait(timeout=20) == EXIT_HALTED
    assert stale.sock is not None
    stale.sock.settimeout(10)
    try:
        leftover = stale.sock.recv(4096)
    except ConnectionResetError:
        leftover = b""
    assert leftover == b"", f"the old primary answered after the backup won: {leftover!r}"
    [decided] = events(c, "primary", "arbiter_decided")
    assert decided["won"] is False and decided["winner"] == candidate(c, "backup")


@needs_etcd
def test_tls_and_a_user_carry_a_failover(etcd, cluster, tmp_path: Path) -> None:
    members = etcd(3, tls=True)
    tls = etcd.client_tls
    password = enable_auth(members, tmp_path)
    flags = (*tls.flags(), "--etcd-user", "ftproxy", "--etcd-password-file", str(password))
    c = cluster(arbiter_address=members.address, arbiter_args=flags).start()
    assert KvClient(c.service_port).call("SET", "k", "v") == "OK"
    c.kill_primary()
    wait_until(lambda: role(c.backup_admin) == "live", 20, "the backup goes live")
    assert KvClient(c.service_port).call("GET", "k") == b"v"
    root = ("--user", "root:root-password-1")
    assert stored_winner(members, KEY, *root) == candidate(c, "backup")


@needs_etcd
def test_wrong_etcd_credentials_stop_a_replica_at_start(etcd, cluster, tmp_path: Path) -> None:
    members: EtcdCluster = etcd(1)
    enable_auth(members, tmp_path)
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    c = cluster(
        arbiter_address=f"etcd://ftproxy@{members.endpoints}?password-file={wrong}",
    )
    done = subprocess.run(c.replica_command("primary"), capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_HALTED, done.stderr
    assert "invalid user ID or password" in done.stderr
    assert "refused this replica" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_backup_asks_again_promptly_once_the_builtin_arbiter_is_back(cluster) -> None:
    c = cluster().start()
    c.arbiter.signal(signal.SIGKILL)
    c.arbiter.wait()
    c.kill_primary()
    wait_until(lambda: role(c.backup_admin) == "arbitrating", 10, "the backup asks the arbiter")
    # Long enough (logged at most once a second) that a backoff doubling from 50 ms
    # to 2 s, as it once did, would have grown past the bound.
    wait_until(
        lambda: len(events(c, "backup", "arbiter_unreachable")) >= 3, 20, "the backup retries"
    )
    c.start_arbiter()
    wait_until(lambda: role(c.backup_admin) == "live", 20, "the backup goes live")
    pauses = [e["retry_in"] for e in events(c, "backup", "arbiter_unreachable")]
    assert max(pauses) <= PEER_TIMEOUT_S / 4, pauses


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("etcd://a:1,b", "'b' is not HOST:PORT"),
        ("etcd://", "an empty endpoint"),
        ("zookeeper://a:1", "unknown scheme zookeeper://"),
        ("a-host-without-a-port", "expected HOST:PORT (the built-in arbiter) or etcd://"),
        ("etcd://a:1?ca=/x", "write etcds://"),
        ("etcd://u:hunter2@a:1", "a password never goes in the address"),
        ("etcd://a:1?colour=blue", "unknown option 'colour'"),
    ],
)
@pytest.mark.parametrize("command", ["primary", "backup"])
def test_a_malformed_arbiter_address_is_refused_at_start(
    command: str, address: str, expected: str
) -> None:
    flag = "--log-listen" if command == "primary" else "--primary"
    where = [flag, "127.0.0.1:1"]
    done = subprocess.run(
        [*FTPROXY, command, *where, "--arbiter", address, "--insecure", "--", "examples/kv.py"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "--arbiter" in done.stderr and expected in done.stderr, done.stderr
    assert "hunter2" not in done.stderr
    assert "Traceback" not in done.stderr


@needs_etcd
def test_run_nodes_boot_heal_and_record_their_log_address_in_etcd(etcd, cluster) -> None:
    """``ftproxy run``'s lookups (who is live, the boot claim) go through etcd too."""
    members = etcd(3)
    c = cluster(arbiter_address=members.address)
    ports = {name: (free_port(), free_port()) for name in ("x", "y")}
    nodes = {name: run_node(c, name, *ports[name], run=0) for name in ports}

    def protected(name: str, generation: int) -> bool:
        now = status(ports[name][1])
        return now["protected"] is True and now["generation"] == generation

    wait_until(lambda: any(protected(n, 1) for n in ports), 60, "the nodes form generation 1")
    booted = [
        n for n, p in nodes.items() if any(e.get("event") == "node_booting" for e in p.events())
    ]
    assert len(booted) == 1
    # The boot claim is etcd's key for generation 0, naming the booted node's log address.
    (first,) = booted
    assert stored_winner(members, "kv/generation/0").endswith(f" log=127.0.0.1:{ports[first][0]}")
    load = Load(c.service_port, clients=2).start()
    try:
        wait_until(lambda: load.acknowledged() > 50, 20, "the load is running")
        nodes[first].signal(signal.SIGKILL)
        nodes[first].wait()
        (other,) = set(ports) - {first}
        wait_until(lambda: role(ports[other][1]) == "live", 20, f"{other} is live")
        nodes[first] = run_node(c, first, *ports[first], run=1)
        wait_until(lambda: protected(other, 2), 60, "the restarted node protects the pair again")
        assert role(ports[first][1]) == "backup"
        acked = load.acknowledged()
        wait_until(lambda: load.acknowledged() > acked + 50, 20, "writes go on")
    finally:
        load.stop()
    load.verify(c.service_port)
    # The failover was decided in etcd too: generation 1's key names the node that went live.
    assert stored_winner(members, "kv/generation/1").endswith(f" log=127.0.0.1:{ports[other][0]}")
