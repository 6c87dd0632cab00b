"""What the numbers were taken on: the machine, the software, how busy it was."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.load import redis_benchmark_version
from bench.procs import ROOT


def describe() -> dict[str, Any]:
    """The machine and software of this run, as the JSON and the README report them."""
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "redis_benchmark": redis_benchmark_version(),
        "ftproxy_commit": _git("rev-parse", "--short", "HEAD"),
        "ftproxy_tree_dirty": bool(_git("status", "--porcelain", "--", "ftproxy", "examples")),
        "load_average": load_average(),
        "idle": idle_states(),
    }


_CPUIDLE = Path("/sys/devices/system/cpu/cpuidle")
_HALT_POLL_NS = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def idle_states(cpuidle: Path = _CPUIDLE, halt_poll_ns: Path = _HALT_POLL_NS) -> dict[str, Any]:
    """How an idle CPU waits: on a VM most of a process hop is waking a halted vCPU,
    so a run taken with the guest's halt polling on (``guest_halt_poll_ns`` > 0)
    is not comparable with one taken with it off."""
    return {
        "driver": _read(cpuidle / "current_driver"),
        "governor": _read(cpuidle / "current_governor_ro") or _read(cpuidle / "current_governor"),
        "guest_halt_poll_ns": _int_or_none(_read(halt_poll_ns)),
    }


def idle_summary(idle: dict[str, Any] | None) -> str:
    """'cpuidle haltpoll, guest halt polling off': what an idle vCPU does."""
    if not idle or not idle.get("driver"):
        return ""
    text = f"cpuidle {idle['driver']}"
    poll_ns = idle.get("guest_halt_poll_ns")
    if poll_ns is not None:
        text += f", guest halt polling {f'up to {poll_ns / 1000:g} us' if poll_ns else 'off'}"
    return text


def stamp(taken: str) -> str:
    """A run's name in bench/results/, from its ``taken`` time: 2026-12-07T213702Z."""
    moment = datetime.datetime.fromisoformat(taken).astimezone(datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H%M%SZ")


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: how busy the shared machine was."""
    return [round(v, 2) for v in os.getloadavg()]


def summary(machine: dict[str, Any]) -> str:
    """One line: '2 x AMD EPYC, 23 GiB, Linux 6.1, cpuidle haltpoll, guest halt
    polling off, Python 3.11.9, load 1.2' (runs from before the idle facts lack them)."""
    idle = idle_summary(machine.get("idle"))
    return (
        f"{machine['cpus']} x {machine['cpu_model']}, {machine['memory_gib']} GiB RAM, "
        f"Linux {machine['kernel']}, {idle + ', ' if idle else ''}Python {machine['python']}, "
        f"{machine['redis_benchmark']}, load average {machine['load_average'][0]} at start"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return ""
    return done.stdout.strip()
