"""The supervisor's loop around one guest: answer its exits, take its outputs.

Who answers an exit is the *mode*: the world (record mode, ``ftproxy.shell.record``)
or the log (replay mode, ``ftproxy.shell.replay``). The loop is the same for both,
which is how the guest cannot tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from ftproxy.guest import _trace, protocol
from ftproxy.shell.guestproc import GuestProcess

log = structlog.get_logger()


@dataclass(frozen=True)
class Exit:
    """One exit request from the guest."""

    icount: int
    kind: int
    args: Any
    digest: int

    @property
    def kind_name(self) -> str:
        return protocol.KIND_NAMES.get(self.kind, f"kind {self.kind}")


class GuestFailure(Exception):
    """The guest broke the pipe protocol (not the program's fault: ftproxy's or the host's)."""


class Divergence(Exception):
    """The replaying guest did not do what the recorded one did."""

    def __init__(
        self, *, seq: int, icount: int, recorded: str, replaying: str, stack: str = ""
    ) -> None:
        self.seq = seq
        self.icount = icount
        self.recorded = recorded
        self.replaying = replaying
        self.stack = stack
        # Where the two sides' outputs first differ, when they were compared.
        self.difference = ""
        self.after_exit = False
        super().__init__(f"divergence at log entry {seq}")

    def report(self) -> str:
        where = (
            f"after the exit at icount {self.icount}"
            if self.after_exit
            else f"icount {self.icount}"
        )
        lines = [
            f"divergence at log entry {self.seq} ({where}):",
            f"  recorded:  {self.recorded}",
            f"  replaying: {self.replaying}",
        ]
        if self.difference:
            lines.extend("  " + line for line in self.difference.splitlines())
        if self.stack:
            lines.append("  replaying guest's stack at that point:")
            lines.extend("    " + line for line in self.stack.rstrip().splitlines())
        return "\n".join(lines)


class Mode(Protocol):
    """Answers exits and takes outputs; record and replay are the two modes."""

    async def answer(self, seq: int, exit: Exit) -> bytes:
        """The reply body for exit number ``seq``."""
        ...

    def output(self, seq: int, message: tuple[Any, ...]) -> None:
        """An output the guest emitted after consuming entry ``seq``."""
        ...

    def flush(self) -> None:
        """A frame of the guest's is handled (its exit answered, if it had one):
        outputs held back until the guest runs again go out now."""
        ...


class Supervisor:
    """Runs the exit/reply loop until the guest closes its pipe."""

    def __init__(self, guest: GuestProcess, mode: Mode) -> None:
        self.guest = guest
        self.mode = mode
        self.seq = 0
        self.icount = 0
        self.outputs = 0

    async def run(self) -> None:
        """Serve the guest until it exits; Divergence and GuestFailure propagate."""
        while True:
            try:
                frame = await self.guest.receive()
            except protocol.ProtocolError as exc:
                raise GuestFailure(f"the guest pipe carried garbage: {exc}") from None
            if frame is None:
                return
            for message in frame:
                await self._handle(message)
            self.mode.flush()

    async def _handle(self, message: Any) -> None:
        if not isinstance(message, tuple) or not message:
            raise GuestFailure(f"malformed guest message {message!r:.80}")
        op = message[0]
        if op == protocol.OP_EXIT:
            _, icount, kind, args, digest = message
            exit = Exit(icount, kind, args, digest)
            body = await self.mode.answer(self.seq + 1, exit)
            self.seq += 1
            self.icount = icount
            await self.guest.reply(body)
        elif op in (
            protocol.OP_SEND,
            protocol.OP_SENDTO,
            protocol.OP_SHUTDOWN,
            protocol.OP_CLOSE,
            protocol.OP_FRAME,
        ):
            self.outputs += 1
            if _trace.stamp is not None:
                _trace.stamp(_trace.OUTPUT_TAKEN, self.seq)
            try:
                self.mode.output(self.seq, message)
            except Divergence as divergence:
                divergence.icount = self.icount  # outputs have none: say which exit they follow
                divergence.after_exit = True
                raise
        else:
            raise GuestFailure(f"unexpected guest message {protocol.OP_NAMES.get(op, op)!r}")

    async def halt_for_stack(self, reason: str) -> str:
        """Ask the guest for its stack (it then exits); empty if it does not say."""
        await self.guest.reply(protocol.encode_body((None, reason)))
        try:
            while True:
                frame = await self.guest.receive()
                if frame is None:
                    return ""
                for message in frame:
                    if isinstance(message, tuple) and message and message[0] == protocol.OP_STACK:
                        return str(message[1])
        except protocol.ProtocolError:
            return ""
