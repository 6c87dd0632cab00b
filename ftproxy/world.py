"""Answering exits from the world: the network front, the clock and entropy.

Record mode (``ftproxy.record``), a primary (``ftproxy.primary``) and a backup
gone live (``ftproxy.backup``) all answer their guest's exits this way; each
answer becomes a log entry through ``on_entry``. What happens to outputs (logged,
gated by the output rule) is the caller's business; ``apply_output`` puts one
on the wire.

The front is the socket front (socket mode: the supervisor terminates TCP and
UDP for the guest) or the packet front (packet mode: the guest runs its own
TCP/IP stack and the supervisor moves Ethernet frames).
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import structlog
import trio

from ftproxy.front import PacketConfig
from ftproxy.front.packet import PacketFront
from ftproxy.front.socket import AddressMap, Doorbell, SocketFront, resolve_name
from ftproxy.guest import protocol as p
from ftproxy.supervisor import Exit, GuestFailure
from ftproxy.wire import FORMAT_VERSION, Entry, Header, Network, Output, Policy

log = structlog.get_logger()

# The host environment a guest gets; everything else is left out so that the
# log (which pins the environment) carries no secrets by accident.
PASSED_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH")


def guest_environment(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The pinned environment for a new recording."""
    env = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
    env.update(extra)
    env["PYTHONHASHSEED"] = str(secrets.randbelow(2**32))
    # A .pyc written mid-run would change what the next run allocates at import.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def new_header(
    argv: Sequence[str], env: Mapping[str, str], policy: Policy, network: Network | None = None
) -> Header:
    return Header(
        version=FORMAT_VERSION,
        argv=list(argv),
        env=dict(env),
        cwd=os.getcwd(),
        python=sys.version,
        policy=policy,
        created_ns=time.time_ns(),
        network=network,
    )


def open_front(
    nursery: trio.Nursery,
    doorbell: Doorbell,
    address_map: AddressMap,
    packet: PacketConfig | None,
) -> Front:
    """The socket front, or the packet front when ``packet`` is set."""
    if packet is None:
        return SocketFront(nursery, doorbell, address_map)
    network = packet.network
    if network is None:
        raise ValueError("packet mode needs the virtual IP (--vip)")
    front = PacketFront(
        nursery,
        doorbell,
        packet.interface,
        network.mac,
        f"{network.ip}/{network.prefix_len}",
        drop_rate=packet.drop_rate,
        drop_seed=packet.drop_seed,
    )
    # Whoever opens the virtual MAC serves it from now on (a new primary, a
    # backup gone live): gratuitous ARP moves the switch's entry for it here.
    nursery.start_soon(front.announce_repeatedly)
    return front


class Front(Protocol):
    """What answering exits needs of a front, in either mode."""

    input_bytes: int

    def ready(self, readable: list[int], writable: list[int]) -> bool:
        """Would a wait for these sockets end now?"""
        ...

    def collect(self, readable: list[int], writable: list[int], pressured: list[int]) -> list[Any]:
        """Take every ready event for these sockets."""
        ...

    def apply(self, message: tuple[Any, ...]) -> None:
        """Put one guest output on the network; ValueError if this front has no such output."""
        ...

    def status(self) -> dict[str, Any]:
        """What ``ftproxy status`` shows of this front."""
        ...

    def close_all(self) -> None:
        """Let go of the network (the guest ended)."""
        ...


class WorldClock:
    """Clock snapshots for replies: real time, never behind the guest's virtual time.

    ``offset_ns`` shifts the host's monotonic clock, so that a backup gone live
    continues the guest's monotonic time from where the primary left it.
    """

    def __init__(self, policy: Policy, *, mono: int = 0, wall: int = 0, icount: int = 0) -> None:
        self._step = policy.clock_step_ns
        self._mono = mono
        self._wall = wall
        self._icount = icount
        self._offset = 0

    def continue_from(self, wall: int, mono: int, icount: int) -> None:
        """Take over a guest whose last snapshot was (wall, mono) at ``icount``."""
        self._wall, self._mono, self._icount = wall, mono, icount
        self._offset = max(0, mono - time.monotonic_ns())

    def virtual_mono(self, icount: int) -> int:
        return self._mono + (icount - self._icount) * self._step

    def snapshot(self, icount: int, floor_mono: int = 0) -> tuple[int, int]:
        advance = (icount - self._icount) * self._step
        mono = max(time.monotonic_ns() + self._offset, self._mono + advance, floor_mono)
        wall = max(time.time_ns(), self._wall + advance)
        self._mono, self._wall, self._icount = mono, wall, icount
        return wall, mono


async def _always_ready() -> None:
    return None


def output_record(seq: int, message: tuple[Any, ...]) -> Output:
    """The log record of one guest output message."""
    op = message[0]
    try:
        if op in (p.OP_SEND, p.OP_FRAME):
            _, sock, data = message
            return Output(seq, op, sock, data)
        if op == p.OP_SENDTO:
            _, sock, data, addr = message
            return Output(seq, op, sock, data, addr)
        if op == p.OP_SHUTDOWN:
            _, sock, how = message
            return Output(seq, op, sock, b"", how)
        _, sock = message
        return Output(seq, op, sock, b"")
    except ValueError:
        raise GuestFailure(f"malformed output {message!r:.80}") from None


class WorldAnswers:
    """Answer exits from the network front, the clock and entropy; log each answer."""

    def __init__(
        self,
        front: Front,
        doorbell: Doorbell,
        policy: Policy,
        guest_pid: int,
        on_entry: Callable[[Entry], None],
        *,
        network: Network | None = None,
        clock: WorldClock | None = None,
        input_allowed: Callable[[], Awaitable[None]] = _always_ready,
    ) -> None:
        self.front = front
        self._network = network
        self._doorbell = doorbell
        self._policy = policy
        self._pid = guest_pid
        self._on_entry = on_entry
        self.clock = clock or WorldClock(policy)
        self._input_allowed = input_allowed
        self._signals: list[int] = []

    def deliver_signal(self, signum: int) -> None:
        """Hand ``signum`` to the guest at its next wait."""
        self._signals.append(signum)
        self._doorbell.ring()

    async def answer(self, seq: int, exit: Exit) -> bytes:
        try:
            result, floor = await self._result(exit)
        except (TypeError, ValueError) as exc:
            raise GuestFailure(
                f"malformed {exit.kind_name} exit {exit.args!r:.80}: {exc}"
            ) from None
        wall, mono = self.clock.snapshot(exit.icount, floor)
        body = p.encode_body((wall, mono, result))
        self._on_entry(Entry(seq, exit.icount, exit.kind, exit.digest, body))
        return body

    async def _result(self, exit: Exit) -> tuple[Any, int]:
        kind, args = exit.kind, exit.args
        if kind == p.KIND_WAIT:
            return await self._wait(exit)
        if kind == p.KIND_BOOT:
            boot = (
                os.urandom(32),
                self._pid,
                self._policy.exit_every,
                self._policy.clock_step_ns,
                socket.gethostname(),
                None if self._network is None else self._network.boot_value(),
            )
            return boot, 0
        if kind == p.KIND_RESOLVE:
            return await resolve_name(*args), 0
        front = self.front
        if isinstance(front, SocketFront):
            if kind == p.KIND_BIND:
                return front.bind(*args), 0
            if kind == p.KIND_LISTEN:
                return front.listen(*args), 0
            if kind == p.KIND_CONNECT:
                return await front.connect(*args), 0
        elif kind in (p.KIND_BIND, p.KIND_LISTEN, p.KIND_CONNECT):
            raise GuestFailure(
                f"a {exit.kind_name} exit in packet mode: the guest's own stack answers those"
            )
        raise GuestFailure(f"unknown exit kind {kind}")

    async def _wait(self, exit: Exit) -> tuple[list[Any], int]:
        timeout_ns, readable, writable, pressured = exit.args
        started = self.clock.virtual_mono(exit.icount)
        deadline = math.inf if timeout_ns < 0 else trio.current_time() + timeout_ns / 1e9
        timed_out = False
        # Flow control: while the backup lags too far, the guest gets no new input.
        await self._input_allowed()
        while not (self._signals or self.front.ready(readable, writable)):
            if timeout_ns == 0:
                break
            if trio.current_time() >= deadline:
                timed_out = True
                break
            with trio.move_on_at(deadline):
                await self._doorbell.wait()
        events: list[Any] = [(p.EV_SIGNAL, s) for s in self._signals]
        self._signals.clear()
        events += self.front.collect(readable, writable, pressured)
        return events, (started + timeout_ns if timed_out else 0)

    def apply_output(self, message: tuple[Any, ...]) -> None:
        """Put one guest output on the real network."""
        try:
            self.front.apply(message)
        except (TypeError, ValueError, IndexError) as exc:
            raise GuestFailure(f"malformed output {message!r:.80}: {exc}") from None
