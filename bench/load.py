"""Client load: redis-benchmark, parsed from its CSV output."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LoadResult:
    test: str
    clients: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def require_redis_benchmark() -> str:
    path = shutil.which("redis-benchmark")
    if path is None:
        raise SystemExit("bench: redis-benchmark is not installed (apt-get install redis-tools)")
    return path


def redis_benchmark(
    port: int, tests: str, *, clients: int, requests: int, pipeline: int = 1, size: int = 3
) -> list[LoadResult]:
    command = [
        require_redis_benchmark(),
        "-p",
        str(port),
        "-t",
        tests,
        "-n",
        str(requests),
        "-c",
        str(clients),
        "-P",
        str(pipeline),
        "-d",
        str(size),
        "--csv",
        "--precision",
        "3",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    rows = csv.DictReader(io.StringIO(done.stdout))
    return [
        LoadResult(
            test=row["test"],
            clients=clients,
            requests=requests,
            rps=float(row["rps"]),
            p50_ms=float(row["p50_latency_ms"]),
            p99_ms=float(row["p99_latency_ms"]),
            max_ms=float(row["max_latency_ms"]),
        )
        for row in rows
    ]
