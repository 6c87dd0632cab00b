"""The guest's side of the virtual machine: instruction counter, exits, clock.

Every call into a virtual device calls ``tick()``: the instruction counter
(icount) advances by one and virtual time by a fixed step. The guest leaves for
its supervisor (an *exit*) only when it would block, or after ``exit_every``
device calls so that input is never starved. An exit sends the outputs buffered
since the last one plus the request, and waits for the reply, which brings the
virtual clock up to real time and, for a wait, carries every ready event at
once. This code runs the same way whether the supervisor records or replays:
it never knows which.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import sys
import time
import weakref
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol

from ftproxy.guest import _trace, protocol

EXIT_UNSUPPORTED = 3
# How long (us) the guest polls for its exit's reply before it sleeps on the pipe,
# set by the supervisor (its own spin budget, ``ftproxy.shell.spin``); taken out
# of the environment before the program runs. It changes no result, only when
# the guest notices one, so it is not part of the log's pinned policy.
SPIN_ENV = "FTPROXY_GUEST_SPIN_US"


class UnsupportedInGuest(SystemExit):
    """The guest called something ftproxy cannot make deterministic.

    Once the guest has booted, making one stops the program on the spot (see
    ``Runtime.stop_refused``): servers catch ``Exception`` around each request
    (socketserver does) and asyncio keeps a task's exceptions in the task, so a
    refusal that travelled up the stack would become an empty reply, or a
    traceback in a log, and the server would serve on having done nothing. It
    is a SystemExit, with the guest's exit status as its code, for the calls
    made before boot.
    """

    def __init__(self, function: str, why: str, instead: str = "") -> None:
        super().__init__(f"{function} is not supported under ftproxy: {why}")
        self.code = EXIT_UNSUPPORTED
        self.function = function
        self.why = why
        self.instead = instead
        if _stopper is not None:
            _stopper(self)

    def __str__(self) -> str:
        message = f"{self.function} is not supported under ftproxy: {self.why}"
        return f"{message}; instead, {self.instead}" if self.instead else message


class ModuleNotOffered(ImportError):
    """A module the guest does not offer, as if it were not installed.

    An ImportError, so that programs which fall back when it is missing
    (uvicorn's ``--loop auto`` without uvloop) do; one that cannot do without
    it stops with this message (exit code 3).
    """

    def __init__(self, name: str, why: str, instead: str) -> None:
        super().__init__(
            f"{name} is not offered under ftproxy: {why}; instead, {instead}", name=name
        )


# The booted runtime's stop_refused: nothing the program does can catch a refusal.
_stopper: Callable[[UnsupportedInGuest], None] | None = None


def refusal(name: str, why: str, instead: str = "") -> Callable[..., Any]:
    """A stand-in for ``name`` that raises UnsupportedInGuest saying ``why`` (and ``instead``)."""

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise UnsupportedInGuest(name, why, instead)

    refused.__name__ = name.rsplit(".", 1)[-1]
    return refused


class Network(Protocol):
    """Packet mode: the guest's own TCP/IP stack stands where the supervisor's sockets were."""

    def request(self, kind: int, args: tuple[Any, ...]) -> Any:
        """Answer a BIND, LISTEN or CONNECT request as the supervisor would."""
        ...

    def output(self, message: tuple[Any, ...]) -> None:
        """Take a socket output (send, sendto, shutdown, close)."""
        ...

    def timeout_ns(self, timeout_ns: int) -> int:
        """``timeout_ns`` (-1: none) shortened to the stack's next timer."""
        ...

    def settle(self, frames: list[bytes]) -> list[tuple[Any, ...]]:
        """Take received frames and due timers; return the sockets' new events."""
        ...


class GuestSocket(Protocol):
    """What the runtime needs of a virtual socket to hand it events."""

    wire_id: int

    def _on_event(self, event: tuple[Any, ...]) -> None: ...

    def _wants_input(self) -> bool: ...

    def _write_blocked(self) -> bool: ...


_OUTPUT_FLUSH_BYTES = 64 * 1024
_READ_SIZE = 64 * 1024
_iter_data_index = protocol.DATA_INDEX.iter_unpack
# Taken before the devices are installed: os._exit becomes a flushing wrapper,
# os.write one that knows virtual sockets.
_real_exit = os._exit
_os_write = os.write
_monotonic_ns = time.monotonic_ns
_poll = select.poll


class Runtime:
    """Instruction counter, virtual clock and the guest end of the pipe."""

    def __init__(
        self, reply_fd: int = protocol.REPLY_FD, request_fd: int = protocol.REQUEST_FD
    ) -> None:
        self._replies = io.FileIO(reply_fd, "rb", closefd=False)
        self._spin_ns = _spin_budget_ns()
        self._reply_poll = _poll()
        self._reply_poll.register(reply_fd, select.POLLIN)
        self._request_fd = request_fd
        # What was read from the reply pipe and not yet used: a replaying
        # supervisor writes replies ahead, and one read takes several.
        self._inbox = bytearray()
        self._inbox_at = 0
        self.icount = 0
        self._since_exit = 0
        self.exit_every: int = protocol.DEFAULT_EXIT_EVERY
        self.clock_step_ns: int = protocol.DEFAULT_CLOCK_STEP_NS
        # The virtual clock (protocol.GuestClock's arithmetic, inline: time.*
        # calls it often): monotonic at the last reply, wall minus monotonic.
        self._mono_base = 0
        self._wall_offset = 0
        self._icount_base = 0
        self._outbox: list[tuple[Any, ...]] = []
        self._outbox_bytes = 0
        self.digest = 0
        # Live sockets by wire id (those that take part in exits) and by fd.
        # Weak, so that a socket the program drops is collected and closed.
        self.sockets: weakref.WeakValueDictionary[int, GuestSocket] = weakref.WeakValueDictionary()
        self.by_fd: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        # Sockets whose unacknowledged output passed half their send buffer.
        self.pressured: set[int] = set()
        self._next_fd = protocol.FIRST_GUEST_SOCK
        self.signal_sink: Callable[[int], None] = _no_signal_sink
        self._pending_signals: list[int] = []
        self._in_exit = False
        # Packet mode's stack (None in socket mode, where the supervisor holds the sockets).
        self.network: Network | None = None

    # -- counting and time -------------------------------------------------

    def tick(self) -> None:
        """Count one device call; exit for a poll after ``exit_every`` of them."""
        self.icount += 1
        self._since_exit += 1
        if self._since_exit >= self.exit_every and not self._in_exit:
            self.poll()

    def mono_ns(self) -> int:
        return self._mono_base + (self.icount - self._icount_base) * self.clock_step_ns

    def wall_ns(self) -> int:
        return self.mono_ns() + self._wall_offset

    def allocate_fd(self) -> int:
        fd = self._next_fd
        self._next_fd += 1
        return fd

    # -- outputs -----------------------------------------------------------

    def emit(self, message: tuple[Any, ...], payload: bytes = b"") -> None:
        """Queue an output; it streams out at the next exit or when the buffer fills."""
        if payload:
            self.digest = zlib.crc32(payload, zlib.crc32(b"%d:%d:" % message[:2], self.digest))
        else:
            self.digest = zlib.crc32(b"%d:%d" % message[:2], self.digest)
        self._outbox.append(message)
        self._outbox_bytes += len(payload)
        if self._outbox_bytes >= _OUTPUT_FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._outbox:
            self._write(protocol.encode(self._outbox))
            self._outbox = []
            self._outbox_bytes = 0

    def _write(self, frame: bytes) -> None:
        view = memoryview(frame)
        while view:
            try:
                written = _os_write(self._request_fd, view)
            except BrokenPipeError:
                _lost_supervisor()  # one line, then exit: no traceback for the user
            view = view[written:]

    # -- what sockets ask -------------------------------------------------

    def request(self, kind: int, args: tuple[Any, ...]) -> Any:
        """A socket's set-up request: an exit (socket mode) or the guest's stack (packet mode)."""
        if self.network is not None:
            return self.network.request(kind, args)
        return self.exit(kind, args)

    def socket_output(self, message: tuple[Any, ...], payload: bytes = b"") -> None:
        """A socket's output: to the supervisor (socket mode) or the guest's stack (packet mode)."""
        if self.network is not None:
            self.network.output(message)
        else:
            self.emit(message, payload)

    # -- exits -------------------------------------------------------------

    def exit(self, kind: int, args: tuple[Any, ...]) -> Any:
        """Leave for the supervisor; return the result of its reply."""
        self._in_exit = True
        try:
            self._outbox.append((protocol.OP_EXIT, self.icount, kind, args, self.digest))
            frame = protocol.encode(self._outbox)
            self._outbox = []
            self._outbox_bytes = 0
            if _trace.stamp is not None:
                _trace.stamp(_trace.GUEST_WROTE, -1)
            self._write(frame)
            icount, answers_kind, digest, body = self._read_reply()
            if (icount, answers_kind, digest) != (self.icount, kind, self.digest) and (
                icount != protocol.ANY_EXIT
            ):
                self._halt("the reply answers another exit")  # diverged: stop here
            reply = protocol.decode_body(body)
            if _trace.stamp is not None:
                _trace.stamp(_trace.GUEST_WOKE, -1)
        finally:
            self._in_exit = False
        self._since_exit = 0
        if reply[0] is None:
            self._halt(reply[1])
        self._mono_base = self.mono_ns() + reply[0]
        if len(reply) == 3:
            self._wall_offset += reply[2]
        self._icount_base = self.icount
        return reply[1]

    def boot(self) -> tuple[bytes, int, str, Any]:
        """The first exit: learn the pinned policy; return (seed, pid, hostname, network)."""
        seed, pid, exit_every, clock_step_ns, hostname, network = self.exit(protocol.KIND_BOOT, ())
        self.exit_every = exit_every
        self.clock_step_ns = clock_step_ns
        return seed, pid, hostname, network

    def wait(
        self,
        deadline_ns: int | None,
        readable: Sequence[GuestSocket],
        writable: Sequence[GuestSocket],
    ) -> None:
        """Block until input for ``readable``, room in ``writable``, a signal or the deadline."""
        timeout = -1 if deadline_ns is None else max(0, deadline_ns - self.mono_ns())
        if self.network is not None:
            # The stack may hold input already (more than one event's worth), and
            # its timers (retransmissions) must fire even while the program sleeps.
            if self._settle_network([]):
                return
            timeout = self.network.timeout_ns(timeout)
        want_in = [s.wire_id for s in readable if s._wants_input()]
        want_out = [s.wire_id for s in writable if s._write_blocked()]
        self._exit_wait(timeout, want_in, want_out)

    def poll(self) -> None:
        """A forced exit: take whatever input is ready for any socket, without waiting."""
        want_in = [sid for sid, s in self.sockets.items() if s._wants_input()]
        want_out = [sid for sid, s in self.sockets.items() if s._write_blocked()]
        self._exit_wait(0, want_in, want_out)

    def _exit_wait(self, timeout: int, want_in: list[int], want_out: list[int]) -> None:
        index, blob, events = self.exit(
            protocol.KIND_WAIT, (timeout, want_in, want_out, sorted(self.pressured))
        )
        sockets = self.sockets
        offset = 0
        for sid, length in _iter_data_index(index):
            sock = sockets.get(sid)
            if sock is not None:
                sock._on_event((protocol.EV_DATA, sid, blob[offset : offset + length]))
            offset += length
        if not events:
            if self.network is not None:
                self._settle_network([])  # the stack's timers are due
            return
        signals = self._pending_signals
        frames: list[bytes] = []
        for event in events:
            tag = event[0]
            if tag == protocol.EV_SIGNAL:
                signals.append(event[1])
                continue
            if tag == protocol.EV_FRAME:
                frames.append(event[1])
                continue
            sock = sockets.get(event[1])
            if sock is not None:
                sock._on_event(event)
        if self.network is not None:
            self._settle_network(frames)
        if signals:
            self._pending_signals = []
            for signum in signals:
                self.signal_sink(signum)

    def _settle_network(self, frames: list[bytes]) -> bool:
        """Run the stack on ``frames`` and its due timers; hand out what that made ready."""
        assert self.network is not None
        events = self.network.settle(frames)
        for event in events:
            sock = self.sockets.get(event[1])
            if sock is not None:
                sock._on_event(event)
        return bool(events)

    def _read_reply(self) -> tuple[int, int, int, bytearray]:
        """The next reply: the exit it answers (icount, kind, digest) and its body."""
        head = protocol.REPLY_HEAD
        self._fill(head.size)
        length, icount, kind, digest = head.unpack_from(self._inbox, self._inbox_at)
        if length > protocol.MAX_FRAME:
            _lost_supervisor()
        self._fill(head.size + length)
        # After the fill: it may have moved the unread bytes to the inbox's start.
        start = self._inbox_at + head.size
        self._inbox_at = start + length
        return icount, kind, digest, self._inbox[start : start + length]

    def _fill(self, n: int) -> None:
        """Read until the inbox holds ``n`` unused bytes (one read takes all there is)."""
        inbox = self._inbox
        while len(inbox) - self._inbox_at < n:
            if self._spin_ns:
                # The reply often comes within microseconds: polling for it costs
                # less than sleeping and being woken from another CPU.
                poll = self._reply_poll.poll
                end = _monotonic_ns() + self._spin_ns
                while not poll(0) and _monotonic_ns() < end:
                    pass
            if self._inbox_at:
                del inbox[: self._inbox_at]
                self._inbox_at = 0
            chunk = self._replies.read(max(_READ_SIZE, n - len(inbox)))
            if not chunk:
                _lost_supervisor()
            inbox += chunk

    def stop_on_refusal(self) -> None:
        """From now on, a refusal stops the guest where the call was made."""
        global _stopper
        _stopper = self.stop_refused

    def stop_refused(self, refusal: UnsupportedInGuest) -> None:
        """Say what was refused, where and what to do instead; end the guest with
        EXIT_UNSUPPORTED."""
        caller = sys._getframe(2)
        site = _call_site(caller)
        refusal.instead = _library_advice(caller, refusal.function) or refusal.instead
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        _os_write(2, f"ftproxy: the guest stopped: {refusal}{site}\n".encode(errors="replace"))
        self.flush()
        _real_exit(EXIT_UNSUPPORTED)

    def _halt(self, reason: str) -> None:
        """The supervisor stops this guest (a divergence): report where we are and go."""
        import traceback

        # The program's frames only: the runtime's and runpy's say nothing to a user.
        frames = [
            frame
            for frame in traceback.extract_stack(sys._getframe(1))
            if "/ftproxy/guest/" not in frame.filename and "runpy" not in frame.filename
        ]
        stack = "".join(traceback.format_list(frames))
        self._write(protocol.encode([(protocol.OP_STACK, stack)]))
        _real_exit(70)


def _call_site(frame: Any) -> str:
    """Where the refused call was made: the library line, and the program's own line."""
    where: list[str] = []
    while frame is not None and len(where) < 2:
        filename = frame.f_code.co_filename
        if "/ftproxy/guest/" not in filename and not filename.startswith("<frozen"):
            own = not _is_library(filename)
            if not where or own:
                where.append(f"{filename}:{frame.f_lineno}")
            if own:
                break
        frame = frame.f_back
    if not where:
        return ""
    if len(where) == 1:
        return f" (called at {where[0]})"
    return f" (called at {where[0]}, from {where[1]})"


# What to use instead when the refused call (by name prefix) comes from one of
# these libraries (a thread pool, a forking server, a multi-process server):
# searched from the refused call outwards, up to the program's own code.
_LIBRARY_ADVICE = (
    (
        "concurrent/futures/",
        ("threading.", "_thread."),
        "run the work inline, or run_in_executor(None, ...) under asyncio",
    ),
    (
        "socketserver.py",
        ("os.fork",),
        "use the plain server class (socketserver.TCPServer, http.server.HTTPServer)",
    ),
    ("multiprocessing/", ("",), "run one process (uvicorn and gunicorn: --workers 1)"),
)


def _library_advice(frame: Any, function: str) -> str:
    while frame is not None:
        filename = frame.f_code.co_filename.replace(os.sep, "/")
        if "/ftproxy/guest/" not in filename:
            for where, functions, advice in _LIBRARY_ADVICE:
                if where in filename and function.startswith(functions):
                    return advice
            if not _is_library(filename):
                return ""
        frame = frame.f_back
    return ""


_STDLIB = os.path.dirname(os.__file__).replace(os.sep, "/") + "/"


def _is_library(filename: str) -> bool:
    """Whether ``filename`` is the stdlib's or an installed package's, not the program's."""
    filename = filename.replace(os.sep, "/")
    return filename.startswith(_STDLIB) or "-packages/" in filename or filename.startswith("<")


def _spin_budget_ns() -> int:
    try:
        return max(0, int(os.environ.pop(SPIN_ENV, "0"))) * 1000
    except ValueError:
        return 0


def _no_signal_sink(signum: int) -> None:
    pass


def _lost_supervisor() -> NoReturn:
    try:
        sys.stderr.write("ftproxy guest: the supervisor went away; stopping\n")
        sys.stderr.flush()
    except OSError:
        pass
    _real_exit(75)
    raise AssertionError("unreachable")  # os._exit does not return (tests may replace it)
