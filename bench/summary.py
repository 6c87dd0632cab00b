"""From cells to figures: per-load summaries, ratios, and the targets.

Per configuration and load, throughput and latencies are geometric means over
the operations it supports (SET, GET at 16 B and 4 KiB, INCR); ratios are
taken cell by cell against the same cell of the reference configuration, then
averaged geometrically over the cells both support.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

from bench.plan import BARE, NO_RULE, RECORD, RULE, RULE_SILENT

Cell = dict[str, Any]


def geomean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and v > 0]
    if not present:
        return None
    return math.exp(statistics.fmean(math.log(v) for v in present))


def _max(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _pooled(cells: list[Cell], numerator: str, denominator: str) -> float | None:
    """sum(numerator x requests) / sum(denominator x requests): a ratio over all bytes."""
    top = bottom = 0.0
    for cell in cells:
        if cell.get(numerator) is None or not cell.get(denominator):
            continue
        top += cell[numerator] * cell["requests"]
        bottom += cell[denominator] * cell["requests"]
    return top / bottom if bottom else None


def supported(cells: list[Cell]) -> list[Cell]:
    return [c for c in cells if c.get("supported")]


def by_load(cells: list[Cell]) -> dict[str, dict[str, Any]]:
    """Summary figures per load over a configuration's supported cells."""
    out: dict[str, dict[str, Any]] = {}
    for load in dict.fromkeys(c["load"] for c in cells):
        mine = [c for c in supported(cells) if c["load"] == load]
        out[load] = {
            "cells": len(mine),
            "rps": geomean(c["rps"] for c in mine),
            "p50_ms": geomean(c["p50_ms"] for c in mine),
            "p99_ms": geomean(c["p99_ms"] for c in mine),
            "p999_ms": geomean(c["p999_ms"] for c in mine),
            "cpu_primary_s_per_request": geomean(c["cpu_primary_s_per_request"] for c in mine),
            "cpu_backup_s_per_request": geomean(c["cpu_backup_s_per_request"] for c in mine),
            "log_bytes_per_request": geomean(c["log_bytes_per_request"] for c in mine),
            "log_bytes_per_input_byte": _pooled(
                mine, "log_bytes_per_request", "input_bytes_per_request"
            ),
            "channel_bytes_per_input_byte": _pooled(
                mine, "channel_bytes_per_request", "input_bytes_per_request"
            ),
            "lag_entries_p99": _max(c["lag_entries_p99"] for c in mine),
            "lag_ms_p99": _max(c["lag_ms_p99"] for c in mine),
            "channel_rtt_ms_p50": _median(c["channel_rtt_ms_p50"] for c in mine),
            "channel_rtt_ms_p99": _max(c["channel_rtt_ms_p99"] for c in mine),
        }
    return out


def _key(cell: Cell) -> tuple[str, str, int | None]:
    return (cell["load"], cell["op"], cell["size"])


def add_ratios(configs: dict[str, dict[str, Any]]) -> None:
    """Per cell, ``vs_bare`` and ``vs_no_output_rule`` (throughput and p50 ratios);
    per load, their geometric means."""
    references = {"vs_bare": BARE, "vs_no_output_rule": NO_RULE}
    for config in configs.values():
        for field, reference in references.items():
            ref = {_key(c): c for c in supported(configs.get(reference, {}).get("cells", []))}
            for cell in config["cells"]:
                other = ref.get(_key(cell))
                cell[field] = (
                    {"rps": cell["rps"] / other["rps"], "p50": cell["p50_ms"] / other["p50_ms"]}
                    if cell.get("supported") and other is not None
                    else None
                )
            for load, summary in config["by_load"].items():
                pairs = [c[field] for c in config["cells"] if c["load"] == load and c[field]]
                summary[field] = {
                    "rps": geomean(p["rps"] for p in pairs),
                    "p50": geomean(p["p50"] for p in pairs),
                }


def _cells(configs: dict[str, dict[str, Any]], name: str) -> list[Cell]:
    return supported(configs.get(name, {}).get("cells", []))


def targets(configs: dict[str, dict[str, Any]], failover: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's six targets, each with the figure reached and whether it is met."""
    out = []
    rule, no_rule = _cells(configs, RULE), _cells(configs, NO_RULE)
    one_rule = {_key(c): c for c in rule if c["clients"] == 1 and c["pipeline"] == 1}
    one_pairs = [(c, one_rule[_key(c)]) for c in no_rule if _key(c) in one_rule]
    added = _median(r["p50_ms"] - n["p50_ms"] for n, r in one_pairs)
    rtt = _median(r["channel_rtt_ms_p50"] for _, r in one_pairs)
    ratio = added / rtt if added is not None and rtt else None
    out.append(
        _target(
            "latency added by the output rule (p50, 1 client) <= 1.5x log-channel RTT",
            ratio,
            1.5,
            "<=",
            f"added {_ms(added)} (median over 1-client cells), channel RTT p50 {_ms(rtt)}",
        )
    )
    fifty = [
        c["vs_no_output_rule"]["rps"]
        for c in rule
        if c["clients"] == 50 and c.get("vs_no_output_rule")
    ]
    out.append(
        _target(
            "throughput with the output rule >= 0.95x without it (50 clients)",
            geomean(fifty),
            0.95,
            ">=",
            "geometric mean over the 50-client cells",
        )
    )
    record = [c for c in _cells(configs, RECORD) if c.get("vs_bare")]
    per_load = {
        load: geomean(c["vs_bare"]["rps"] for c in record if c["load"] == load)
        for load in dict.fromkeys(c["load"] for c in record)
    }
    out.append(
        _target(
            "record >= 0.67x bare throughput",
            geomean(c["vs_bare"]["rps"] for c in record),
            0.67,
            ">=",
            "all cells; per load: " + ", ".join(f"{k} {_x(v)}" for k, v in per_load.items()),
        )
    )
    series = failover.get(RULE, {})
    p50 = (series.get("failover_s") or {}).get("p50")
    lost = series.get("lost_acknowledged_writes")
    complete = series.get("failed") == 0 and bool(series.get("trials"))
    met = p50 is not None and p50 <= 0.7 and lost == 0 and complete
    out.append(
        {
            "target": "failover p50 <= 0.7 s, 0 lost acknowledged writes in every run",
            "figure": p50,
            "limit": 0.7,
            "met": met,
            "detail": f"p50 {_s(p50)} over {series.get('completed', 0)} kills, "
            f"{series.get('failed', 0)} failed; lost acknowledged writes {lost}"
            f" (--no-output-rule: {failover.get(NO_RULE, {}).get('lost_acknowledged_writes')}); "
            f"silent primary (SIGSTOP, detected by the 500 ms heartbeat timeout): p50 "
            f"{_s(((failover.get(RULE_SILENT) or {}).get('failover_s') or {}).get('p50'))}, "
            f"lost {(failover.get(RULE_SILENT) or {}).get('lost_acknowledged_writes')}",
        }
    )
    sets = [c for c in rule if c["op"] == "set" and c["clients"] == 50]
    ratios = {c["label"]: c["log_bytes_per_input_byte"] for c in sets}
    wire = {c["label"]: c.get("channel_bytes_per_input_byte") for c in sets}
    out.append(
        _target(
            "log bytes <= 1.2x client input bytes (SET, 50 clients)",
            _max(ratios.values()),
            1.2,
            "<=",
            "worst of "
            + ", ".join(f"{k} {_x(v)}" for k, v in ratios.items())
            + "; on the wire (TCP bytes, framing and heartbeats included): "
            + ", ".join(f"{k} {_x(v)}" for k, v in wire.items()),
        )
    )
    lag = _max(c["lag_ms_p99"] for c in rule if c["clients"] == 50)
    entries = _max(c["lag_entries_p99"] for c in rule if c["clients"] == 50)
    out.append(
        _target(
            "backup lag p99 <= 100 ms (50 clients)",
            lag,
            100.0,
            "<=",
            f"worst 50-client cell: {_ms(lag)}, {entries} entries",
        )
    )
    return out


def _target(name: str, figure: float | None, limit: float, op: str, detail: str) -> dict[str, Any]:
    met = None if figure is None else (figure <= limit if op == "<=" else figure >= limit)
    return {"target": name, "figure": figure, "limit": limit, "met": met, "detail": detail}


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} ms"


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"
