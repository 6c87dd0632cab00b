"""Client load: redis-benchmark, with its full latency distribution parsed.

redis-benchmark is a C client driving every connection from one epoll loop, so
the client's own cost is small and the same for every configuration. Its CSV
output stops at p99; its full output carries the HdrHistogram percentile
series (50 %, 75 %, 87.5 %, ... halving towards 100 %) and a cumulative
distribution by latency bucket. Both are parsed into one CDF, from which p99.9
is read; p50 and p99 come from its summary line (exact HdrHistogram values).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from bench.procs import HOST

# "99.902% <= 13.543 milliseconds (cumulative count 19981)"
_CDF_LINE = re.compile(
    r"^\s*(?P<pct>[0-9.]+)% <= (?P<ms>[0-9.]+) milliseconds \(cumulative count (?P<n>\d+)\)"
)
# redis-benchmark times a run on a millisecond clock: a run that ends within one
# tick reports "inf requests per second".
_THROUGHPUT = re.compile(r"throughput summary: (?P<rps>[0-9.]+|inf) requests per second")
_COMPLETED = re.compile(r"(?P<n>\d+) requests completed in (?P<s>[0-9.]+) seconds")
_SUMMARY_HEADER = re.compile(r"^\s*avg\s+min\s+p50\s+p95\s+p99\s+max\s*$")
# A run too short to time is run again with twice the requests, up to this many.
MAX_TIMING_REQUESTS = 1_000_000


class TooShortToTime(ValueError):
    """The run ended within redis-benchmark's clock tick, so it has no rate to read."""


@dataclass(frozen=True)
class Load:
    """A client load shape: how many connections, how many requests in flight on each."""

    name: str
    clients: int
    pipeline: int


@dataclass(frozen=True)
class Op:
    """One redis-benchmark test (``-t``) with a value size (None: the op has no value)."""

    test: str
    size: int | None

    @property
    def label(self) -> str:
        return self.test.upper() if self.size is None else f"{self.test.upper()} {_size(self.size)}"

    def request(self) -> list[bytes]:
        """The request redis-benchmark sends for this test (its key is literal without -r):
        its size is the client input per request, and it probes for support."""
        if self.test == "incr":
            return [b"INCR", b"counter:__rand_int__"]
        if self.test == "get":
            return [b"GET", b"key:__rand_int__"]
        return [b"SET", b"key:__rand_int__", b"x" * (self.size or 3)]


@dataclass(frozen=True)
class Result:
    """What one redis-benchmark run measured."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    cdf: list[tuple[float, float]]  # (latency ms, fraction of requests at or below)


def _size(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def require_redis_benchmark() -> str:
    path = shutil.which("redis-benchmark")
    if path is None:
        raise SystemExit("bench: redis-benchmark is not installed (apt-get install redis-tools)")
    return path


def redis_benchmark_version() -> str:
    done = subprocess.run(
        [require_redis_benchmark(), "--version"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def run(port: int, load: Load, op: Op, requests: int, timeout: float = 300.0) -> Result:
    """Run one redis-benchmark test against ``port`` and parse its full report.

    A run that ends within redis-benchmark's millisecond clock has no rate; it
    is run again with twice the requests until it lasts long enough to time.
    """
    while True:
        try:
            return parse(_report(port, load, op, requests, timeout))
        except TooShortToTime:
            if requests * 2 > MAX_TIMING_REQUESTS:
                raise
            requests *= 2


def _report(port: int, load: Load, op: Op, requests: int, timeout: float) -> str:
    command = [
        require_redis_benchmark(),
        "-h",
        HOST,
        "-p",
        str(port),
        "-t",
        op.test,
        "-n",
        str(requests),
        "-c",
        str(load.clients),
        "-P",
        str(load.pipeline),
        "-d",
        str(op.size or 3),
        "--precision",
        "3",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
    return done.stdout


def parse(output: str) -> Result:
    """Parse redis-benchmark's full (non-CSV, non-quiet) report of one test."""
    lines = re.split(r"[\r\n]+", output)
    completed = _first(_COMPLETED, lines, "how many requests completed")
    throughput = _first(_THROUGHPUT, lines, "a throughput summary")
    total = int(completed["n"])
    if throughput["rps"] == "inf":
        raise TooShortToTime(f"{total} requests completed within redis-benchmark's 1 ms clock")
    points: dict[float, int] = {}
    for line in lines:
        match = _CDF_LINE.match(line)
        if match:
            ms, count = float(match["ms"]), int(match["n"])
            points[ms] = max(points.get(ms, 0), count)
    cdf = _monotone(sorted(points.items()), total)
    summary = _summary(lines)
    return Result(
        requests=total,
        seconds=float(completed["s"]),
        rps=float(throughput["rps"]),
        p50_ms=summary["p50"],
        p99_ms=summary["p99"],
        p999_ms=quantile(cdf, 0.999),
        max_ms=summary["max"],
        cdf=cdf,
    )


def _first(pattern: re.Pattern[str], lines: list[str], what: str) -> re.Match[str]:
    for line in lines:
        match = pattern.search(line)
        if match:
            return match
    raise ValueError(f"redis-benchmark printed no line with {what}")


def _monotone(points: list[tuple[float, int]], total: int) -> list[tuple[float, float]]:
    """Cumulative counts by latency as fractions, non-decreasing (the two series merged)."""
    out: list[tuple[float, float]] = []
    best = 0
    for ms, count in points:
        best = max(best, count)
        out.append((ms, round(best / total, 6)))
    return out


def quantile(cdf: list[tuple[float, float]], q: float) -> float:
    """The smallest latency whose cumulative fraction reaches ``q``."""
    for ms, fraction in cdf:
        if fraction >= q - 1e-9:
            return ms
    return cdf[-1][0] if cdf else float("nan")


def _summary(lines: list[str]) -> dict[str, float]:
    for i, line in enumerate(lines):
        if _SUMMARY_HEADER.match(line):
            values = [float(v) for v in lines[i + 1].split()]
            return dict(zip(("avg", "min", "p50", "p95", "p99", "max"), values, strict=True))
    raise ValueError("redis-benchmark printed no latency summary")
