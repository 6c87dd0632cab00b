"""``ftproxy lab``: namespaces, the bridge, processes, partitions, status, teardown.

These tests build real labs and so need root and ``ip netns``; each lab gets a
prefix of its own, so a lab a user has up is never touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from support import needs_lab, needs_nft

from ftproxy.tools import lab as labmod
from ftproxy.tools.lab import HOSTS, Lab, LabError

pytestmark = needs_lab

PREFIX = f"ftlt{os.getpid()}"

# An ICMP echo with a raw socket (no `ping` binary needed): exit 0 on a reply.
PING = textwrap.dedent(
    """
    import socket, struct, sys
    def checksum(b):
        s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
        s = (s >> 16) + (s & 0xFFFF)
        return ~(s + (s >> 16)) & 0xFFFF
    target = sys.argv[1]
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(float(sys.argv[2]))
    body = struct.pack("!BBHHH", 8, 0, 0, 0x1AB, 1) + b"ftlab-ping"
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    try:
        sock.sendto(body, (target, 0))
        while True:
            data, (source, _) = sock.recvfrom(2048)
            if source == target and data[20] == 0:
                sys.exit(0)
    except OSError as exc:
        print(exc)
        sys.exit(1)
    """
)

# Connect, send, read the echo: prints the reply, or the error's class.
CONNECT = textwrap.dedent(
    """
    import socket, sys
    try:
        conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0)
        conn.sendall(b"hello lab")
        print(conn.recv(100).decode())
    except OSError as exc:
        print(type(exc).__name__)
    """
)

ECHO_SERVER = textwrap.dedent(
    """
    import socket, sys
    server = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        conn.sendall(conn.recv(100))
        conn.close()
    """
)

# Count frames from a MAC arriving at an AF_PACKET socket on eth0 (the packet front's
# view of the wire) for a while.
SNIFF = textwrap.dedent(
    """
    import socket, sys, time
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    sock.bind(("eth0", 0))
    sock.settimeout(0.1)
    source = bytes.fromhex(sys.argv[1].replace(":", ""))
    print("ready", flush=True)
    count, deadline = 0, time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        try:
            frame = sock.recv(2048)
        except TimeoutError:
            continue
        count += frame[6:12] == source
    print(count)
    """
)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(PREFIX) as the_lab:
        yield the_lab


def _python(lab: Lab, host: str, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = lab.run(
        host,
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=15)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _ping(lab: Lab, source: str, target: str, timeout: float = 1.0) -> bool:
    return _python(lab, source, PING, lab.address(target), str(timeout)).returncode == 0


def _connect(lab: Lab, source: str, target: str, port: int) -> str:
    return _python(lab, source, CONNECT, lab.address(target), str(port)).stdout.strip()


@pytest.fixture
def echo_server(lab: Lab) -> Iterator[int]:
    """A TCP echo server on primary:7007."""
    port = 7007
    proc = lab.run(
        "primary",
        [sys.executable, "-c", ECHO_SERVER, lab.address("primary"), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield port
    finally:
        proc.kill()
        proc.communicate()


def _lab_names(prefix: str) -> tuple[set[str], set[str]]:
    """Namespaces and root-namespace links whose names start with ``prefix``."""
    netns = {n for n in labmod.namespaces() if n.startswith(prefix)}
    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, check=True).stdout)
    return netns, {str(link["ifname"]) for link in links if link["ifname"].startswith(prefix)}


# -- life cycle ------------------------------------------------------------------


def test_up_and_down_are_idempotent_and_leave_nothing_behind() -> None:
    prefix = PREFIX + "u"
    lab = Lab(prefix)
    try:
        assert lab.up() is True
        assert lab.is_up()
        assert lab.up() is False  # already up: nothing to do
        sleeper = lab.run("backup", ["sleep", "60"])
    finally:
        removed = lab.down()
    assert sorted(removed) == sorted(lab.all_namespaces())
    assert sleeper.wait(timeout=5) == -signal.SIGKILL  # down kills what runs inside
    assert lab.down() == []
    assert _lab_names(prefix) == (set(), set())
    root_addresses = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True).stdout
    assert "10.200.0." not in root_addresses


def test_partial_lab_is_refused_unless_forced() -> None:
    lab = Lab(PREFIX + "p")
    subprocess.run(["ip", "netns", "add", lab.namespace("backup")], check=True)
    try:
        with pytest.raises(LabError, match="partial lab"):
            lab.up()
        assert lab.up(force=True) is True
        assert lab.is_up()
    finally:
        lab.down()
    assert _lab_names(lab.prefix) == (set(), set())


def test_failed_up_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab(PREFIX + "r")
    real_ip = labmod._ip

    def failing_ip(*args: str, ns: str | None = None) -> str:
        if args[:2] == ("addr", "add") and ns == lab.namespace("arbiter"):
            raise LabError("injected failure")
        return real_ip(*args, ns=ns)

    monkeypatch.setattr(labmod, "_ip", failing_ip)
    with pytest.raises(LabError, match="injected failure"):
        lab.up()
    assert _lab_names(lab.prefix) == (set(), set())


# -- the network -----------------------------------------------------------------


def test_hosts_reach_each_other(lab: Lab) -> None:
    for host in HOSTS[1:]:
        assert _ping(lab, "client", host.name), host
    assert _ping(lab, "backup", "primary")


def test_vip_is_owned_by_no_kernel(lab: Lab) -> None:
    assert _python(lab, "client", PING, labmod.VIP, "0.5").returncode != 0


def test_tcp_echo_across_the_bridge(lab: Lab, echo_server: int) -> None:
    assert _connect(lab, "client", "primary", echo_server) == "hello lab"


def test_kill_stops_processes_in_one_host_only(lab: Lab) -> None:
    primary = [lab.run("primary", ["sleep", "60"]) for _ in range(2)]
    backup = lab.run("backup", ["sleep", "60"])
    try:
        # `ip netns exec` enters the namespace after the fork: wait until it did.
        started = {p.pid for p in primary}
        deadline = time.monotonic() + 10
        while not started <= set(lab.pids("primary")) or backup.pid not in lab.pids("backup"):
            assert time.monotonic() < deadline, "the processes never entered their namespaces"
            time.sleep(0.01)
        killed = lab.kill("primary")
        assert {p.pid for p in primary} <= set(killed)
        assert all(p.wait(timeout=5) == -signal.SIGKILL for p in primary)
        assert lab.pids("primary") == []
        assert backup.poll() is None
        assert lab.pids("backup") == [backup.pid]
    finally:
        backup.kill()
        backup.wait()


@needs_nft
def test_partition_cuts_a_host_off_and_heal_restores_it(lab: Lab, echo_server: int) -> None:
    lab.partition("primary")
    try:
        assert lab.cut_from("primary") == ["client", "backup", "arbiter"]
        assert _connect(lab, "client", "primary", echo_server) in {"TimeoutError", "OSError"}
        assert not _ping(lab, "arbiter", "primary", timeout=0.5)
        assert _ping(lab, "client", "backup")  # the others still talk
    finally:
        lab.heal("primary")
    assert lab.cut_from("primary") == []
    assert _connect(lab, "client", "primary", echo_server) == "hello lab"


@needs_nft
def test_partition_between_two_hosts(lab: Lab, echo_server: int) -> None:
    lab.partition("backup", ["primary"])
    try:
        assert lab.cut_from("backup") == ["primary"]
        assert not _ping(lab, "backup", "primary", timeout=0.5)
        assert _connect(lab, "client", "primary", echo_server) == "hello lab"
        assert _ping(lab, "backup", "arbiter")
    finally:
        lab.heal()
    assert lab.cuts() == set()
    assert _ping(lab, "backup", "primary")


@needs_nft
def test_partition_hides_the_wire_from_packet_sockets(lab: Lab) -> None:
    """The packet front reads eth0 with AF_PACKET, which sees frames before any
    netfilter hook in the host: the partition must stop them at the switch."""

    def frames_from_client_while_pinging() -> int:
        sniffer = lab.run(
            "primary",
            [sys.executable, "-c", SNIFF, lab.mac("client"), "0.8"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sniffer.stdout is not None and sniffer.stdout.readline().strip() == "ready"
        _ping(lab, "client", "primary", timeout=0.5)
        out, _ = sniffer.communicate(timeout=10)
        return int(out)

    assert frames_from_client_while_pinging() > 0  # the sniffer does see the wire
    lab.partition("primary")
    try:
        assert frames_from_client_while_pinging() == 0
    finally:
        lab.heal()


# -- the command -----------------------------------------------------------------


def _cli(*words: str) -> int:
    return labmod.main(["--prefix", PREFIX, *words])


@needs_nft
def test_status_json(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    sleeper = lab.run("arbiter", ["sleep", "60"])
    lab.partition("client")
    try:
        assert _cli("status", "--json") == 0
        status = json.loads(capsys.readouterr().out)
    finally:
        lab.heal()
        sleeper.kill()
        sleeper.wait()
    assert status["up"] is True and status["vip"] == labmod.VIP
    hosts = {h["name"]: h for h in status["hosts"]}
    assert list(hosts) == [h.name for h in HOSTS]
    for host in HOSTS:
        assert hosts[host.name]["address"] == host.address
        assert hosts[host.name]["mac"] == host.mac
    assert hosts["client"]["partitioned"] is True
    assert hosts["primary"]["cut_from"] == ["client"]
    assert [(p["pid"], p["command"]) for p in hosts["arbiter"]["processes"]] == [
        (sleeper.pid, "sleep 60")
    ]


def test_status_table(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("status") == 0
    out = capsys.readouterr().out
    for host in HOSTS:
        assert host.name in out and host.address in out and host.mac in out


def test_run_returns_the_commands_exit_code(lab: Lab) -> None:
    assert _cli("run", "client", "--", "sh", "-c", "exit 7") == 7
    assert _cli("run", "client", "sh", "-c", "exit 0") == 0


def test_cli_errors_are_one_line(
    lab: Lab, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _cli("kill", "nosuchhost") == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert _cli("kill", "client", "--signal", "NOPE") == 2
    assert "unknown signal" in capsys.readouterr().err
    assert labmod.main(["--prefix", PREFIX + "x", "run", "client", "--", "true"]) == 1
    assert "is not up" in capsys.readouterr().err
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert _cli("status") == 2
    assert capsys.readouterr().err == "ftproxy lab needs root (network namespaces)\n"
