"""The results as tables: rich on the terminal, Markdown for the README.

``python -m bench.report RESULT.json`` prints a saved result as Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.machine import summary as machine_summary
from bench.plan import LABELS, SHORT

Table = tuple[str, list[str], list[list[str]]]  # title, header, rows
LEGEND = "Configurations: " + "; ".join(f"{SHORT[k]} = {v}" for k, v in LABELS.items()) + "."


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: dict[str, Any] | None, key: str = "rps") -> str:
    return "-" if not value or value.get(key) is None else f"{value[key]:.2f}x"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e6:,.0f}"


def _lag(summary: dict[str, Any]) -> str:
    if summary.get("lag_ms_p99") is None:
        return "-"
    entries = summary.get("lag_entries_p99")
    return f"{'-' if entries is None else entries} / {summary['lag_ms_p99']:.1f}"


def _rows(result: dict[str, Any], columns: int) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(configuration, load, summary) for every row; unavailable ones yield a note."""
    for name, config in result["configurations"].items():
        label = SHORT.get(name, name)
        if not config["available"]:
            yield label, f"not available: {config['reason']}", {}
            continue
        for load, s in config["by_load"].items():
            yield label, load, s if s["cells"] else {}


def speed_table(result: dict[str, Any]) -> Table:
    header = ["config", "load", "req/s", "vs bare", "vs no-rule", "p50 ms", "p99 ms", "p99.9 ms"]
    rows = []
    for label, load, s in _rows(result, len(header)):
        if not s:
            rows.append([label, load, *["-"] * (len(header) - 2)])
            continue
        rows.append(
            [
                label,
                load,
                _num(s["rps"], 0),
                _ratio(s.get("vs_bare")),
                _ratio(s.get("vs_no_output_rule")),
                _num(s["p50_ms"], 3),
                _num(s["p99_ms"], 3),
                _num(s["p999_ms"], 3),
            ]
        )
    title = (
        "Throughput and latency, same redis-benchmark load on every configuration "
        "(geometric mean over SET/GET 16 B and 4 KiB and INCR, where supported)"
    )
    return title, header, rows


def cost_table(result: dict[str, Any]) -> Table:
    header = [
        "config",
        "load",
        "CPU us/req primary",
        "CPU us/req backup",
        "log B/req",
        "log B / input B",
        "wire B / input B",
        "lag p99 entries / ms",
        "log RTT p50 ms",
    ]
    rows = []
    for label, load, s in _rows(result, len(header)):
        if not s:
            rows.append([label, load, *["-"] * (len(header) - 2)])
            continue
        rows.append(
            [
                label,
                load,
                _us(s["cpu_primary_s_per_request"]),
                _us(s["cpu_backup_s_per_request"]),
                _num(s["log_bytes_per_request"], 0),
                _num(s["log_bytes_per_input_byte"], 2),
                _num(s["channel_bytes_per_input_byte"], 2),
                _lag(s),
                _num(s["channel_rtt_ms_p50"], 3),
            ]
        )
    title = (
        "Costs: CPU per request (Raft: leader / both followers), log size "
        "(record: its file, outputs included), backup lag and log-channel round trip"
    )
    return title, header, rows


def failover_table(result: dict[str, Any]) -> Table:
    header = ["configuration", "kills", "failover p50 s", "p90 s", "max s", "lost acked writes"]
    rows = []
    for name, series in result["failover"].items():
        label = SHORT.get(name, name)
        if not series.get("trials"):
            rows.append([label, "0", "-", "-", "-", series.get("reason") or "not measured"])
            continue
        times = series["failover_s"]
        failed = f" ({series['failed']} failed)" if series["failed"] else ""
        rows.append(
            [
                label,
                f"{len(series['trials'])}{failed}",
                _num(times["p50"], 3),
                _num(times["p90"], 3),
                _num(times["max"], 3),
                f"{series['lost_acknowledged_writes']} in {series['runs_with_loss']} runs",
            ]
        )
    title = (
        "Failover under a write load: SIGKILL of the primary (Raft: the leader); "
        "SIGSTOP: the primary hangs, only the heartbeat timeout (500 ms) reveals it"
    )
    return title, header, rows


def targets_table(result: dict[str, Any]) -> Table:
    rows = []
    for t in result["targets"]:
        met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        figure = "-" if t["figure"] is None else f"{t['figure']:.3g}"
        rows.append([t["target"], figure, met, t["detail"]])
    return "Targets", ["target", "figure", "", "detail"], rows


def tables(result: dict[str, Any]) -> list[Table]:
    return [
        speed_table(result),
        cost_table(result),
        failover_table(result),
        targets_table(result),
    ]


def print_rich(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console()
    for title, header, rows in tables(result):
        table = RichTable(title=title, title_justify="left")
        for i, column in enumerate(header):
            table.add_column(column, justify="left" if i < 2 else "right", overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(LEGEND)
    console.print(f"Machine: {machine_summary(result['machine'])}")
    for line in failure_lines(result):
        console.print(line, style="bold red", markup=False, highlight=False)


def failure_lines(result: dict[str, Any]) -> list[str]:
    """Each failed cell with its reason, the tool's output and the logs' last lines."""
    lines = []
    for name, config in result["configurations"].items():
        for cell in config.get("cells", []):
            if not cell.get("failed"):
                continue
            lines.append(f"FAILED cell: {name} {cell['load']} {cell['label']}: {cell['reason']}")
            if cell.get("tool_output"):
                lines.append("  tool output: " + cell["tool_output"][-400:].replace("\n", "\n  "))
            for proc, info in cell.get("service_log", {}).items():
                tail = "\n    ".join(info["log_tail"].splitlines()[-5:])
                lines.append(f"  {proc} ({info['state']}), log ends:\n    {tail}")
    return lines


def markdown(result: dict[str, Any]) -> str:
    out = []
    for title, header, rows in tables(result):
        out.append(f"**{title}**\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" if i < 2 else "--:" for i in range(len(header))) + "|")
        out.extend("| " + " | ".join(row) + " |" for row in rows)
        out.append("")
    out.append(LEGEND)
    out.append(f"Machine: {machine_summary(result['machine'])}.")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description="print a saved result as Markdown"
    )
    parser.add_argument("result", type=Path, help="a bench/results/*.json file")
    args = parser.parse_args(argv)
    sys.stdout.write(markdown(json.loads(args.result.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
