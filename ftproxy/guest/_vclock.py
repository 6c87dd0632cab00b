"""Virtual time: every clock reads the runtime's virtual clock.

Virtual time moves at exits (the reply's clock snapshot) and by a fixed step at
every device call, so reading a clock never needs an exit of its own. The
functions that read the host's clock when given no argument (``localtime()``,
``strftime(fmt)``, ``ctime()``...) are given the virtual time instead.
"""

from __future__ import annotations

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
