"""Record mode: the world answers the guest's exits, and every answer is logged.

``record`` runs one replica alone (``ftproxy record``): the socket front gives
the guest the real network, each exit's reply is appended to the log as an
entry, each output as an output record. SIGINT or SIGTERM reaches the guest as
a logged signal event; a second one kills the guest. The log is flushed on
every way out.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from ftproxy.front.socket import AddressMap, Doorbell, SocketFront
from ftproxy.guest import protocol as p
from ftproxy.guestproc import GuestProcess, start_guest
from ftproxy.logfile import LogWriter
from ftproxy.supervisor import Exit, GuestFailure, Supervisor
from ftproxy.wire import FORMAT_VERSION, End, Entry, Header, Output, Policy

log = structlog.get_logger()

# The host environment a guest gets; everything else is left out so that the
# log (which pins the environment) carries no secrets by accident.
PASSED_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH")
FLUSH_INTERVAL_S = 0.05
STOP_GRACE_S = 10.0


def guest_environment(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The pinned environment for a new recording."""
    env = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
    env.update(extra)
    env["PYTHONHASHSEED"] = str(secrets.randbelow(2**32))
    # A .pyc written mid-run would change what the next run allocates at import.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def new_header(argv: Sequence[str], env: Mapping[str, str], policy: Policy) -> Header:
    return Header(
        version=FORMAT_VERSION,
        argv=list(argv),
        env=dict(env),
        cwd=os.getcwd(),
        python=sys.version,
        policy=policy,
        created_ns=time.time_ns(),
    )


class WorldClock:
    """Clock snapshots for replies: real time, never behind the guest's virtual time."""

    def __init__(self, policy: Policy) -> None:
        self._step = policy.clock_step_ns
        self._mono = 0
        self._wall = 0
        self._icount = 0

    def virtual_mono(self, icount: int) -> int:
        return self._mono + (icount - self._icount) * self._step

    def snapshot(self, icount: int, floor_mono: int = 0) -> tuple[int, int]:
        advance = (icount - self._icount) * self._step
        mono = max(time.monotonic_ns(), self._mono + advance, floor_mono)
        wall = max(time.time_ns(), self._wall + advance)
        self._mono, self._wall, self._icount = mono, wall, icount
        return wall, mono


class WorldAnswers:
    """Record mode: answer exits from the network front, the clock and entropy."""

    def __init__(
        self,
        front: SocketFront,
        doorbell: Doorbell,
        policy: Policy,
        log_writer: LogWriter,
        guest_pid: int,
    ) -> None:
        self.front = front
        self._doorbell = doorbell
        self._policy = policy
        self._log = log_writer
        self._pid = guest_pid
        self._clock = WorldClock(policy)
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
        wall, mono = self._clock.snapshot(exit.icount, floor)
        body = p.encode_body((wall, mono, result))
        self._log.append(Entry(seq, exit.icount, exit.kind, exit.digest, body))
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
            )
            return boot, 0
        if kind == p.KIND_BIND:
            return self.front.bind(*args), 0
        if kind == p.KIND_LISTEN:
            return self.front.listen(*args), 0
        if kind == p.KIND_CONNECT:
            return await self.front.connect(*args), 0
        if kind == p.KIND_RESOLVE:
            return await self.front.resolve(*args), 0
        raise GuestFailure(f"unknown exit kind {kind}")

    async def _wait(self, exit: Exit) -> tuple[list[Any], int]:
        timeout_ns, readable, writable, pressured = exit.args
        started = self._clock.virtual_mono(exit.icount)
        deadline = math.inf if timeout_ns < 0 else trio.current_time() + timeout_ns / 1e9
        timed_out = False
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

    def output(self, seq: int, message: tuple[Any, ...]) -> None:
        op = message[0]
        try:
            if op == p.OP_SEND:
                _, sock, data = message
                self._log.append(Output(seq, op, sock, data))
                self.front.send(sock, data)
            elif op == p.OP_SENDTO:
                _, sock, data, addr = message
                self._log.append(Output(seq, op, sock, data, addr))
                self.front.sendto(sock, data, addr)
            elif op == p.OP_SHUTDOWN:
                _, sock, how = message
                self._log.append(Output(seq, op, sock, b"", how))
                self.front.shutdown(sock, how)
            else:
                _, sock = message
                self._log.append(Output(seq, op, sock, b""))
                self.front.close(sock)
        except ValueError:
            raise GuestFailure(f"malformed output {message!r:.80}") from None


@dataclass
class RecordResult:
    """How a recording ended."""

    returncode: int | None
    entries: int
    outputs: int
    log_bytes: int
    signals: list[int] = field(default_factory=list)


@dataclass
class RecordOptions:
    log_path: str
    argv: list[str]
    address_map: AddressMap = field(default_factory=dict)
    policy: Policy = field(
        default_factory=lambda: Policy(p.DEFAULT_EXIT_EVERY, p.DEFAULT_CLOCK_STEP_NS)
    )
    extra_env: dict[str, str] = field(default_factory=dict)
    stop_grace_s: float = STOP_GRACE_S


async def record(
    options: RecordOptions,
    *,
    task_status: trio.TaskStatus[GuestProcess] = trio.TASK_STATUS_IGNORED,
) -> RecordResult:
    """Run the guest against the real network until it exits, logging every input."""
    env = guest_environment(options.extra_env)
    header = new_header(options.argv, env, options.policy)
    writer = LogWriter(options.log_path, header)
    received: list[int] = []
    bound = log.bind(role="recorder")
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                doorbell = Doorbell()
                front = SocketFront(nursery, doorbell, options.address_map)
                guest = await start_guest(options.argv, env, header.cwd)
                bound.info("guest_started", pid=guest.pid, argv=options.argv, log=options.log_path)
                mode = WorldAnswers(front, doorbell, options.policy, writer, guest.pid)
                supervisor = Supervisor(guest, mode)
                nursery.start_soon(_flush_periodically, writer)
                nursery.start_soon(_forward_signals, signals, mode, guest, received, options)
                task_status.started(guest)
                try:
                    await supervisor.run()
                except GuestFailure as exc:
                    bound.error("guest_failed", error=str(exc))
                    guest.kill()
                returncode = await guest.wait()
                reason = "killed" if len(received) > 1 else "guest_exited"
                writer.append(End(reason, returncode))
                bound.info("guest_exited", returncode=returncode, entries=supervisor.seq)
                front.close_all()
                nursery.cancel_scope.cancel()
                await guest.aclose()
    finally:
        writer.close()
    return RecordResult(
        returncode, supervisor.seq, supervisor.outputs, writer.bytes_written, received
    )


async def _flush_periodically(writer: LogWriter) -> None:
    while True:
        await trio.sleep(FLUSH_INTERVAL_S)
        writer.flush()


async def _forward_signals(
    signals: Any,
    mode: WorldAnswers,
    guest: GuestProcess,
    received: list[int],
    options: RecordOptions,
) -> None:
    """First SIGINT/SIGTERM goes to the guest as a logged event; a second kills it."""
    async with trio.open_nursery() as nursery:
        async for signum in signals:
            received.append(signum)
            if len(received) == 1:
                log.info("signal_forwarded", signal=signal.Signals(signum).name)
                mode.deliver_signal(signum)
                nursery.start_soon(_kill_after, guest, options.stop_grace_s)
            else:
                log.warning("guest_killed", reason="second signal")
                guest.kill()


async def _kill_after(guest: GuestProcess, seconds: float) -> None:
    await trio.sleep(seconds)
    log.warning("guest_killed", reason=f"still running {seconds}s after the stop signal")
    guest.kill()
