"""The results as tables: rich on the terminal, Markdown for the README.

``python -m bench report RESULT.json`` prints a saved result's tables again;
``--markdown`` (or ``python -m bench.report RESULT.json``) prints it as the
README's Performance section.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.machine import summary as machine_summary
from bench.plan import LABELS, SHORT
from bench.procs import ROOT

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


def _figure(target: dict[str, Any]) -> str:
    figure = target["figure"]
    if figure is None:
        return "-"
    return f"{figure:.3g}"


def _status(target: dict[str, Any]) -> str:
    if "status" in target:
        return str(target["status"])
    return {True: "met", False: "MISSED", None: "not measured"}[target["met"]]


def targets_table(result: dict[str, Any]) -> Table:
    rows = []
    for t in result["targets"]:
        limit = f"{t.get('op', '')} {t['limit']:g}".strip()
        rows.append(
            [t["target"], _figure(t), limit, _status(t), t["detail"], t.get("reason") or ""]
        )
    title = (
        "Targets (issue 12, then the older product claims): met only if every figure it "
        "needs was measured; the reason is measured in this same run"
    )
    return title, ["target", "figure", "limit", "verdict", "detail", "measured reason"], rows


def breakdown_table(result: dict[str, Any]) -> Table | None:
    """p50 per stage of a 1-client request, per configuration (bench/breakdown.py)."""
    if "breakdown" not in result:  # a run from before the breakdown was part of it
        return None
    found = result["breakdown"] or {}
    results = found.get("results")
    title = "Where a 1-client request's time goes (p50 us per stage, every process stamping)"
    if not results:
        reason = found.get("error") or "not measured in this run"
        return title, ["stage", "figure"], [["breakdown", reason]]
    keys = list(results)
    names: list[str] = []
    for key in keys:
        for row in results[key]["stages"]:
            if row["stage"] not in names:
                names.append(row["stage"])
    rows = []
    for name in names:
        cells = []
        for key in keys:
            row = next((r for r in results[key]["stages"] if r["stage"] == name), None)
            if row is None or row["p50_us"] is None:
                cells.append("-")
                continue
            share = row["n"] * 100 // max(1, results[key]["requests"])
            cells.append(f"{row['p50_us']:,.0f}" + ("" if share >= 90 else f" ({share}%)"))
        rows.append([name, *cells])
    rows.append(["client p50 us", *[_num(results[k]["client_p50_us"], 0) for k in keys]])
    rows.append(["client req/s", *[_num(results[k]["client_rps"], 0) for k in keys]])
    for i, side in enumerate(("primary", "backup")):
        rows.append(
            [
                f"CPU us/req {side}",
                *[
                    "-"
                    if results[k]["config"] == "record" and i == 1
                    else _num(results[k]["cpu_us_per_request"][i], 0)
                    for k in keys
                ],
            ]
        )
    header = ["stage", *[k.removesuffix("@this") for k in keys]]
    note = f": {found['load']}" if found.get("load") else ""
    return title + note, header, rows


def floors_table(result: dict[str, Any]) -> Table | None:
    """This machine's one-byte round trips between two processes (bench/floors.py)."""
    from bench.floors import LABELS

    if "floors" not in result:
        return None
    found = result["floors"] or {}
    title = "Floors of this machine, same run: one-byte round trips between two processes"
    header = ["floor", "p50 us", "p90 us", "p99 us", "trips"]
    if "tcp" not in found:
        return title, header, [["floors", found.get("error") or "not measured", "-", "-", "-"]]
    rows = [
        [
            label,
            _num(found[key]["p50_us"], 1),
            _num(found[key]["p90_us"], 1),
            _num(found[key]["p99_us"], 1),
            f"{found[key]['trips']:,}",
        ]
        for key, label in LABELS.items()
        if key in found  # a run saved before this floor was measured has none
    ]
    return title, header, rows


def tables(result: dict[str, Any]) -> list[Table]:
    out = [
        speed_table(result),
        cost_table(result),
        failover_table(result),
        targets_table(result),
    ]
    out += [t for t in (breakdown_table(result), floors_table(result)) if t is not None]
    return out


def print_rich(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console(width=max(Console().width, 120))
    targets = targets_table(result)
    for title, header, rows in tables(result):
        long_text = title == targets[0]  # detail and reason: printed below the table
        table = RichTable(title=title, title_justify="left")
        for i, column in enumerate(header[:4] if long_text else header):
            left = i == 0 or _text_column(rows, i)
            table.add_column(column, justify="left" if left else "right", overflow="fold")
        for row in rows:
            table.add_row(*(row[:4] if long_text else row))
        console.print(table)
        if long_text:
            for target, *_, detail, reason in rows:
                console.print(f"- {target}: {detail}", markup=False, highlight=False)
                if reason:
                    console.print(f"  why: {reason}", markup=False, highlight=False)
    console.print(LEGEND)
    console.print(f"Machine: {machine_summary(result['machine'])}")
    for line in failure_lines(result):
        console.print(line, style="bold red", markup=False, highlight=False)
    for line in slow_kill_lines(result):
        console.print(line, style="yellow", markup=False, highlight=False)


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


def _table_markdown(table: Table) -> list[str]:
    title, header, rows = table
    out = [f"**{title}**", ""]
    out.append("| " + " | ".join(header) + " |")
    aligns = ["---" if i == 0 or _text_column(rows, i) else "--:" for i in range(len(header))]
    out.append("|" + "|".join(aligns) + "|")
    out.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)
    out.append("")
    return out


def _text_column(rows: list[list[str]], i: int) -> bool:
    """Left-aligned unless every cell is a figure ("1,234", "0.37x", "43 (72%)", "-")."""
    return not all(_FIGURE.fullmatch(row[i]) for row in rows if i < len(row))


_FIGURE = re.compile(r"[-+\d.,x/ ()%]*")


def slow_kill_lines(result: dict[str, Any]) -> list[str]:
    """Each kill slow to fail over (or failed) whose logs the run kept, and where."""
    lines = []
    for name, series in result["failover"].items():
        for trial in series.get("trials", []):
            if "logs" not in trial:
                continue
            took = trial.get("failover_s")
            what = f"{took:.3f} s" if took is not None else f"failed: {trial.get('error')}"
            where = _where(Path(trial["logs"]))
            lines.append(
                f"Slow kill: {SHORT.get(name, name)}, kill {trial['trial']}, {what}; logs: {where}"
            )
    return lines


def _where(path: Path | None) -> str | None:
    if path is None:
        return None
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def markdown(result: dict[str, Any], path: Path | None = None) -> str:
    """The run as the README's Performance section: when, where, every table, the file."""
    machine = result["machine"]
    commit = machine.get("ftproxy_commit") or "unknown"
    if machine.get("ftproxy_tree_dirty"):
        commit += ", with uncommitted changes to ftproxy/ or examples/"
    kind = "Quick run (a smoke run: too short to compare)" if result.get("quick") else "Full run"
    end = machine.get("load_average_end") or ["?"]
    out = ["### Performance", ""]
    intro = (
        f"{kind}, {result['taken'][:10]} (commit {commit}), {result.get('duration_s', '?')} s: "
        f"{machine_summary(machine)}, {end[0]} at the end (1-minute load average; the machine "
        "is shared with other jobs)."
    )
    where = _where(path)
    if where is not None:
        intro += f" [`{where}`]({where})"
    out += [intro, ""]
    png = path.with_suffix(".png") if path is not None else None
    if png is not None and png.exists():
        out += [f"![latency CDFs, throughput, failover times]({_where(png)})", ""]
    for table in tables(result):
        out += _table_markdown(table)
    out.append(LEGEND)
    lines = failure_lines(result)
    if lines:
        out += ["", "Failed cells:", "", "```", *lines, "```"]
    slow = slow_kill_lines(result)
    if slow:
        out += ["", "Kills slow to fail over, their logs kept:", "", "```", *slow, "```"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench report", description="show a saved result again"
    )
    parser.add_argument("result", type=Path, help="a bench/results/*.json file")
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print it as the README's Performance section (Markdown)",
    )
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text())
    if args.markdown:
        sys.stdout.write(markdown(result, args.result))
    else:
        print_rich(result)
    return 0


if __name__ == "__main__":  # python -m bench.report X.json: Markdown, as it always did
    sys.exit(main([*sys.argv[1:], "--markdown"]))
