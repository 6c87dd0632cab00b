"""Packet mode's guest side: unmodified services on the guest's own TCP/IP stack.

A real guest process runs under a real supervisor in record mode; the packet
front is replaced by ``StackWire`` (an in-process Ethernet to a client
``NetStack``), so these tests need neither root nor an interface. Each
recording is then replayed: the frames the guest transmits, every one an
output, must come out byte for byte the same.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from packetwire import StackWire
from support import EXAMPLES, GUESTS

from ftproxy.core.records import End, Network, Output, Policy
from ftproxy.log.file import LogWriter, read_log
from ftproxy.netstack import TcpConnection
from ftproxy.shell.front import mac_for_ip
from ftproxy.shell.guestproc import start_guest
from ftproxy.shell.record import RecordMode
from ftproxy.shell.replay import replay
from ftproxy.shell.supervisor import Supervisor
from ftproxy.shell.sync import Doorbell
from ftproxy.shell.world import WorldAnswers, guest_environment, new_header
from ftproxy.tools.resp import encode_command as resp

VIP = "10.200.0.100"
NETWORK = Network(mac=mac_for_ip(VIP), ip=VIP, prefix_len=24)


@dataclass
class Session:
    wire: StackWire
    world: WorldAnswers
    log: Path


@asynccontextmanager
async def recorded_guest(
    tmp_path: Path, argv: list[str], *, drop_rate: float = 0.0
) -> AsyncIterator[Session]:
    """Record ``argv`` as a packet-mode guest on a StackWire; SIGTERM it on the way out."""
    policy = Policy(200, 1000)
    env = guest_environment()
    header = new_header(argv, env, policy, NETWORK)
    log_path = tmp_path / "packet.ftlog"
    writer = LogWriter(str(log_path), header)
    doorbell = Doorbell()
    wire = StackWire(doorbell, drop_rate=drop_rate, seed=7)
    try:
        async with trio.open_nursery() as nursery:
            guest = await start_guest(argv, env, header.cwd)
            world = WorldAnswers(wire, doorbell, policy, guest.pid, writer.append, network=NETWORK)
            supervisor = Supervisor(guest, RecordMode(world, writer))
            nursery.start_soon(wire.run_timers)
            nursery.start_soon(supervisor.run)
            yield Session(wire, world, log_path)
            world.deliver_signal(int(signal.SIGTERM))
            with trio.fail_after(20):
                returncode = await guest.wait()
            writer.append(End("guest_exited", returncode))
            await guest.aclose()
            nursery.cancel_scope.cancel()
    finally:
        writer.close()


async def connect(wire: StackWire, port: int) -> TcpConnection:
    conn = wire.client.tcp_connect(VIP, port)
    wire.poke()
    await wire.until(lambda: conn.connected or bool(conn.error))
    assert not conn.error, f"connect failed: errno {conn.error}"
    return conn


async def exchange(wire: StackWire, conn: TcpConnection, data: bytes, until: bytes) -> bytes:
    """Send ``data``, then read until the reply ends with ``until``."""
    view = memoryview(data)
    received = b""

    def progress() -> bool:
        nonlocal view, received
        if view:
            view = view[conn.send(view) :]
        chunk = conn.recv(1 << 20)
        if chunk:
            received += chunk
        wire.poke()
        return not view and received.endswith(until)

    progress()
    await wire.until(progress, timeout=30)
    return received


def replay_matches(log_path: Path) -> None:
    contents = read_log(log_path)
    outputs = [r for r in contents.records if isinstance(r, Output)]
    assert outputs, "the guest transmitted no frame"
    result = trio.run(lambda: replay(contents, stdout=subprocess.DEVNULL))
    assert result.entries == contents.entries
    assert result.outputs == len(outputs)
    assert result.output_bytes == sum(len(o.data) for o in outputs)


async def run_and_replay(
    tmp_path: Path, argv: list[str], body: Callable[[StackWire], Awaitable[None]], **kw: float
) -> None:
    async with recorded_guest(tmp_path, argv, **kw) as session:
        await body(session.wire)
    await trio.to_thread.run_sync(replay_matches, session.log)


async def test_socketserver_echo_answers_over_the_guest_stack(tmp_path: Path) -> None:
    async def body(wire: StackWire) -> None:
        conn = await connect(wire, 7007)
        lines = b"".join(b"line %d\n" % i for i in range(50))
        assert await exchange(wire, conn, lines, b"line 49\n") == lines
        conn.close()
        wire.poke()

    await run_and_replay(tmp_path, [str(EXAMPLES / "echo.py"), "--port", "7007"], body)


async def test_kv_serves_two_connections_and_replays(tmp_path: Path) -> None:
    async def body(wire: StackWire) -> None:
        first = await connect(wire, 6380)
        second = await connect(wire, 6380)
        for i in range(1, 21):
            conn = first if i % 2 else second
            assert await exchange(wire, conn, resp("INCR", "n"), b"\r\n") == b":%d\r\n" % i
        big = "x" * 200_000  # many segments, windows and acks each way
        assert await exchange(wire, first, resp("SET", "big", big), b"+OK\r\n") == b"+OK\r\n"
        reply = await exchange(wire, second, resp("GET", "big"), big.encode() + b"\r\n")
        assert reply == b"$200000\r\n" + big.encode() + b"\r\n"

    await run_and_replay(tmp_path, [str(EXAMPLES / "kv.py"), "--port", "6380"], body)


async def test_asyncio_chat_runs_on_the_guest_stack(tmp_path: Path) -> None:
    async def body(wire: StackWire) -> None:
        alice = await connect(wire, 7008)
        bob = await connect(wire, 7008)
        greeting = await exchange(wire, alice, b"/nick alice\n", b"\n")
        assert greeting
        await exchange(wire, bob, b"/nick bob\n", b"\n")
        heard = await exchange(wire, alice, b"hello bob\n", b"\n")
        assert heard
        await wire.until(lambda: b"hello bob" in (bob.recv(1 << 16) or b""))

    await run_and_replay(tmp_path, [str(EXAMPLES / "chat.py"), "--port", "7008"], body)


async def test_tcp_delivers_every_byte_in_order_under_loss(tmp_path: Path) -> None:
    async def body(wire: StackWire) -> None:
        conn = await connect(wire, 7007)
        data = b"".join(b"%07d\n" % i for i in range(20_000))  # 160 kB
        assert await exchange(wire, conn, data, b"0019999\n") == data
        assert wire.dropped > 10

    argv = [str(EXAMPLES / "echo.py"), "--port", "7007"]
    await run_and_replay(tmp_path, argv, body, drop_rate=0.05)


async def test_udp_request_and_response(tmp_path: Path) -> None:
    async def body(wire: StackWire) -> None:
        udp = wire.client.udp_bind(40000)
        got: list[bytes] = []

        def answered() -> bool:
            datagram = udp.recvfrom()
            if datagram is not None:
                got.append(datagram[0])
            return bool(got)

        for i in range(5):
            udp.sendto(b"ping %d" % i, (VIP, 9999))
            wire.poke()
            await wire.until(answered)
            assert got == [b"%d:ping %d" % (i + 1, i)]
            got.clear()

    await run_and_replay(tmp_path, [str(GUESTS / "udp_echo.py"), "9999"], body)


def test_guest_module_imports_no_stack_in_socket_mode() -> None:
    code = (
        "import sys, ftproxy.guest._runtime, ftproxy.guest._install;"
        "print(any(m.startswith('ftproxy.netstack') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


async def test_connections_never_accepted_end_with_their_listener(tmp_path: Path) -> None:
    async def body(wire: StackWire) -> None:
        conn = await connect(wire, 7100)  # queued by the stack, never accepted
        control = wire.client.udp_bind(40001)
        control.sendto(b"close it", (VIP, 7101))
        wire.poke()
        await wire.until(lambda: control.recvfrom() is not None)
        await wire.until(lambda: conn.eof or bool(conn.error))

    await run_and_replay(tmp_path, [str(GUESTS / "close_listener.py"), "7100"], body)
