"""From cells to figures: per-load summaries and ratios (the targets: bench/targets.py).

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

from bench.plan import BARE, NO_RULE

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
