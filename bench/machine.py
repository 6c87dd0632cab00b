"""What the numbers were taken on: the machine, the software, how busy it was."""

from __future__ import annotations

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
    }


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: how busy the shared machine was."""
    return [round(v, 2) for v in os.getloadavg()]


def summary(machine: dict[str, Any]) -> str:
    """One line: '2 x AMD EPYC, 23 GiB, Linux 6.1, Python 3.11.9, load 1.2'."""
    return (
        f"{machine['cpus']} x {machine['cpu_model']}, {machine['memory_gib']} GiB RAM, "
        f"Linux {machine['kernel']}, Python {machine['python']}, "
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


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return ""
    return done.stdout.strip()
