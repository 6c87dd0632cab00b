"""Starting a guest process and speaking the guest pipe with it, under trio."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from ftproxy.guest import _trace, protocol
from ftproxy.guest._runtime import SPIN_ENV as GUEST_SPIN_ENV
from ftproxy.shell.spin import spinner

_READ_SIZE = 256 * 1024
# The supervisor's loop may find the guest's next frame already there and its
# answer ready, over and over: after this many frames read without waiting it
# yields once, so that its other tasks (log shipping, heartbeats) still run.
_FRAMES_BETWEEN_YIELDS = 32
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_MIN_PIPE_SIZE = 4096  # POSIX's PIPE_BUF: every pipe holds at least this much

# personality(2) flag that turns address-space randomisation off: with it, a
# program that orders things by id() allocates, and so orders, identically on
# both replicas.
ADDR_NO_RANDOMIZE = 0x0040000
_libc = ctypes.CDLL(None, use_errno=True)
_personality = _libc.personality
_personality.argtypes = [ctypes.c_ulong]
_personality.restype = ctypes.c_int


# Reset to their defaults in every guest (see start_guest).
_GUEST_DEFAULT_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


class GuestProcess:
    """A running guest and the supervisor's end of its pipe."""

    def __init__(
        self,
        process: trio.Process,
        replies: trio.lowlevel.FdStream,
        requests: trio.lowlevel.FdStream,
    ) -> None:
        self.process = process
        self._replies = replies
        self._requests = requests
        self._buffer = bytearray()
        self._unyielded = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    async def receive(self) -> list[tuple[Any, ...]] | None:
        """The next frame of messages from the guest; None once the guest closed its end."""
        while True:
            if len(self._buffer) >= protocol.LENGTH.size:
                length = protocol.frame_length(self._buffer[: protocol.LENGTH.size])
                end = protocol.LENGTH.size + length
                if len(self._buffer) >= end:
                    body = bytes(self._buffer[protocol.LENGTH.size : end])
                    del self._buffer[:end]
                    messages = protocol.decode_body(body)
                    if not isinstance(messages, list) or not messages:
                        raise protocol.ProtocolError(
                            f"guest frame is not a list of messages: {messages!r:.80}"
                        )
                    return messages
            chunk = await self._read_some()
            if not chunk:
                if self._buffer:
                    raise protocol.ProtocolError(
                        f"guest pipe closed inside a frame ({len(self._buffer)} bytes)"
                    )
                return None
            self._buffer += chunk

    async def _read_some(self) -> bytes:
        """What the guest wrote since the last read; b"" once its end is closed.

        The pipe is read before waiting for it (FdStream.receive_some yields to
        the scheduler first, a full pass of trio's loop per frame), and the
        loop is woken only when the guest has not written yet.
        """
        fd = self._requests.fileno()
        try:
            while True:
                try:
                    chunk = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    self._unyielded = 0
                    await spinner.wait_readable(fd)
                    continue
                self._unyielded += 1
                if self._unyielded >= _FRAMES_BETWEEN_YIELDS:
                    self._unyielded = 0
                    await trio.lowlevel.checkpoint()
                return chunk
        except (OSError, trio.ClosedResourceError):
            return b""  # EBADF after aclose(), or the pipe broke: the guest is gone

    async def reply(self, frame: bytes) -> None:
        """Send reply frames (``protocol.reply_frame``), one or several end to end.

        Written at once when the pipe has room, which it nearly always has (the
        guest reads every reply before it asks again, and replies written ahead
        stay well under the pipe's buffer): trio's send_all would first yield a
        pass of its loop.
        """
        if _trace.stamp is not None:
            _trace.stamp(_trace.REPLY_WRITTEN, -1)
        try:
            written = os.write(self._replies.fileno(), frame)
        except BlockingIOError:
            written = 0
        except OSError:
            return  # a guest that is gone shows as the end of receive()
        if written < len(frame):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._replies.send_all(frame[written:])

    def pipe_size(self) -> int:
        """How many bytes the reply pipe holds before a write would block."""
        try:
            return int(fcntl.fcntl(self._replies.fileno(), _F_GETPIPE_SZ))
        except OSError:
            return _MIN_PIPE_SIZE

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        return await self.process.wait()

    async def aclose(self) -> None:
        self.kill()
        with trio.CancelScope(shield=True):
            await self.process.wait()
            await self._replies.aclose()
            await self._requests.aclose()


async def start_guest(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    *,
    stdout: int | None = None,
    stderr: int | None = None,
) -> GuestProcess:
    """Start ``python -m ftproxy.guest ARGV`` with the pipe on fds 3 and 4."""
    traced = _trace.directory()
    if traced is not None:
        env = {**env, _trace.ENV: traced}  # the guest takes it out before the program runs
    guest_spin = os.environ.get(GUEST_SPIN_ENV, "0")  # off unless asked: see _runtime
    if guest_spin != "0":
        env = {**env, GUEST_SPIN_ENV: guest_spin}  # taken out, too
    reply_read, reply_write = os.pipe()
    request_read, request_write = os.pipe()

    def in_child() -> None:
        # Move both ends clear of 3 and 4 first: either may be one of them.
        guest_reads = fcntl.fcntl(reply_read, fcntl.F_DUPFD, 10)
        guest_writes = fcntl.fcntl(request_write, fcntl.F_DUPFD, 10)
        os.dup2(guest_reads, protocol.REPLY_FD)
        os.dup2(guest_writes, protocol.REQUEST_FD)
        _personality(ADDR_NO_RANDOMIZE)
        # Every guest starts with the same dispositions, whatever its supervisor
        # inherited: one started by ``nohup`` or ``cmd &`` has SIGINT and SIGHUP
        # ignored, a trio one has them handled (so reset by exec), and Python's
        # start-up differs with them, so a log recorded one way diverged replayed
        # the other way. The guest's signals reach it as logged events anyway.
        for signum in _GUEST_DEFAULT_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)

    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "ftproxy.guest", *argv],
            env=dict(env),
            cwd=cwd,
            stdin=None,
            stdout=stdout,
            stderr=stderr,
            pass_fds=(protocol.REPLY_FD, protocol.REQUEST_FD),
            preexec_fn=in_child,
            # Its own session: a Ctrl-C at the terminal reaches the supervisor,
            # which delivers it to the guest at an exit, the same one on the backup.
            start_new_session=True,
        )
    finally:
        os.close(reply_read)
        os.close(request_write)
    spinner.watch(request_read)
    return GuestProcess(
        process,
        trio.lowlevel.FdStream(reply_write),
        trio.lowlevel.FdStream(request_read),
    )
