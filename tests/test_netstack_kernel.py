"""The user-space stack against the Linux kernel's own TCP/IP, through a TAP device.

A network namespace ``ftns-test-<pid>`` holds a TAP device whose file descriptor
stays with this test: the kernel inside the namespace owns 10.201.0.1/24, and
the NetStack here answers for the VIP 10.201.0.100, which no kernel owns (so no
kernel sends RSTs for it). The test's loop moves frames between the TAP fd and
the stack, reading the real monotonic clock for the stack's time; clients run
inside the namespace with ``ip netns exec``. Everything is deleted on teardown.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from ftproxy.netstack import NetStack, TcpConnection, TcpListener, UdpSocket

KERNEL_IP = "10.201.0.1"
VIP = "10.201.0.100"
VMAC = b"\x02\x00\x00\xc9\x00\x64"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Tap:
    fd: int
    namespace: str


@pytest.fixture
def tap() -> Iterator[Tap]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun for a TAP device")
    namespace = f"ftns-test-{os.getpid()}"
    device = f"ftt{os.getpid()}"[:15]
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TAP | IFF_NO_PI))
        os.set_blocking(fd, False)
        _ip("netns", "add", namespace)
        try:
            _ip("link", "set", device, "netns", namespace)
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", namespace, "addr", "add", f"{KERNEL_IP}/24", "dev", device)
            _ip("-n", namespace, "link", "set", device, "up")
            yield Tap(fd, namespace)
        finally:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)
    finally:
        os.close(fd)  # a non-persistent TAP device goes away with its last fd


@dataclass
class Driver:
    """The forwarding loop: TAP fd <-> NetStack, optionally dropping frames (seeded)."""

    tap: Tap
    stack: NetStack
    drop: float = 0.0
    seed: int = 0
    dropped: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _lose(self) -> bool:
        if self.drop and self.rng.random() < self.drop:
            self.dropped += 1
            return True
        return False

    def run(self, done: Callable[[], bool], app: Callable[[], None], timeout: float) -> None:
        end = time.monotonic() + timeout
        fd = self.tap.fd
        while not done():
            if time.monotonic() > end:
                raise AssertionError("timed out")
            now = time.monotonic_ns()
            deadline = self.stack.next_deadline()
            wait = 0.05 if deadline is None else max(0.0, min(0.05, (deadline - now) / 1e9))
            select.select([fd], [], [], wait)
            for _ in range(256):
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not self._lose():
                    self.stack.receive_frame(frame, time.monotonic_ns())
            self.stack.on_time(time.monotonic_ns())
            app()
            for frame in self.stack.take_frames():
                if not self._lose():
                    os.write(fd, frame)


class EchoApp:
    """A TCP echo server and an upper-casing UDP responder on the stack."""

    def __init__(self, listener: TcpListener, udp: UdpSocket | None = None) -> None:
        self.listener = listener
        self.udp = udp
        self.conns: list[tuple[TcpConnection, bytearray]] = []
        self.finished: list[TcpConnection] = []

    def __call__(self) -> None:
        while (conn := self.listener.accept()) is not None:
            self.conns.append((conn, bytearray()))
        for conn, pending in self.conns:
            if conn in self.finished:
                continue
            if conn.error:
                self.finished.append(conn)
                continue
            while len(pending) < 256 * 1024:
                data = conn.recv(65536)
                if not data:
                    break
                pending += data
            if pending:
                del pending[: conn.send(pending)]
            if conn.eof and not pending and not conn.recv_buffered:
                conn.close()
                self.finished.append(conn)
        if self.udp is not None:
            while (got := self.udp.recvfrom()) is not None:
                self.udp.sendto(got[0].upper(), got[1])


def in_namespace(tap: Tap, script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            tap.namespace,
            sys.executable,
            "-c",
            textwrap.dedent(script),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


ECHO_CLIENT = """
    import random, socket, sys, threading
    size, seed = int(sys.argv[1]), int(sys.argv[2])
    data = random.Random(seed).randbytes(size)
    s = socket.create_connection(("10.201.0.100", 7), timeout=40)
    def send():
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send)
    t.start()
    got = bytearray()
    while chunk := s.recv(65536):
        got += chunk
    t.join()
    print("OK" if got == data else f"BAD {len(got)} of {len(data)}")
"""


def make_stack(seed: int = 1) -> NetStack:
    rng = random.Random(seed)
    return NetStack(VMAC, VIP, 24, random32=lambda: rng.getrandbits(32))


def echo_through(tap: Tap, size: int, drop: float, timeout: float) -> tuple[Driver, EchoApp]:
    stack = make_stack()
    app = EchoApp(stack.tcp_listen(7, backlog=8))
    driver = Driver(tap, stack, drop=drop, seed=5)
    client = in_namespace(tap, ECHO_CLIENT, str(size), "11")
    try:
        driver.run(lambda: client.poll() is not None, app, timeout)
        # let the stack finish its side of the close
        driver.run(lambda: bool(app.finished), app, 5)
    finally:
        if client.poll() is None:
            client.kill()
    out, err = client.communicate(timeout=5)
    assert out.strip() == "OK", (out, err, stack.stats)
    return driver, app


def test_kernel_tcp_echo_of_one_megabyte(tap: Tap) -> None:
    driver, app = echo_through(tap, 1_000_000, drop=0.0, timeout=40)
    (conn, _pending) = app.conns[0]
    assert conn.error == 0
    assert driver.stack.stats.get("tcp_rst_received", 0) == 0


def test_kernel_tcp_echo_with_five_percent_frame_loss(tap: Tap) -> None:
    driver, _app = echo_through(tap, 1_000_000, drop=0.05, timeout=45)
    assert driver.dropped > 20
    stats = driver.stack.stats
    assert stats.get("tcp_retransmits", 0) > 0 and stats.get("tcp_ooo_segments", 0) > 0


PING = """
    import socket, struct, time
    def csum(b):
        s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(5)
    ok = 0
    for seq in range(3):
        payload = b"ftproxy-ping-%03d" % seq
        hdr = struct.pack("!BBHHH", 8, 0, 0, 0x4242, seq)
        pkt = struct.pack("!BBHHH", 8, 0, csum(hdr + payload), 0x4242, seq) + payload
        s.sendto(pkt, ("10.201.0.100", 0))
        while True:
            data, addr = s.recvfrom(2048)
            icmp = data[(data[0] & 15) * 4:]
            kind, _code, _c, ident, rseq = struct.unpack("!BBHHH", icmp[:8])
            if kind == 0 and ident == 0x4242 and rseq == seq:
                ok += icmp[8:] == payload and csum(icmp) == 0
                break
    print("OK" if ok == 3 else f"BAD {ok}")
"""

UDP_CLIENT = """
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    answers = []
    for word in (b"alpha", b"beta", b"gamma"):
        s.sendto(word, ("10.201.0.100", 5353))
        data, addr = s.recvfrom(2048)
        answers.append(data == word.upper() and addr == ("10.201.0.100", 5353))
    print("OK" if all(answers) else f"BAD {answers}")
"""


def test_kernel_ping_and_udp(tap: Tap) -> None:
    stack = make_stack()
    app = EchoApp(stack.tcp_listen(7), stack.udp_bind(5353))
    driver = Driver(tap, stack)
    for script, stat in ((PING, "icmp_echo_replies"), (UDP_CLIENT, "udp_received")):
        proc = in_namespace(tap, script)
        try:
            driver.run(lambda proc=proc: proc.poll() is not None, app, 20)  # type: ignore[misc]
        finally:
            if proc.poll() is None:
                proc.kill()
        out, err = proc.communicate(timeout=5)
        assert out.strip() == "OK", (out, err, stack.stats)
        assert stack.stats[stat] == 3
    assert stack.arp_entries() == {KERNEL_IP: stack.arp_entries()[KERNEL_IP]}


ECHO_SERVER = """
    import socket
    srv = socket.create_server(("10.201.0.1", 9000))
    srv.settimeout(30)
    print("READY", flush=True)
    conn, addr = srv.accept()
    conn.settimeout(30)
    total = 0
    while chunk := conn.recv(65536):
        conn.sendall(chunk)
        total += len(chunk)
    conn.close()
    print("DONE", total, addr[0])
"""


def test_stack_connects_to_a_kernel_server(tap: Tap) -> None:
    stack = make_stack(seed=3)
    driver = Driver(tap, stack)
    server = in_namespace(tap, ECHO_SERVER)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "READY"
        conn = stack.tcp_connect(KERNEL_IP, 9000)
        data = random.Random(4).randbytes(500_000)
        got = bytearray()
        sent = 0

        def app() -> None:
            nonlocal sent
            if conn.connected and sent < len(data) and conn.writable():
                sent += conn.send(data[sent : sent + 65536])
                if sent == len(data):
                    conn.shutdown_write()
            while chunk := conn.recv(65536):
                got.extend(chunk)

        driver.run(lambda: conn.eof, app, 30)
        assert bytes(got) == data
        driver.run(lambda: server.poll() is not None, app, 10)
        out, err = server.communicate(timeout=5)
        assert out.split()[-3:] == ["DONE", str(len(data)), VIP], (out, err)
        assert conn.state.value == "TIME_WAIT" and conn.error == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


REFUSED_CLIENT = """
    import socket
    try:
        socket.create_connection(("10.201.0.100", 4444), timeout=5)
        print("CONNECTED")
    except ConnectionRefusedError:
        print("REFUSED")
"""


def test_kernel_connect_to_a_closed_port_is_refused(tap: Tap) -> None:
    stack = make_stack()
    driver = Driver(tap, stack)
    proc = in_namespace(tap, REFUSED_CLIENT)
    try:
        driver.run(lambda: proc.poll() is not None, lambda: None, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate(timeout=5)
    assert out.strip() == "REFUSED", (out, err)
    assert stack.stats["tcp_rst_sent"] >= 1


SLOW_READER_CLIENT = """
    import hashlib, random, socket
    data = random.Random(21).randbytes(400_000)
    s = socket.create_connection(("10.201.0.100", 7), timeout=30)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := s.recv(100):
        reply += chunk
    print("OK" if reply.decode() == hashlib.sha256(data).hexdigest() else f"BAD {reply!r}")
"""


def test_kernel_sender_waits_out_our_zero_window(tap: Tap) -> None:
    import hashlib

    stack = make_stack()
    listener = stack.tcp_listen(7)
    driver = Driver(tap, stack)
    conns: list[TcpConnection] = []
    digest = hashlib.sha256()
    start = time.monotonic()

    def app() -> None:
        if not conns and (conn := listener.accept()) is not None:
            conns.append(conn)
        if not conns or time.monotonic() - start < 1.0:
            return  # not reading: the window fills and shuts
        conn = conns[0]
        while chunk := conn.recv(65536):
            digest.update(chunk)
        if conn.eof and conn.state.value == "CLOSE_WAIT":
            conn.send(digest.hexdigest().encode())
            conn.close()

    proc = in_namespace(tap, SLOW_READER_CLIENT)
    try:
        driver.run(lambda: proc.poll() is not None, app, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate(timeout=5)
    assert out.strip() == "OK", (out, err, stack.stats)
    assert stack.stats["tcp_zero_windows_sent"] >= 1
