"""Virtual signals: SIGINT, SIGTERM and friends arrive as logged events at an exit.

The guest process itself ignores real SIGINT (it runs in a session of its own
anyway); its supervisor catches the signal and delivers it at the guest's next
exit, the same exit on the backup, so both replicas stop at the same point of
the execution. Handlers registered with ``signal.signal`` and the asyncio-style
wakeup fd (``signal.set_wakeup_fd``) work as they do natively.
"""

from __future__ import annotations

import os
import signal as _signal
import sys
from collections.abc import Callable
from typing import Any

from ftproxy.guest._runtime import Runtime, refusal

Handler = Callable[[int, Any], Any] | int | None

_runtime: Runtime
_handlers: dict[int, Handler] = {}
_wakeup_fd = -1
_real_signal = _signal.signal
_real_kill = os.kill
_real_getpid = os.getpid
_real_exit = os._exit
# Signals whose default action ends the process; the rest are ignored by default.
_FATAL_BY_DEFAULT = {
    int(getattr(_signal, name))
    for name in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(_signal, name)
}


def bind_runtime(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime
    runtime.signal_sink = deliver
    for signum in _signal.valid_signals():
        _handlers[int(signum)] = _signal.getsignal(signum)
    # Real SIGINT must not interrupt the guest at a point of the host's choosing.
    _real_signal(_signal.SIGINT, _signal.SIG_IGN)


def signal(signalnum: int, handler: Handler) -> Handler:
    signalnum = int(signalnum)
    if not 0 < signalnum < _signal.NSIG:
        raise ValueError("signal number out of range")
    if signalnum in (_signal.SIGKILL, _signal.SIGSTOP):
        raise OSError(22, "Invalid argument")
    previous = getsignal(signalnum)
    _handlers[signalnum] = handler
    return previous


def getsignal(signalnum: int) -> Handler:
    return _handlers.get(int(signalnum), _signal.SIG_DFL)


def set_wakeup_fd(fd: int, *, warn_on_full_buffer: bool = True) -> int:
    global _wakeup_fd
    if fd != -1 and fd not in _runtime.by_fd:
        raise ValueError(f"the fd {fd} must be a virtual socket (a socketpair end) under ftproxy")
    previous, _wakeup_fd = _wakeup_fd, fd
    return previous


def siginterrupt(signalnum: int, flag: bool) -> None:
    return None


def raise_signal(signalnum: int) -> None:
    deliver(int(signalnum))


def deliver(signum: int) -> None:
    """Run what the program registered for ``signum``, at this point of its execution."""
    if _wakeup_fd != -1:
        sock = _runtime.by_fd.get(_wakeup_fd)
        pair = getattr(sock, "_pair", None)
        if pair is not None and not pair._closed:
            pair._rbuf += bytes([signum])
    handler = _handlers.get(signum, _signal.SIG_DFL)
    if handler == _signal.SIG_IGN:
        return
    if handler == _signal.SIG_DFL or handler is None:
        if signum in _FATAL_BY_DEFAULT:
            _die_by(signum)
        return
    if callable(handler):
        handler(signum, sys._getframe(1))


def _die_by(signum: int) -> None:
    """The default action: end the process by that signal, outputs flushed first."""
    _runtime.flush()
    _real_signal(signum, _signal.SIG_DFL)
    _real_kill(_real_getpid(), signum)
    _real_exit(128 + signum)


_TIMER_WHY = (
    "signal-driven timers fire at host-chosen points; use time.sleep, select or asyncio timers"
)

REPLACEMENTS: dict[str, Any] = {
    "signal": signal,
    "getsignal": getsignal,
    "set_wakeup_fd": set_wakeup_fd,
    "siginterrupt": siginterrupt,
    "raise_signal": raise_signal,
    "alarm": refusal("signal.alarm", _TIMER_WHY),
    "setitimer": refusal("signal.setitimer", _TIMER_WHY),
    "pause": refusal("signal.pause", "it waits for a host signal; the guest gets signals at exits"),
    "sigwait": refusal("signal.sigwait", "it waits for a host signal"),
    "sigwaitinfo": refusal("signal.sigwaitinfo", "it waits for a host signal"),
    "sigtimedwait": refusal("signal.sigtimedwait", "it waits for a host signal"),
}
