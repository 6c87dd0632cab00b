"""Virtual time: every clock reads the runtime's virtual clock.

Virtual time moves at exits (the reply's clock snapshot) and by a fixed step at
every device call, so reading a clock never needs an exit of its own. The
functions that read the host's clock when given no argument (``localtime()``,
``strftime(fmt)``, ``ctime()``...) are given the virtual time instead.

``datetime`` stays the C module, whose C API extensions import (numpy, and so
fakeredis): its ``date.today`` reads ``time.time`` and so the virtual clock,
but ``datetime.now``/``utcnow`` read the host's clock in C, and C types take
no new attributes. ``datetime.datetime`` becomes a subclass that reads the
virtual clock there, and is otherwise the C class: it prints, pickles and
checks with ``isinstance`` as the C class does, and instances the C API makes
are instances of it.
"""

from __future__ import annotations

import copyreg
import datetime as _datetime
import time as _time
from typing import Any

from ftproxy.guest._runtime import Runtime

_runtime: Runtime
_boot_mono_ns = 0

_real_localtime = _time.localtime
_real_gmtime = _time.gmtime
_real_ctime = _time.ctime
_real_asctime = _time.asctime
_real_strftime = _time.strftime
_MONOTONIC_CLOCKS = {
    getattr(_time, name)
    for name in ("CLOCK_MONOTONIC", "CLOCK_MONOTONIC_RAW", "CLOCK_BOOTTIME")
    if hasattr(_time, name)
}
_CPU_CLOCKS = {
    getattr(_time, name)
    for name in ("CLOCK_PROCESS_CPUTIME_ID", "CLOCK_THREAD_CPUTIME_ID")
    if hasattr(_time, name)
}


def bind_runtime(runtime: Runtime) -> None:
    global _runtime, _boot_mono_ns
    _runtime = runtime
    _boot_mono_ns = runtime.mono_ns()


def time_ns() -> int:
    _runtime.tick()
    return _runtime.wall_ns()


def time() -> float:
    return time_ns() / 1e9


def monotonic_ns() -> int:
    _runtime.tick()
    return _runtime.mono_ns()


def monotonic() -> float:
    return monotonic_ns() / 1e9


perf_counter_ns = monotonic_ns
perf_counter = monotonic


def process_time_ns() -> int:
    # CPU time is virtual too: the steps the guest took since it booted.
    _runtime.tick()
    return _runtime.mono_ns() - _boot_mono_ns


def process_time() -> float:
    return process_time_ns() / 1e9


thread_time_ns = process_time_ns
thread_time = process_time


def clock_gettime_ns(clock_id: int) -> int:
    if clock_id in _MONOTONIC_CLOCKS:
        return monotonic_ns()
    if clock_id in _CPU_CLOCKS:
        return process_time_ns()
    return time_ns()


def clock_gettime(clock_id: int) -> float:
    return clock_gettime_ns(clock_id) / 1e9


def sleep(seconds: float) -> None:
    """Wait in an exit; only a signal ends it early, as for the real sleep."""
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    _runtime.tick()
    deadline = _runtime.mono_ns() + int(seconds * 1e9)
    while _runtime.mono_ns() < deadline:
        _runtime.wait(deadline, [], [])


def localtime(secs: float | None = None) -> _time.struct_time:
    return _real_localtime(time() if secs is None else secs)


def gmtime(secs: float | None = None) -> _time.struct_time:
    return _real_gmtime(time() if secs is None else secs)


def ctime(secs: float | None = None) -> str:
    return _real_ctime(time() if secs is None else secs)


def asctime(t: Any = None) -> str:
    return _real_asctime(localtime() if t is None else t)


def strftime(format: str, t: Any = None) -> str:
    return _real_strftime(format, localtime() if t is None else t)


class _DatetimeType(type):
    """``isinstance``/``issubclass`` answer for the C class: its instances are datetimes."""

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, _real_datetime)

    def __subclasscheck__(cls, subclass: Any) -> bool:
        return issubclass(subclass, _real_datetime)


_real_datetime = _datetime.datetime


class VirtualDatetime(_real_datetime, metaclass=_DatetimeType):
    """``datetime.datetime`` with ``now`` and ``utcnow`` on the virtual clock."""

    __slots__ = ()

    @classmethod
    def now(cls, tz: _datetime.tzinfo | None = None) -> Any:
        seconds, micros = _wall_seconds_micros()
        return cls.fromtimestamp(seconds, tz).replace(microsecond=micros)

    @classmethod
    def utcnow(cls) -> Any:
        seconds, micros = _wall_seconds_micros()
        return cls.utcfromtimestamp(seconds).replace(microsecond=micros)


# The C class's names: repr() prints tp_name ("datetime.datetime(2026, ...)"),
# pickle finds the class as datetime.datetime.
VirtualDatetime.__name__ = "datetime.datetime"
VirtualDatetime.__qualname__ = "datetime"
VirtualDatetime.__module__ = "datetime"


def install_datetime() -> None:
    """Put VirtualDatetime in the datetime module's place.

    A datetime the C API made (numpy's ``item()``, ``datetime.min``) is still
    of the C class, which pickle would look up as ``datetime.datetime`` and
    find another class: it pickles as a VirtualDatetime.
    """
    _datetime.datetime = VirtualDatetime  # type: ignore[misc]
    copyreg.pickle(_real_datetime, _reduce_real_datetime)


def _reduce_real_datetime(instance: _datetime.datetime) -> tuple[Any, ...]:
    return (VirtualDatetime, instance.__reduce__()[1])


def _wall_seconds_micros() -> tuple[int, int]:
    micros = time_ns() // 1000
    return micros // 1_000_000, micros % 1_000_000


REPLACEMENTS = {
    "time": time,
    "time_ns": time_ns,
    "monotonic": monotonic,
    "monotonic_ns": monotonic_ns,
    "perf_counter": perf_counter,
    "perf_counter_ns": perf_counter_ns,
    "process_time": process_time,
    "process_time_ns": process_time_ns,
    "thread_time": thread_time,
    "thread_time_ns": thread_time_ns,
    "clock_gettime": clock_gettime,
    "clock_gettime_ns": clock_gettime_ns,
    "sleep": sleep,
    "localtime": localtime,
    "gmtime": gmtime,
    "ctime": ctime,
    "asctime": asctime,
    "strftime": strftime,
}
