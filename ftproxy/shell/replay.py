"""Replay mode: the log answers the guest's exits, and the guest must agree with it.

Each exit must come at the icount, of the kind and with the output digest the
log recorded; each output must equal the recorded one byte for byte. The first
disagreement is a Divergence that names the entry, the icount, both sides and
the replaying guest's stack. Replay touches no network.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ftproxy.core.records import End, Entry, Header, Output, Record
from ftproxy.guest import protocol
from ftproxy.log.file import LogContents
from ftproxy.shell.guestproc import start_guest
from ftproxy.shell.startfiles import start_files_problem
from ftproxy.shell.supervisor import Divergence, Exit, GuestFailure, Supervisor

log = structlog.get_logger()


class ReplayError(Exception):
    """The log cannot be replayed here (wrong program, wrong Python...)."""


class _LogEnded(Exception):
    """The guest went past the end of a log whose recording stopped without the guest ending.

    A recorder killed mid-load leaves a log that stops at any point: before an
    exit, or between the outputs that follow one.
    """

    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.seq = seq  # the entry the log stops in: before its exit, or among its outputs


def describe_output(op: int, sock: int, data: bytes, extra: Any) -> str:
    name = protocol.OP_NAMES.get(op, f"op {op}")
    detail = f" {len(data)}B {data[:24]!r}" if data else ""
    if extra is not None:
        detail += f" {extra!r}"
    return f"{name} on socket {sock}{detail}"


# Bytes shown on each side of the first difference between two outputs.
DIFFERENCE_CONTEXT = 16


def first_difference(recorded: Sequence[Output], replaying: Sequence[Output]) -> str:
    """Where two sequences of outputs first differ: which output, and for data, the
    byte offset and both sides' bytes around it ("" when they are equal)."""
    for index in range(max(len(recorded), len(replaying))):
        if index >= len(recorded) or index >= len(replaying):
            longer, side = (
                (replaying, "replaying") if index < len(replaying) else (recorded, "recorded")
            )
            only = longer[index]
            return (
                f"first difference: output {index} exists only on the {side} side: "
                + describe_output(only.op, only.sock, only.data, only.extra)
            )
        mine, theirs = replaying[index], recorded[index]
        if (theirs.op, theirs.sock, theirs.extra) != (mine.op, mine.sock, mine.extra):
            return (
                f"first difference: output {index} is "
                f"{describe_output(theirs.op, theirs.sock, theirs.data, theirs.extra)} recorded, "
                f"{describe_output(mine.op, mine.sock, mine.data, mine.extra)} replaying"
            )
        if theirs.data != mine.data:
            return byte_difference(theirs, mine.data, index)
    return ""


def byte_difference(recorded: Output, replaying: bytes, index: int | None = None) -> str:
    """The first byte where an output's data differs between the two sides, in context."""
    theirs = recorded.data
    offset = next(
        (i for i, (a, b) in enumerate(zip(theirs, replaying, strict=False)) if a != b),
        min(len(theirs), len(replaying)),
    )
    start, end = max(0, offset - DIFFERENCE_CONTEXT), offset + DIFFERENCE_CONTEXT
    name = protocol.OP_NAMES.get(recorded.op, f"op {recorded.op}")
    return (
        "first difference: "
        + ("" if index is None else f"output {index} ")
        + f"({name} on socket {recorded.sock}, "
        f"{len(theirs)}B recorded, {len(replaying)}B replaying) at byte {offset}:\n"
        f"  recorded  [{start}:{end}]: {theirs[start:end]!r}\n"
        f"  replaying [{start}:{end}]: {replaying[start:end]!r}"
    )


def describe_record(record: Record | None) -> str:
    if record is None:
        return "the log ends here"
    if isinstance(record, Entry):
        return (
            f"a {protocol.KIND_NAMES.get(record.kind, record.kind)} exit at icount {record.icount}"
        )
    if isinstance(record, Output):
        return "output " + describe_output(record.op, record.sock, record.data, record.extra)
    if isinstance(record, End):
        return f"the guest exited with returncode {record.returncode}"
    return type(record).__name__


def check_entry(seq: int, record: Record, exit: Exit) -> None:
    """Raise Divergence unless ``record`` is the entry for this exit of the replaying guest."""
    replaying = f"a {exit.kind_name} exit at icount {exit.icount}"
    if not isinstance(record, Entry) or (record.kind, record.icount) != (exit.kind, exit.icount):
        raise Divergence(
            seq=seq, icount=exit.icount, recorded=describe_record(record), replaying=replaying
        )
    if record.digest != exit.digest:
        raise Divergence(
            seq=seq,
            icount=exit.icount,
            recorded=f"outputs before this exit with digest {record.digest:#010x}",
            replaying=f"outputs before this exit with digest {exit.digest:#010x}",
        )


class LogAnswers:
    """Replay mode: answer exits from the log, and check outputs against it."""

    def __init__(self, contents: LogContents) -> None:
        self._records = contents.records
        self._next = 0
        self.output_bytes = 0
        # The entries in order: entry seq k is _entries[k - 1] (replies written ahead).
        self._entries = [record for record in contents.records if isinstance(record, Entry)]

    def reply_ahead(self, seq: int) -> Entry | None:
        """The entry the log holds for exit ``seq`` (None past its last)."""
        return self._entries[seq - 1] if 0 < seq <= len(self._entries) else None

    def _peek(self) -> Record | None:
        return self._records[self._next] if self._next < len(self._records) else None

    def _past_the_end(self) -> bool:
        """Whether the recording stopped here without the guest having ended."""
        record = self._peek()
        return record is None or (isinstance(record, End) and record.reason != "guest_exited")

    async def answer(self, seq: int, exit: Exit) -> bytes:
        if self._past_the_end():
            raise _LogEnded(seq)
        record = self._peek()
        assert record is not None
        check_entry(seq, record, exit)
        self._next += 1
        assert isinstance(record, Entry)
        return record.reply

    def output(self, seq: int, message: tuple[Any, ...]) -> None:
        op, sock = message[0], message[1]
        data = (
            message[2] if op in (protocol.OP_SEND, protocol.OP_SENDTO, protocol.OP_FRAME) else b""
        )
        extra = (
            message[3]
            if op == protocol.OP_SENDTO
            else message[2]
            if op == protocol.OP_SHUTDOWN
            else None
        )
        if isinstance(extra, tuple):
            extra = list(extra)  # the log's msgpack gives tuples back as lists
        if self._past_the_end():
            raise _LogEnded(seq)  # the recorder died before it logged this output
        record = self._peek()
        mine = (seq, op, sock, data, extra)
        if (
            not isinstance(record, Output)
            or (
                record.seq,
                record.op,
                record.sock,
                record.data,
                record.extra,
            )
            != mine
        ):
            divergence = Divergence(
                seq=seq,
                icount=-1,
                recorded=describe_record(record),
                replaying="output " + describe_output(op, sock, data, extra),
            )
            if isinstance(record, Output) and record.data != data:
                divergence.difference = byte_difference(record, data)
            raise divergence
        self._next += 1
        self.output_bytes += len(data)

    def flush(self) -> None:
        """Replay puts nothing on a network."""

    def remaining(self) -> Record | None:
        return self._peek()


@dataclass
class ReplayResult:
    """What a replay verified."""

    entries: int
    outputs: int
    output_bytes: int
    returncode: int | None
    recorded_returncode: int | None
    log_complete: bool  # the recorded guest ended by itself, and the replay's did the same
    end_reason: str | None  # the log's end record, if any ("guest_exited", "killed")
    truncated: bool
    # Where a log whose recording stopped early (the recorder killed) ran out:
    # the entry the replaying guest had reached. Everything before it verified.
    ended_at: int | None = None


def replay_directory(header: Header) -> str:
    """Where a replay runs the guest: the recorded directory if it is here, else ours."""
    return header.cwd if os.path.isdir(header.cwd) else os.getcwd()


def check_replayable(contents: LogContents, argv: list[str] | None) -> None:
    """Refuse, with a reason, a replay that could not reproduce the recording."""
    header = contents.header
    if argv is not None and argv != header.argv:
        raise ReplayError(
            f"the log recorded the program {' '.join(header.argv)!r}, "
            f"not {' '.join(argv)!r}; replay runs the recorded program"
        )
    recorded_python = header.python.split()[0]
    here = sys.version.split()[0]
    if recorded_python != here:
        raise ReplayError(
            f"the log was recorded under Python {recorded_python}, this is Python {here}: "
            "the interpreter must be the same for the execution to be the same"
        )
    problem = start_files_problem(header.files, replay_directory(header), "the recording")
    if problem:
        raise ReplayError(problem)


async def replay(
    contents: LogContents,
    *,
    argv: list[str] | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
) -> ReplayResult:
    """Re-execute the recorded program against its log; raise Divergence on disagreement."""
    check_replayable(contents, argv)
    header = contents.header
    cwd = replay_directory(header)
    bound = log.bind(role="replayer")
    guest = await start_guest(header.argv, header.env, cwd, stdout=stdout, stderr=stderr)
    mode = LogAnswers(contents)
    supervisor = Supervisor(guest, mode, known=mode.reply_ahead)
    ended_early = False
    ended_at: int | None = None
    try:
        try:
            await supervisor.run()
        except _LogEnded as end_of_log:
            ended_early = True
            ended_at = end_of_log.seq
        except Divergence as divergence:
            divergence.stack = await supervisor.halt_for_stack("divergence", divergence)
            raise
        except GuestFailure:
            raise
        if ended_early:
            last = contents.records[-1] if contents.records else None
            if isinstance(last, End) and last.reason == "guest_exited":
                raise Divergence(
                    seq=supervisor.seq + 1,
                    icount=supervisor.icount,
                    recorded=describe_record(last),
                    replaying="the guest went on to another exit",
                    stack=await supervisor.halt_for_stack("divergence"),
                )
            guest.kill()
        returncode = await guest.wait()
    finally:
        await guest.aclose()
    remaining = mode.remaining()
    end = remaining if isinstance(remaining, End) else None
    if not ended_early:
        if end is None and remaining is not None:
            raise Divergence(
                seq=supervisor.seq,
                icount=supervisor.icount,
                recorded=describe_record(remaining),
                replaying=f"the guest exited with returncode {returncode}",
            )
        if end is not None and end.returncode != returncode and end.reason == "guest_exited":
            raise Divergence(
                seq=supervisor.seq,
                icount=supervisor.icount,
                recorded=describe_record(end),
                replaying=f"the guest exited with returncode {returncode}",
            )
    bound.info("replay_verified", entries=supervisor.seq, outputs=supervisor.outputs)
    return ReplayResult(
        entries=supervisor.seq,
        outputs=supervisor.outputs,
        output_bytes=mode.output_bytes,
        returncode=None if ended_early else returncode,
        recorded_returncode=end.returncode if end else None,
        log_complete=end is not None and end.reason == "guest_exited",
        end_reason=end.reason if end else None,
        truncated=contents.truncated_at is not None,
        ended_at=ended_at,
    )
