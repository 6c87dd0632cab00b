"""Record mode: the world answers the guest's exits, and every answer is logged.

``record`` runs one replica alone (``ftproxy record``): the socket front gives
the guest the real network, each exit's reply is appended to the log as an
entry, each output as an output record. SIGINT or SIGTERM reaches the guest as
a logged signal event; a second one kills the guest. The log is flushed on
every way out.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from ftproxy.core.records import End, Policy
from ftproxy.guest import protocol
from ftproxy.log.file import LogWriter
from ftproxy.shell.front import PacketConfig
from ftproxy.shell.front.socket import AddressMap
from ftproxy.shell.guestproc import GuestProcess, start_guest
from ftproxy.shell.spin import RECORD_SPIN_US, spinner
from ftproxy.shell.supervisor import Exit, GuestFailure, Supervisor
from ftproxy.shell.sync import Doorbell
from ftproxy.shell.world import (
    WorldAnswers,
    guest_environment,
    new_header,
    open_front,
    output_record,
)

log = structlog.get_logger()
FLUSH_INTERVAL_S = 0.05
STOP_GRACE_S = 10.0


class RecordMode:
    """Record mode: the world answers, the log file keeps every entry and output."""

    def __init__(self, world: WorldAnswers, writer: LogWriter) -> None:
        self.world = world
        self._writer = writer

    async def answer(self, seq: int, exit: Exit) -> bytes:
        return await self.world.answer(seq, exit)

    def output(self, seq: int, message: tuple[Any, ...]) -> None:
        self._writer.append(output_record(seq, message))
        self.world.output_later(message)

    def flush(self) -> None:
        self.world.flush_outputs()


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
        default_factory=lambda: Policy(protocol.DEFAULT_EXIT_EVERY, protocol.DEFAULT_CLOCK_STEP_NS)
    )
    extra_env: dict[str, str] = field(default_factory=dict)
    stop_grace_s: float = STOP_GRACE_S
    packet: PacketConfig | None = None
    # Files and directories the guest reads, pinned by digest (``ftproxy.shell.startfiles``).
    pins: list[str] = field(default_factory=list)


async def record(
    options: RecordOptions,
    *,
    task_status: trio.TaskStatus[GuestProcess] = trio.TASK_STATUS_IGNORED,
) -> RecordResult:
    """Run the guest against the real network until it exits, logging every input."""
    spinner.use_default(RECORD_SPIN_US)  # before any descriptor is watched
    env = guest_environment(options.extra_env)
    network = options.packet.network if options.packet else None
    header = new_header(options.argv, env, options.policy, network, options.pins)
    writer = LogWriter(options.log_path, header)
    received: list[int] = []
    bound = log.bind(role="recorder")
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                doorbell = Doorbell()
                front = open_front(nursery, doorbell, options.address_map, options.packet)
                guest = await start_guest(options.argv, env, header.cwd)
                bound.info("guest_started", pid=guest.pid, argv=options.argv, log=options.log_path)
                world = WorldAnswers(
                    front, doorbell, options.policy, guest.pid, writer.append, network=network
                )
                supervisor = Supervisor(guest, RecordMode(world, writer))
                # Killing the guest must also stop a supervisor waiting inside an answer.
                stopper = _Stopper(guest)
                nursery.start_soon(_flush_periodically, writer)
                nursery.start_soon(_forward_signals, signals, world, stopper, received, options)
                task_status.started(guest)
                try:
                    with stopper.scope:
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


class _Stopper:
    """Kills the guest and cancels the supervisor's loop, which may be mid-answer."""

    def __init__(self, guest: GuestProcess) -> None:
        self.guest = guest
        self.scope = trio.CancelScope()

    def kill(self, reason: str) -> None:
        log.warning("guest_killed", reason=reason)
        self.scope.cancel()
        self.guest.kill()


async def _forward_signals(
    signals: Any,
    world: WorldAnswers,
    stopper: _Stopper,
    received: list[int],
    options: RecordOptions,
) -> None:
    """First SIGINT/SIGTERM goes to the guest as a logged event; a second kills it."""
    async with trio.open_nursery() as nursery:
        async for signum in signals:
            received.append(signum)
            if len(received) == 1:
                log.info("signal_forwarded", signal=signal.Signals(signum).name)
                world.deliver_signal(signum)
                nursery.start_soon(_kill_after, stopper, options.stop_grace_s)
            else:
                stopper.kill("second signal")


async def _kill_after(stopper: _Stopper, seconds: float) -> None:
    await trio.sleep(seconds)
    stopper.kill(f"still running {seconds}s after the stop signal")
