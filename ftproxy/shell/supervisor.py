"""The supervisor's loop around one guest: answer its exits, take its outputs.

Who answers an exit is the *mode*: the world (record mode, ``ftproxy.shell.record``)
or the log (replay mode, ``ftproxy.shell.replay``). The loop is the same for both,
which is how the guest cannot tell them apart.

In replay, the log already holds the replies to the guest's next exits: the
supervisor writes them into the guest's pipe ahead of its requests (the
``ReplyWindow``), so the guest finds each reply there and never sleeps for one,
where a round trip per exit (a cross-CPU wake-up each way) was most of what
replay cost. Each request is still checked against its entry when it arrives,
in order, and each reply names the exit it answers: a guest that diverged
stops at the exit where it did (see ``ftproxy.guest.protocol``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from ftproxy.core.records import Entry
from ftproxy.guest import _trace, protocol
from ftproxy.shell.guestproc import GuestProcess

log = structlog.get_logger()

# At most this many bytes of replies wait in the guest's pipe ahead of its
# requests (and at most half the pipe's buffer): writing them never blocks, so
# the supervisor always goes back to reading the guest, which may be writing
# outputs to it. A bigger reply is written when its request comes.
AHEAD_BYTES = 32 * 1024


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
        # How many exits past this one the guest was when it gave its stack (it
        # used replies written ahead that named its exits: its outputs told apart).
        self.stack_exits_later = 0
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
        if self.stack and self.stack_exits_later:
            lines.append(
                f"  replaying guest's stack {self.stack_exits_later} exit(s) later (it had "
                "been given the replies the log holds for those exits ahead of its requests):"
            )
            lines.extend("    " + line for line in self.stack.rstrip().splitlines())
        elif self.stack:
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


KnownReplies = Callable[[int], Entry | None]
"""The log entry that will answer exit ``seq``, if the mode holds it already (replay)."""


class ReplyWindow:
    """Which replies are in the guest's pipe ahead of its requests (sans I/O).

    ``fill`` says what to write ahead now; ``requested`` is told each exit the
    guest makes, in order, with the reply its mode answered, and says whether
    that reply is in the pipe already. A reply stays counted until the guest
    asks for the next exit (only then has it surely read it).
    """

    def __init__(self, known: KnownReplies | None, limit_bytes: int) -> None:
        self._known = known
        self.limit_bytes = limit_bytes if known is not None else 0
        self.written = 0  # the last exit whose reply is in the pipe (or was read)
        self._ahead: deque[tuple[int, bytes, int]] = deque()  # seq, body, frame bytes
        self.bytes = 0
        self.stopped = False

    def fill(self) -> bytes:
        """The reply frames to write ahead now, end to end (b"" for none)."""
        if self._known is None or self.stopped:
            return b""
        frames: list[bytes] = []
        while True:
            seq = self.written + 1
            entry = self._known(seq)
            if entry is None:
                break
            if entry.seq != seq:
                raise GuestFailure(f"the log's entry {entry.seq} was offered for exit {seq}")
            size = protocol.REPLY_HEAD.size + len(entry.reply)
            if self.bytes + size > self.limit_bytes:
                break
            frames.append(protocol.reply_frame(entry.icount, entry.kind, entry.digest, entry.reply))
            self._ahead.append((seq, entry.reply, size))
            self.bytes += size
            self.written = seq
        return b"".join(frames)

    def requested(self, seq: int, body: bytes) -> bool:
        """The guest asked for exit ``seq``, answered with ``body``: whether its reply
        was written ahead (and must not be written again)."""
        ahead = self._ahead
        while ahead and ahead[0][0] < seq:
            self.bytes -= ahead.popleft()[2]  # the guest asked again: it read that one
        if seq > self.written:
            self.written = seq
            return False
        if not ahead or ahead[0][0] != seq or ahead[0][1] is not body:
            raise GuestFailure(f"exit {seq} was answered other than the reply written ahead")
        return True

    def stop(self) -> None:
        """Write nothing more ahead (the guest diverged, or is being halted)."""
        self.stopped = True


class Supervisor:
    """Runs the exit/reply loop until the guest closes its pipe."""

    def __init__(self, guest: GuestProcess, mode: Mode, known: KnownReplies | None = None) -> None:
        self.guest = guest
        self.mode = mode
        self.seq = 0
        self.icount = 0
        self.outputs = 0
        limit = min(AHEAD_BYTES, guest.pipe_size() // 2) if known is not None else 0
        self.window = ReplyWindow(known, limit)

    async def run(self) -> None:
        """Serve the guest until it exits; Divergence and GuestFailure propagate."""
        try:
            await self._serve()
        except Divergence:
            self.window.stop()
            raise

    async def _serve(self) -> None:
        window = self.window
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
            ahead = window.fill()
            if ahead:
                await self.guest.reply(ahead)

    async def _handle(self, message: Any) -> None:
        if not isinstance(message, tuple) or not message:
            raise GuestFailure(f"malformed guest message {message!r:.80}")
        op = message[0]
        if op == protocol.OP_EXIT:
            _, icount, kind, args, digest = message
            exit = Exit(icount, kind, args, digest)
            seq = self.seq + 1
            body = await self.mode.answer(seq, exit)
            self.seq = seq
            self.icount = icount
            if not self.window.requested(seq, body):
                await self.guest.reply(protocol.reply_frame(icount, kind, digest, body))
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

    async def halt_for_stack(self, reason: str, divergence: Divergence | None = None) -> str:
        """Ask the guest for its stack (it then exits); empty if it does not say.

        A guest that was given replies ahead stops at the first exit whose
        reply is not its own, or else reads the halt after them: the exits it
        asks for meanwhile say how far past ``divergence`` it got.
        """
        self.window.stop()
        await self.guest.reply(
            protocol.reply_frame(protocol.ANY_EXIT, 0, 0, protocol.encode_body((None, reason)))
        )
        later = 0
        try:
            while True:
                frame = await self.guest.receive()
                if frame is None:
                    return ""
                for message in frame:
                    if not isinstance(message, tuple) or not message:
                        continue
                    if message[0] == protocol.OP_EXIT:
                        later += 1
                    elif message[0] == protocol.OP_STACK:
                        if divergence is not None:
                            divergence.stack_exits_later = later
                        return str(message[1])
        except protocol.ProtocolError:
            return ""
