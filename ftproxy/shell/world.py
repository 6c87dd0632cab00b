"""Answering exits from the world: the network front, the clock and entropy.

Record mode (``ftproxy.shell.record``), a primary (``ftproxy.shell.primary``) and a backup
gone live (``ftproxy.shell.backup``) all answer their guest's exits this way; each
answer becomes a log entry through ``on_entry``. What happens to outputs (logged,
gated by the output rule) is the caller's business; ``apply_output`` puts one
on the wire, ``output_later`` once the guest runs again (``flush_outputs``).

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

from ftproxy.core.records import FORMAT_VERSION, Entry, Header, Network, Output, Policy
from ftproxy.guest import _trace, protocol
from ftproxy.shell.front import PacketConfig
from ftproxy.shell.front.packet import PacketFront
from ftproxy.shell.front.socket import AddressMap, SocketFront, resolve_name
from ftproxy.shell.spin import spinner
from ftproxy.shell.startfiles import pinned_paths, start_files
from ftproxy.shell.supervisor import Exit, GuestFailure
from ftproxy.shell.sync import Doorbell

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
    argv: Sequence[str],
    env: Mapping[str, str],
    policy: Policy,
    network: Network | None = None,
    pins: Sequence[str] = (),
) -> Header:
    cwd = os.getcwd()
    return Header(
        version=FORMAT_VERSION,
        argv=list(argv),
        env=dict(env),
        cwd=cwd,
        python=sys.version,
        policy=policy,
        created_ns=time.time_ns(),
        network=network,
        files={**start_files(list(argv), cwd), **pinned_paths(list(pins), cwd)},
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

    def inherit(self, held: dict[int, bool], next_accepted: int) -> None:
        """Take over a guest that already holds connections ``held`` (a backup going
        live); new connection ids start at ``next_accepted``."""
        ...

    def bind(self, sock_id: int, family: int, kind: int, addr: tuple[Any, ...]) -> tuple[int, Any]:
        """Answer a bind exit: (errno, the address the guest sees); GuestFailure if this
        front does not answer binds."""
        ...

    def listen(self, sock_id: int, backlog: int) -> int:
        """Answer a listen exit: errno; GuestFailure if this front does not answer listens."""
        ...

    async def connect(
        self, sock_id: int, family: int, addr: tuple[Any, ...], timeout_ns: int
    ) -> tuple[int, Any, Any]:
        """Answer a connect exit: (errno, local, peer); GuestFailure if this front does not."""
        ...

    def ready(self, readable: list[int], writable: list[int]) -> bool:
        """Would a wait for these sockets end now?"""
        ...

    @property
    def input_fd(self) -> int | None:
        """A descriptor readable when input may be waiting (None: the doorbell says so)."""
        ...

    def pump(self) -> None:
        """Read what has arrived, without blocking."""
        ...

    def collect(
        self, readable: list[int], writable: list[int], pressured: list[int]
    ) -> tuple[bytes, bytes, list[Any]]:
        """Take every ready event for these sockets: (data index, data blob, other events)."""
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


# How far the host's wall clock may move away from the guest's (its monotonic
# clock plus an offset) before a reply shifts the offset. Within it, a reply
# carries no wall-clock change at all: the two host clocks only drift apart by
# the nanoseconds between reading them, and the guest's wall clock stays this
# close to the host's.
WALL_TOLERANCE_NS = 1_000_000


class WorldClock:
    """Clock readings for replies: real time, never behind the guest's virtual time.

    ``guest`` is the guest's virtual clock as the replies so far set it;
    ``snapshot`` reads the host's clocks for the next reply and answers the
    deltas that reply carries (see ``ftproxy.guest.protocol``). A host offset
    shifts the host's monotonic clock, so that a backup gone live continues the
    guest's monotonic time from where the primary left it.
    """

    def __init__(self, policy: Policy) -> None:
        self.guest = protocol.GuestClock(policy.clock_step_ns)
        self._host_offset = 0

    def continue_from(self, guest: protocol.GuestClock) -> None:
        """Take over a guest whose clock the replies so far set to ``guest``."""
        self.guest = guest
        self._host_offset = max(0, guest.mono_ns - time.monotonic_ns())

    def virtual_mono(self, icount: int) -> int:
        return self.guest.mono_at(icount)

    def snapshot(self, icount: int, floor_mono: int = 0) -> tuple[int, int]:
        """The (mono_gain, wall_shift) of the reply to the exit at ``icount``.

        Monotonic: the host's, but never behind the guest's virtual clock nor
        ``floor_mono``. Wall: unchanged offset while the host's wall clock is
        within WALL_TOLERANCE_NS of the guest's; else moved to the host's, and
        never backwards (a host clock stepped back holds the guest's at its
        virtual value until the host catches up).
        """
        guest = self.guest
        virtual = guest.mono_at(icount)
        mono = max(time.monotonic_ns() + self._host_offset, virtual, floor_mono)
        drift = time.time_ns() - (mono + guest.wall_offset_ns)
        wall_shift = 0
        if not -WALL_TOLERANCE_NS <= drift <= WALL_TOLERANCE_NS:
            wall_shift = max(drift, virtual - mono)
        mono_gain = mono - virtual
        guest.apply(icount, mono_gain, wall_shift)
        return mono_gain, wall_shift


async def _always_ready() -> None:
    return None


def output_record(seq: int, message: tuple[Any, ...]) -> Output:
    """The log record of one guest output message."""
    op = message[0]
    try:
        if op in (protocol.OP_SEND, protocol.OP_FRAME):
            _, sock, data = message
            return Output(seq, op, sock, data)
        if op == protocol.OP_SENDTO:
            _, sock, data, addr = message
            return Output(seq, op, sock, data, addr)
        if op == protocol.OP_SHUTDOWN:
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
        input_allowed: Callable[[], Awaitable[None]] = _always_ready,
    ) -> None:
        self.front = front
        self._network = network
        self._doorbell = doorbell
        self._policy = policy
        self._pid = guest_pid
        self._on_entry = on_entry
        self.clock = WorldClock(policy)
        self._input_allowed = input_allowed
        self._signals: list[int] = []
        self._unsent: list[tuple[Any, ...]] = []

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
        mono_gain, wall_shift = self.clock.snapshot(exit.icount, floor)
        body = protocol.encode_reply(mono_gain, wall_shift, result)
        self._on_entry(Entry(seq, exit.icount, exit.kind, exit.digest, body))
        return body

    async def _result(self, exit: Exit) -> tuple[Any, int]:
        kind, args = exit.kind, exit.args
        if kind == protocol.KIND_WAIT:
            return await self._wait(exit)
        if kind == protocol.KIND_BOOT:
            boot = (
                os.urandom(32),
                self._pid,
                self._policy.exit_every,
                self._policy.clock_step_ns,
                socket.gethostname(),
                None if self._network is None else self._network.boot_value(),
            )
            return boot, 0
        if kind == protocol.KIND_RESOLVE:
            self.flush_outputs()  # it may take a while: nothing waits behind it
            return await resolve_name(*args), 0
        front = self.front
        if kind == protocol.KIND_BIND:
            return front.bind(*args), 0
        if kind == protocol.KIND_LISTEN:
            return front.listen(*args), 0
        if kind == protocol.KIND_CONNECT:
            self.flush_outputs()
            return await front.connect(*args), 0
        raise GuestFailure(f"unknown exit kind {kind}")

    async def _wait(self, exit: Exit) -> tuple[tuple[bytes, bytes, list[Any] | None], int]:
        timeout_ns, readable, writable, pressured = exit.args
        started = self.clock.virtual_mono(exit.icount)
        deadline = math.inf if timeout_ns < 0 else trio.current_time() + timeout_ns / 1e9
        timed_out = False
        # Flow control: while the backup lags too far, the guest gets no new input.
        await self._input_allowed()
        front = self.front
        while True:
            front.pump()
            if self._signals or front.ready(readable, writable) or timeout_ns == 0:
                break
            if trio.current_time() >= deadline:
                timed_out = True
                break
            if self._unsent:
                # A reply the client waits for may be what we wait on; and sending
                # may ring the doorbell at once, so look again before waiting.
                self.flush_outputs()
                continue
            fd = front.input_fd
            if fd is None:
                with trio.move_on_at(deadline):
                    await self._doorbell.wait()
            else:
                if not await spinner.spin(fd, self._doorbell.next_ring):
                    await self._doorbell.wait_readable(fd, deadline)
                if _trace.stamp is not None:
                    _trace.stamp(_trace.SUP_WOKE, -1)
        index, blob, events = self.front.collect(readable, writable, pressured)
        if self._signals:
            events[:0] = [(protocol.EV_SIGNAL, s) for s in self._signals]
            self._signals.clear()
        return (index, blob, events or None), (started + timeout_ns if timed_out else 0)

    def output_later(self, message: tuple[Any, ...]) -> None:
        """Put one guest output on the real network once the guest runs again.

        The outputs of a frame come before its exit, but the guest waits for
        the reply to that exit, not for them: answering first and sending
        while the guest computes lets the two processes work at once. Whoever
        answers the guest calls ``flush_outputs`` after replying, and before
        anything that can block (a wait for input, connect, flow control).
        """
        self._unsent.append(message)

    def flush_outputs(self) -> None:
        """Put every output held by ``output_later`` on the network, in order."""
        if self._unsent:
            unsent, self._unsent = self._unsent, []
            for message in unsent:
                self._apply(message)

    def apply_output(self, message: tuple[Any, ...]) -> None:
        """Put one guest output on the real network now (after any held back)."""
        self.flush_outputs()
        self._apply(message)

    def _apply(self, message: tuple[Any, ...]) -> None:
        try:
            self.front.apply(message)
        except (TypeError, ValueError, IndexError) as exc:
            raise GuestFailure(f"malformed output {message!r:.80}: {exc}") from None
