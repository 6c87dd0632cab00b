"""``python -m bench``: the record overhead, kv.py bare versus under ftproxy record.

Both configurations take the same client load in the same run, one after the
other, and the figures are compared as ratios, because absolute numbers on a
shared machine say little. Results are printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from bench.load import redis_benchmark, require_redis_benchmark
from bench.services import bare_kv, recorded_kv

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def measure(quick: bool) -> dict[str, Any]:
    requests_1 = 2000 if quick else 10000
    requests_50 = 5000 if quick else 50000
    figures: dict[str, Any] = {}
    for name, start in (("bare", bare_kv), ("record", recorded_kv)):
        with start() as service:
            cpu_before = service.cpu_seconds()
            one = redis_benchmark(service.port, "set,get", clients=1, requests=requests_1)
            fifty = redis_benchmark(service.port, "set,get", clients=50, requests=requests_50)
            cpu = service.cpu_seconds() - cpu_before
        total = 2 * (requests_1 + requests_50)
        figures[name] = {
            "loads": [r.as_dict() for r in one + fifty],
            "cpu_s_per_request": cpu / total,
        }
    return figures


def ratios(figures: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for bare, rec in zip(figures["bare"]["loads"], figures["record"]["loads"], strict=True):
        rows.append(
            {
                "test": bare["test"],
                "clients": bare["clients"],
                "bare_rps": bare["rps"],
                "record_rps": rec["rps"],
                "throughput_ratio": rec["rps"] / bare["rps"],
                "p50_ratio": rec["p50_ms"] / bare["p50_ms"] if bare["p50_ms"] else None,
                "p99_ratio": rec["p99_ms"] / bare["p99_ms"] if bare["p99_ms"] else None,
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ftproxy record vs bare kv.py (same run, same load)")
    for column in ("test", "clients", "bare req/s", "record req/s", "throughput", "p50", "p99"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["test"],
            str(row["clients"]),
            f"{row['bare_rps']:,.0f}",
            f"{row['record_rps']:,.0f}",
            f"{row['throughput_ratio']:.2f}x",
            f"{row['p50_ratio']:.2f}x" if row["p50_ratio"] else "-",
            f"{row['p99_ratio']:.2f}x" if row["p99_ratio"] else "-",
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    require_redis_benchmark()
    figures = measure(args.quick)
    result = {
        "taken": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine(),
        "figures": figures,
        "ratios": ratios(figures),
    }
    print_table(result["ratios"])
    RESULTS.mkdir(exist_ok=True)
    stamp = result["taken"].replace(":", "").replace("+0000", "Z")
    paths = [RESULTS / f"record-overhead-{stamp}.json"]
    if args.json:
        paths.append(Path(args.json))
    for path in paths:
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"bench: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
