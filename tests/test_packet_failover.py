"""Packet mode end to end in the namespace lab: connections, ICMP and UDP survive failover.

Every test runs real ``ftproxy`` processes inside an ``ftproxy lab`` (client,
primary, backup and arbiter hosts on one bridge) and drives them from a kernel
client in the client host, as a user would: the primary's guest owns the
virtual IP with its own TCP/IP stack, the supervisor moves raw frames, and a
backup that goes live announces the VIP with a gratuitous ARP. The client's
single TCP connection must carry on across a SIGKILL or a partition of the
primary, with every request answered exactly once.

They need root and ``ip netns``; the lab gets a prefix of its own (a user's
lab is never touched) and is torn down, its processes killed, even on failure.
Synchronisation is on what the processes print (the client's replies on its
stdout, the replicas' JSON events on their stderr), each wait with a deadline.
"""

from __future__ import annotations

import base64
import functools
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import EXAMPLES, FTPROXY, GUESTS, ROOT, needs_lab, needs_nft

from ftproxy.tools import etcdlocal
from ftproxy.tools.lab import HOST_NAMES, VIP, Lab
from ftproxy.tools.procs import Proc, wait_until

pytestmark = needs_lab
needs_ping = pytest.mark.skipif(shutil.which("ping") is None, reason="needs `ping` (iputils-ping)")
needs_etcd = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="needs etcd (Debian: apt-get install etcd-server)"
)
needs_redis_cli = pytest.mark.skipif(
    shutil.which("redis-cli") is None, reason="needs `redis-cli` (redis-tools)"
)

PREFIX = f"ftpk{os.getpid()}"
VIP_NET = f"{VIP}/24"
KV_PORT = 6380
ECHO_PORT = 7007
UDP_PORT = 7009
LOG_PORT = 7000
ARBITER_PORT = 7100
ETCD_PORTS = (2379, 2380)  # each member's client and peer ports, on its host's address

# INCR on ONE connection until stdin closes; one line per reply: "<value> <local port>".
# Never reconnects: any error (reset, timeout, a wrong reply) ends it with a traceback
# and a non-zero exit. The 5 ms pause between requests is pacing, not synchronisation.
INCR_CLIENT = textwrap.dedent(
    """
    import select, socket, sys
    host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    replies = sock.makefile("rb")
    request = b"*2\\r\\n$4\\r\\nINCR\\r\\n$%d\\r\\n%s\\r\\n" % (len(key), key)
    while not select.select([sys.stdin], [], [], 0.005)[0]:
        sock.sendall(request)
        line = replies.readline()
        if not (line.startswith(b":") and line.endswith(b"\\r\\n")):
            sys.exit(f"bad reply {line!r}")
        print(int(line[1:-2]), sock.getsockname()[1], flush=True)
    sock.close()
    """
)

# Send each argument as a datagram from one socket; print each answer; exit 1 on a
# timeout or an answer from anywhere but the service.
UDP_CLIENT = textwrap.dedent(
    """
    import socket, sys
    service = (sys.argv[1], int(sys.argv[2]))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3.0)
    for word in sys.argv[3:]:
        sock.sendto(word.encode(), service)
        data, source = sock.recvfrom(2048)
        if source != service:
            sys.exit(f"answer from {source}, not {service}")
        print(data.decode(), flush=True)
    """
)

# Stream SIZE seeded-random bytes through an echo service on one connection (a
# thread sends while the main thread reads) and check every byte comes back in order.
STREAM_CLIENT = textwrap.dedent(
    """
    import random, socket, sys, threading, time
    host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data = random.Random(1).randbytes(size)
    sock = socket.create_connection((host, port), timeout=30)
    started = time.monotonic()
    def send():
        for at in range(0, size, 8192):
            sock.sendall(data[at : at + 8192])
    sender = threading.Thread(target=send)
    sender.start()
    received = bytearray()
    while len(received) < size:
        chunk = sock.recv(65536)
        if not chunk:
            sys.exit(f"connection closed after {len(received)} of {size} bytes")
        received += chunk
    sender.join()
    sock.close()
    if bytes(received) != data:
        first = next(i for i, (a, b) in enumerate(zip(received, data)) if a != b)
        sys.exit(f"bytes differ from offset {first}")
    print(f"ok {len(received)} {time.monotonic() - started:.2f}", flush=True)
    """
)


# -- processes in the lab --------------------------------------------------------


class LabProcess(Proc):
    """A process in a lab host (ftproxy.tools.procs' harness, started through
    ``lab.run``): stdout lines kept with their arrival times, stderr read as JSON
    events; every failed wait says what the process printed and logged."""

    def __init__(
        self,
        lab: Lab,
        host: str,
        name: str,
        argv: list[str],
        log_dir: Path,
        *,
        stdin: bool = False,
    ) -> None:
        super().__init__(
            name,
            argv,
            log_dir,
            cwd=ROOT,
            launch=functools.partial(lab.run, host),
            stdin=stdin,
            pipes=True,
        )

    def describe(self) -> str:
        code = self.popen.poll()
        tail = "\n".join(self.stderr().splitlines()[-25:])
        out = "\n".join(self.stdout_lines()[-10:])
        return f"{self.name} (exit {code}):\n-- stdout tail:\n{out}\n-- stderr tail:\n{tail}"

    def wait_stdout(
        self, done: Callable[[list[str]], bool], timeout: float, what: str
    ) -> list[str]:
        """Wait until ``done(lines)`` holds for the stdout lines so far."""
        try:
            return self.wait_for_lines(done, timeout, what)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from None

    def wait_marker(self, marker: str, timeout: float = 30.0) -> None:
        self.wait_stdout(
            lambda lines: any(marker in line for line in lines),
            timeout,
            f"{self.name} prints {marker!r}",
        )

    def wait_count(self, count: int, timeout: float) -> list[str]:
        return self.wait_stdout(
            lambda lines: len(lines) >= count, timeout, f"{self.name} prints {count} lines"
        )

    def has_event(self, name: str, **fields: Any) -> bool:
        return any(
            e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
            for e in self.events()
        )

    def wait_event(self, name: str, timeout: float, **fields: Any) -> None:
        """Wait until the stderr log holds this event (polling the file, with a deadline)."""
        try:
            wait_until(
                lambda: self.has_event(name, **fields),
                timeout,
                f"{self.name} logs {name} {fields}",
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from None

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return super().wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s") from None


class Deployment:
    """The processes one test starts in the lab; all killed, partitions healed, at the end."""

    def __init__(self, lab: Lab, tmp: Path, secret: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.secret = secret
        self.processes: list[LabProcess] = []

    def start(self, host: str, name: str, argv: list[str], *, stdin: bool = False) -> LabProcess:
        process = LabProcess(self.lab, host, name, argv, self.tmp, stdin=stdin)
        self.processes.append(process)
        return process

    def ftproxy(self, host: str, name: str, *args: str) -> LabProcess:
        return self.start(host, name, [*FTPROXY, *args])

    def python(
        self, host: str, name: str, script: str, *args: str, stdin: bool = False
    ) -> LabProcess:
        return self.start(host, name, [sys.executable, "-c", script, *args], stdin=stdin)

    def arbiter(self) -> LabProcess:
        process = self.ftproxy(
            "arbiter",
            "arbiter",
            "arbiter",
            "--listen",
            f"{self.lab.address('arbiter')}:{ARBITER_PORT}",
            "--data-dir",
            str(self.tmp / "arbiter-data"),
            "--secret-file",
            str(self.secret),
        )
        process.wait_event("arbiter_listening", 30)
        return process

    def etcd(self) -> str:
        """One etcd member on each of the primary, backup and arbiter hosts (a cluster of
        three); return the ``--arbiter`` address naming all three."""
        hosts = ("primary", "backup", "arbiter")
        members = etcdlocal.plan_members(
            self.tmp / "etcd", [self.lab.address(h) for h in hosts], ports=[ETCD_PORTS] * 3
        )
        for host, member in zip(hosts, members, strict=True):
            self.start(host, f"etcd-{host}", member.command)
        return "etcd://" + ",".join(member.endpoint for member in members)

    def pair(
        self,
        *guest: str,
        marker: str = "listening",
        arbiter: str | None = None,
        primary_args: tuple[str, ...] = (),
    ) -> tuple[LabProcess, LabProcess]:
        """Arbiter (the built-in one unless ``arbiter`` names another), primary and backup
        in packet mode for ``guest``, both guests up."""
        if arbiter is None:
            self.arbiter()
        common = (
            "--arbiter",
            arbiter or f"{self.lab.address('arbiter')}:{ARBITER_PORT}",
            "--secret-file",
            str(self.secret),
            "--front",
            "packet",
        )
        log_address = f"{self.lab.address('primary')}:{LOG_PORT}"
        primary = self.ftproxy(
            "primary",
            "primary",
            "primary",
            "--log-listen",
            log_address,
            *common,
            "--vip",
            VIP_NET,
            *primary_args,
            "--",
            *guest,
        )
        backup = self.ftproxy(
            "backup", "backup", "backup", "--primary", log_address, *common, "--", *guest
        )
        try:
            primary.wait_marker(marker)
            backup.wait_marker(marker)
            # The VIP's MAC is the same in every test: until the new primary announces
            # it, the switch may still send its frames to the last test's backup.
            primary.wait_event("gratuitous_arp_sent", 20)
        except AssertionError as exc:
            if backup.has_event("primary_lost"):
                raise AssertionError(
                    "the pair failed over by itself before serving: the backup heard "
                    f"nothing from the primary for the peer timeout\n{exc}\n{backup.describe()}"
                ) from None
            raise
        assert not backup.has_event("primary_lost"), backup.describe()
        return primary, backup

    def close(self) -> None:
        for process in self.processes:
            process.stop()
        self.lab.heal()
        for host in HOST_NAMES:
            self.lab.kill(host)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(PREFIX) as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "secret"
    path.write_bytes(base64.b64encode(secrets.token_bytes(32)) + b"\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def deploy(lab: Lab, tmp_path: Path, secret: Path) -> Iterator[Deployment]:
    deployment = Deployment(lab, tmp_path, secret)
    try:
        yield deployment
    finally:
        deployment.close()


def _kv(*extra: str) -> tuple[str, ...]:
    return (str(EXAMPLES / "kv.py"), "--port", str(KV_PORT), *extra)


def _in(lab: Lab, host: str) -> list[str]:
    """The prefix that runs a command inside ``host``, for ``subprocess.run``."""
    return ["ip", "netns", "exec", lab.namespace(host)]


def _ping(lab: Lab) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_in(lab, "client"), "ping", "-c", "1", "-W", "2", VIP],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )


def _check_incr_replies(client: LabProcess) -> tuple[int, float]:
    """Every reply the next INCR value, all on one local port; (replies, longest gap)."""
    timed = client.timed_lines()
    values = [int(line.split()[0]) for _, line in timed]
    ports = {line.split()[1] for _, line in timed}
    assert values == list(range(1, len(values) + 1)), f"INCR replies not consecutive: {values}"
    assert len(ports) == 1, f"the client's local port changed: {ports}"
    gap = max((b - a for (a, _), (b, _) in itertools.pairwise(timed)), default=0.0)
    return len(values), gap


def _stop_client(client: LabProcess) -> None:
    """Close the client's stdin (its signal to stop) and expect a clean exit."""
    client.close_stdin()
    code = client.wait(15)
    assert code == 0, client.describe()


# -- TCP: one kernel connection through failover -----------------------------------

BEFORE = 100  # replies before the failure
AFTER = 50  # replies the same connection must carry after the backup is live


def test_one_connection_survives_sigkill_of_the_primary(deploy: Deployment) -> None:
    primary, backup = deploy.pair(*_kv())
    client = deploy.python("client", "client", INCR_CLIENT, VIP, str(KV_PORT), "n", stdin=True)
    client.wait_count(BEFORE, 30)

    deploy.lab.kill("primary")
    assert primary.wait(10) == -signal.SIGKILL
    backup.wait_event("role_changed", 20, to="live")
    live_at = len(client.stdout_lines())
    client.wait_count(live_at + AFTER, 30)
    _stop_client(client)

    replies, gap = _check_incr_replies(client)
    assert replies >= BEFORE + AFTER
    assert gap < 10.0, f"the connection stalled for {gap:.2f}s"
    assert backup.popen.poll() is None, backup.describe()


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["sigusr1", "leave"])
def test_one_connection_survives_a_planned_switchover(deploy: Deployment, signum: int) -> None:
    """SIGUSR1 (or SIGTERM with --on-sigterm leave) hands the service over: the same
    kernel connection goes on, no reset, every INCR answered exactly once, and the old
    primary exits 0."""
    primary, backup = deploy.pair(*_kv(), primary_args=("--on-sigterm", "leave"))
    client = deploy.python("client", "client", INCR_CLIENT, VIP, str(KV_PORT), "n", stdin=True)
    client.wait_count(BEFORE, 30)

    primary.popen.send_signal(signum)
    backup.wait_event("role_changed", 20, to="live", switchover=True)
    assert primary.wait(20) == 0, primary.describe()
    assert primary.has_event("handover_sent") and primary.has_event("replica_retired")
    live_at = len(client.stdout_lines())
    client.wait_count(live_at + AFTER, 30)
    _stop_client(client)

    replies, gap = _check_incr_replies(client)
    assert replies >= BEFORE + AFTER
    assert gap < 10.0, f"the connection stalled for {gap:.2f}s"
    assert not backup.has_event("primary_lost"), backup.describe()
    assert backup.popen.poll() is None, backup.describe()


@needs_nft
def test_one_connection_survives_a_partition_and_the_old_primary_halts(
    deploy: Deployment,
) -> None:
    primary, backup = deploy.pair(*_kv())
    client = deploy.python("client", "client", INCR_CLIENT, VIP, str(KV_PORT), "n", stdin=True)
    client.wait_count(BEFORE, 30)

    deploy.lab.partition("primary")
    backup.wait_event("role_changed", 20, to="live")
    live_at = len(client.stdout_lines())
    client.wait_count(live_at + AFTER, 30)
    # Cut off, the primary lost its backup and cannot reach the arbiter: it must wait.
    primary.wait_event("role_changed", 10, to="arbitrating")
    assert primary.popen.poll() is None, primary.describe()
    assert not primary.has_event("arbiter_decided"), primary.describe()

    deploy.lab.heal()
    # Back on the network, the primary hears that it lost the arbiter, and halts.
    code = primary.wait(30)
    assert code == 4, f"expected EXIT_HALTED (4)\n{primary.describe()}"
    assert primary.has_event("role_changed", to="halted"), primary.describe()
    assert primary.has_event("replica_halted"), primary.describe()
    assert not primary.has_event("role_changed", to="live"), primary.describe()

    # The connection goes on with the new primary after the old one came back.
    healed_at = len(client.stdout_lines())
    client.wait_count(healed_at + 20, 30)
    _stop_client(client)
    replies, gap = _check_incr_replies(client)
    assert replies >= BEFORE + AFTER + 20
    assert gap < 10.0, f"the connection stalled for {gap:.2f}s"


@needs_nft
@needs_etcd
def test_etcd_on_three_hosts_decides_a_partition_of_the_primary_and_its_member(
    deploy: Deployment,
) -> None:
    """The partition cuts off the primary and the etcd member on its host: the other two
    members are a quorum, so the backup wins; the primary's own member cannot answer."""
    primary, backup = deploy.pair(*_kv(), arbiter=deploy.etcd())
    client = deploy.python("client", "client", INCR_CLIENT, VIP, str(KV_PORT), "n", stdin=True)
    client.wait_count(BEFORE, 30)

    deploy.lab.partition("primary")
    backup.wait_event("arbiter_decided", 30, won=True, arbiter="etcd")
    backup.wait_event("role_changed", 20, to="live")
    live_at = len(client.stdout_lines())
    client.wait_count(live_at + AFTER, 30)
    # Cut off with a member that has lost its quorum: the primary must wait.
    primary.wait_event("role_changed", 10, to="arbitrating")
    primary.wait_event("arbiter_unreachable", 20)
    assert primary.popen.poll() is None, primary.describe()
    assert not primary.has_event("arbiter_decided"), primary.describe()

    deploy.lab.heal()
    code = primary.wait(30)
    assert code == 4, f"expected EXIT_HALTED (4)\n{primary.describe()}"
    assert primary.has_event("arbiter_decided", won=False, arbiter="etcd"), primary.describe()
    assert not primary.has_event("role_changed", to="live"), primary.describe()
    healed_at = len(client.stdout_lines())
    client.wait_count(healed_at + 20, 30)
    _stop_client(client)
    replies, gap = _check_incr_replies(client)
    assert replies >= BEFORE + AFTER + 20
    assert gap < 10.0, f"the connection stalled for {gap:.2f}s"


# -- ICMP and UDP through failover -------------------------------------------------


@needs_ping
def test_ping_answers_before_and_after_failover(deploy: Deployment) -> None:
    _, backup = deploy.pair(*_kv())
    before = _ping(deploy.lab)
    assert before.returncode == 0, before.stdout + before.stderr

    deploy.lab.kill("primary")
    backup.wait_event("gratuitous_arp_sent", 20)
    after = _ping(deploy.lab)
    assert after.returncode == 0, after.stdout + after.stderr + backup.describe()


def test_udp_request_response_before_and_after_failover(deploy: Deployment) -> None:
    _, backup = deploy.pair(str(GUESTS / "udp_echo.py"), str(UDP_PORT))

    def ask(*words: str) -> list[str]:
        client = deploy.python("client", "udp-client", UDP_CLIENT, VIP, str(UDP_PORT), *words)
        code = client.wait(20)
        assert code == 0, client.describe()
        client.stop()  # the reader thread has every line once the pipe closed
        return client.stdout_lines()

    assert ask("a", "b", "c") == ["1:a", "2:b", "3:c"]
    deploy.lab.kill("primary")
    backup.wait_event("gratuitous_arp_sent", 20)
    assert ask("d", "e") == ["4:d", "5:e"]  # the backup carries the count on


# -- recording in the lab: replay equality, and TCP under loss ---------------------


def _record(deploy: Deployment, log: Path, *args: str) -> LabProcess:
    return deploy.ftproxy(
        "primary",
        "record",
        "record",
        "--front",
        "packet",
        "--vip",
        VIP_NET,
        "--log",
        str(log),
        *args,
    )


def _replay(log: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FTPROXY, "replay", "--quiet-guest", str(log)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


@needs_redis_cli
def test_packet_log_recorded_in_the_lab_replays_equal(deploy: Deployment) -> None:
    log = deploy.tmp / "kv.ftlog"
    record = _record(deploy, log, "--", *_kv())
    record.wait_marker("listening")
    commands = "SET greeting hello\nINCR n\nINCR n\nGET greeting\nDEL greeting\nGET greeting\n"
    done = subprocess.run(
        [*_in(deploy.lab, "client"), "redis-cli", "-h", VIP, "-p", str(KV_PORT)],
        input=commands,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["OK", "1", "2", "hello", "1"], done.stdout

    record.popen.send_signal(signal.SIGINT)
    assert record.wait(20) == 0, record.describe()
    replayed = _replay(log)
    assert replayed.returncode == 0, replayed.stderr
    assert "identical to the recording" in replayed.stderr


STREAM_BYTES = 200_000


def test_netstack_tcp_delivers_every_byte_in_order_under_loss(deploy: Deployment) -> None:
    log = deploy.tmp / "echo.ftlog"
    echo = (str(EXAMPLES / "echo.py"), "--port", str(ECHO_PORT))
    record = _record(deploy, log, "--drop-rate", "0.05", "--drop-seed", "1", "--", *echo)
    record.wait_marker("listening")
    client = deploy.python("client", "stream", STREAM_CLIENT, VIP, str(ECHO_PORT), "200000")
    code = client.wait(60)
    assert code == 0, client.describe()
    client.stop()
    assert client.stdout_lines()[-1].startswith(f"ok {STREAM_BYTES} "), client.describe()

    record.popen.send_signal(signal.SIGINT)
    assert record.wait(20) == 0, record.describe()
    closed = [e for e in record.events() if e.get("event") == "packet_front_closed"]
    assert closed, record.describe()
    lost = closed[-1]["frames_dropped_in"] + closed[-1]["frames_dropped_out"]
    assert lost > 0, f"no frame was dropped: {closed[-1]}"
    replayed = _replay(log)  # retransmissions and all, the lossy run replays exactly
    assert replayed.returncode == 0, replayed.stderr
    assert "identical to the recording" in replayed.stderr
