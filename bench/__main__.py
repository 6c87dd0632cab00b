"""``python -m bench``: ftproxy against bare kv.py and the Raft alternatives, one run.

Every configuration takes the same redis-benchmark load (1 client closed-loop,
50 clients, 1 client pipelining 16 deep; SET/GET at 16 B and 4 KiB, INCR) in
the same run; the ftproxy configurations are interleaved cell by cell, so that
the shared machine's drift hits all alike. Then a failover series kills the
primary under a write load. Prints tables, writes JSON and a PNG.

    python -m bench                          # full: a few minutes, saved in bench/results/
    python -m bench --quick --json out.json  # under a minute (+ a first-time pip install)
    python -m bench programs                 # real frameworks, bare and as a pair
    python -m bench breakdown                # 1 client: p50 per stage of a request's path
    python -m bench floors                   # this machine's pipe and TCP round trips
    python -m bench report X.json --markdown # a saved run as the README's Performance section
    python -m bench soak --faults 100        # one service through 100 faults (bench/soak.py)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import (
    alternatives,
    breakdown,
    failover,
    floors,
    matrix,
    plot,
    report,
    summary,
    targets,
)
from bench.load import require_redis_benchmark
from bench.machine import describe, load_average, stamp
from bench.plan import (
    BARE,
    FTPROXY_CONFIGS,
    LABELS,
    NO_RULE,
    RECORD,
    RULE,
    RULE_ETCD,
    RULE_HEALED,
    RULE_SILENT,
    Plan,
)
from bench.services import (
    Arbiter,
    Service,
    start_bare,
    start_healed_pair,
    start_pair,
    start_record,
)

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = 1

NOTES = (
    "Load: redis-benchmark (C, one epoll thread) with -c clients and -P pipeline depth; "
    "its keys are literal, so each op hits one key. Each cell starts with a warm-up run "
    "whose rate sizes the measured run.",
    "Cells: ftproxy's five configurations take turns cell by cell, over several rounds "
    "(reversed order every other round); a cell's figures come from its round of median "
    "throughput (rps_rounds lists all). The alternatives run alone, one round.",
    "CPU: user+system time of each side's process tree (/proc) over the measured run, "
    "per request, idle time included; Raft: the leader is the primary side, both "
    "followers the backup side.",
    "Log bytes: the primary's log_bytes_total (logged entry payloads) per input byte "
    "(input_bytes_total); wire: bytes_sent of the log channel's TCP connection (ss), "
    "entry framing and heartbeats included; record: growth of its log file, which also "
    "holds every output.",
    "Lag ms p99 and log RTT: the primary's own percentiles over its last 4,096 acks at "
    "the end of the cell; lag entries p99: /status polled every 100 ms during the cell.",
    "Failover time: last reply to a request sent before the failure to first reply to a "
    "request sent after it. A SIGKILLed primary's log channel is closed by the kernel, "
    "so the backup does not wait for the heartbeat timeout; a SIGSTOPped one is not "
    "(the 500 ms peer timeout, and up to 0.2 s of client timeout, are in that figure).",
    "Breakdown: bench/breakdown.py's 1-client closed-loop SET 16 B on record, no-rule and "
    "rule started with FTPROXY_TRACE_DIR (every process stamps each stage; the stamps "
    "cost a little); p50 per stage, CPU us/req per side. Floors: bench/floors.py, "
    "one-byte round trips between two processes (pipe, pipe with both on one CPU, "
    "loopback TCP with TCP_NODELAY, its echo blocking in recv, in a plain epoll loop and "
    "in a trio loop), measured in the same run.",
    "Alternatives are tuned in their favour (pyraft: listen backlog 128, TCP_NODELAY; "
    "PySyncObj: appendEntriesUseBatch=False) and both need the service rewritten "
    "around them; ftproxy runs examples/kv.py unmodified.",
)

DESCRIPTIONS = {
    BARE: "python examples/kv.py on real sockets, no supervisor",
    RECORD: "ftproxy record: one replica on virtual devices, logging to a file, no backup",
    NO_RULE: "ftproxy primary + backup on loopback, --no-output-rule (unsafe)",
    RULE: "ftproxy primary + backup on loopback, outputs held until the backup has the log",
    RULE_HEALED: "the same pair after a failover: its primary killed (SIGKILL), the backup "
    "live and protected again by a new backup that caught up",
}


def _progress(name: str, cell: dict[str, Any]) -> None:
    if cell.get("failed"):
        line = f"FAILED: {cell.get('reason')}"
    elif not cell.get("supported"):
        line = f"not supported: {cell.get('reason')}"
    else:
        line = f"{cell['rps']:>9,.0f} req/s  p50 {cell['p50_ms']:.3f} ms"
    print(f"  {name:<15} {cell['load']:<13} {cell['label']:<10} {line}", file=sys.stderr)


def _failover_progress(name: str, trial: dict[str, Any]) -> None:
    if trial.get("failover_s") is None:
        line = f"failed: {trial.get('error')}"
    else:
        line = (
            f"failover {trial['failover_s']:.3f} s, "
            f"lost {trial['lost_acknowledged_writes']} of {trial['acknowledged_writes']}"
        )
    if "logs" in trial:
        line += f" (slow: its logs are kept in {trial['logs']})"
    print(f"  {name:<15} kill {trial['trial']:>2}: {line}", file=sys.stderr)


@contextlib.contextmanager
def running(services: list[Service]) -> Iterator[list[Service]]:
    try:
        for service in services:
            service.ready()
        yield services
    finally:
        for service in services:
            service.stop()


def measure_ftproxy(plan: Plan, scratch: Path, arbiter: Arbiter) -> dict[str, Any]:
    """Configurations 1-4 (and 4 healed), started together, measured cell by cell in turn."""
    services = [
        start_bare(scratch),
        start_record(scratch),
        start_pair(NO_RULE, scratch, arbiter, output_rule=False, ephemeral=True),
        start_pair(RULE, scratch, arbiter, output_rule=True, ephemeral=True),
        start_healed_pair(RULE_HEALED, scratch, arbiter),
    ]
    with running(services):
        cells = matrix.run_matrix(services, plan, _progress)
    return {name: _config(name, DESCRIPTIONS[name], cells=cells[name]) for name in FTPROXY_CONFIGS}


def measure_alternative(
    alternative: alternatives.Alternative, plan: Plan, scratch: Path
) -> tuple[dict[str, Any], Path | None]:
    """Configuration 5: one Raft alternative, or why it is not available."""
    if not plan.alternatives:
        return _config(alternative.name, alternative.description, reason="skipped"), None
    installed, why = alternatives.install(alternative)
    if installed is None:
        return _config(alternative.name, alternative.description, reason=why), None
    cluster = alternatives.start(alternative, installed, scratch)
    try:
        cluster.ready()
        service = cluster.service()
        # Alone on the machine, far from ftproxy's figures: one round is enough.
        one_round = dataclasses.replace(plan, rounds=1)
        cells = matrix.run_matrix([service], one_round, _progress)[service.name]
    except (TimeoutError, RuntimeError, OSError) as exc:
        return _config(alternative.name, alternative.description, reason=str(exc)), None
    finally:
        cluster.stop()
    return _config(alternative.name, alternative.description, cells=cells), installed


def _config(
    name: str,
    description: str,
    *,
    cells: list[dict[str, Any]] | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    return {
        "label": LABELS[name],
        "description": description,
        "available": cells is not None,
        "reason": reason,
        "cells": cells or [],
        "by_load": {},
    }


def ftproxy_failovers(
    plan: Plan, scratch: Path, arbiter: Arbiter, keep_slow: Path | None = None
) -> dict[str, Any]:
    """SIGKILLs of the primary with and without the output rule, then SIGSTOPs; a
    kill slow to fail over keeps its logs under ``keep_slow``."""
    series = {}
    for name, output_rule, silent, trials in (
        (RULE, True, False, plan.failovers),
        (NO_RULE, False, False, plan.failovers),
        (RULE_SILENT, True, True, plan.silent_failovers),
    ):
        series[name] = failover.ftproxy_series(
            name,
            scratch,
            arbiter,
            output_rule=output_rule,
            trials=trials,
            seed=plan.seed,
            silent=silent,
            progress=_failover_progress,
            keep_slow=keep_slow,
        )
    series[RULE_ETCD] = failover.etcd_series(
        RULE_ETCD,
        scratch,
        trials=plan.failovers,
        seed=plan.seed,
        progress=_failover_progress,
        keep_slow=keep_slow,
    )
    return series


def alternative_failovers(
    plan: Plan, scratch: Path, installed: dict[str, Path | None]
) -> dict[str, Any]:
    """Leader kills for each alternative that could be installed."""
    series = {}
    for alternative in alternatives.ALL:
        where = installed.get(alternative.name)
        if where is None or plan.alternative_failovers == 0:
            reason = "not available" if where is None else "not measured in this mode"
            series[alternative.name] = {**failover.summarize([]), "reason": reason}
            continue
        series[alternative.name] = failover.alternative_series(
            alternative,
            where,
            scratch,
            trials=plan.alternative_failovers,
            seed=plan.seed,
            progress=_failover_progress,
        )
    return series


def measure_breakdown(plan: Plan) -> dict[str, Any]:
    """The 1-client critical path of record, no-rule and rule, or why it failed."""
    try:
        return breakdown.critical_path(
            plan.breakdown_requests, plan.breakdown_rounds, plan.breakdown_warmup
        )
    except (TimeoutError, RuntimeError, OSError, ValueError) as exc:
        print(f"bench: breakdown FAILED: {exc}", file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {exc}"}


def measure_floors(plan: Plan) -> dict[str, Any]:
    """This machine's process-hop floors, or why they could not be measured."""
    try:
        return floors.measure(plan.floor_trips)
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        print(f"bench: floors FAILED: {exc}", file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {exc}"}


def run(plan: Plan) -> dict[str, Any]:
    """Measure everything the plan says and return the result (not yet saved)."""
    started = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - started - sum(phases.values()), 1)

    taken = datetime.datetime.now(datetime.UTC)
    machine = describe()
    installed: dict[str, Path | None] = {}
    with tempfile.TemporaryDirectory(prefix="ftproxy-bench-") as tmp:
        scratch = Path(tmp)
        arbiter = Arbiter(scratch).start()
        try:
            arbiter.wait_listening()
            print("bench: the load matrix, ftproxy configurations", file=sys.stderr)
            configs = measure_ftproxy(plan, scratch, arbiter)
            phase("matrix_ftproxy")
            for alternative in alternatives.ALL:
                print(f"bench: the load matrix, {alternative.name}", file=sys.stderr)
                config, installed[alternative.name] = measure_alternative(
                    alternative, plan, scratch
                )
                configs[alternative.name] = config
            phase("matrix_alternatives")
            print("bench: the 1-client breakdown (record, no-rule, rule)", file=sys.stderr)
            critical_path = measure_breakdown(plan)
            phase("breakdown")
            print("bench: this machine's floors (pipe, TCP round trips)", file=sys.stderr)
            machine_floors = measure_floors(plan)
            phase("floors")
            print("bench: failover series", file=sys.stderr)
            # A full run's slow kills keep their logs beside its JSON (same stamp).
            slow_dir = f"{stamp(taken.isoformat())}-slow-failovers"
            keep_slow = None if plan.quick else RESULTS / slow_dir
            series = ftproxy_failovers(plan, scratch, arbiter, keep_slow)
            phase("failover_ftproxy")
        finally:
            arbiter.stop()
        series.update(alternative_failovers(plan, scratch, installed))
        phase("failover_alternatives")
    for config in configs.values():
        config["by_load"] = summary.by_load(config["cells"])
    summary.add_ratios(configs)
    machine["load_average_end"] = load_average()
    return {
        "schema": SCHEMA,
        "taken": taken.isoformat(timespec="seconds"),
        "quick": plan.quick,
        "duration_s": round(time.monotonic() - started, 1),
        "phases_s": phases,
        "machine": machine,
        "plan": plan.as_dict(),
        "notes": list(NOTES),
        "configurations": configs,
        "failover": series,
        "breakdown": critical_path,
        "floors": machine_floors,
        "targets": targets.evaluate(configs, series, critical_path, machine_floors),
        "failed_cells": matrix.failed_cells(configs),
    }


def save(result: dict[str, Any], json_path: Path) -> list[Path]:
    """Write the JSON and, beside it, the PNG; return both paths."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    png_path = json_path.with_suffix(".png")
    try:
        plot.draw(result, png_path)
    except Exception as exc:  # matplotlib's errors share no base; the figures are saved
        print(
            f"bench: the picture {png_path} was not drawn ({type(exc).__name__}: {exc}); "
            f"the figures are in {json_path} (redraw: python -m bench.plot)",
            file=sys.stderr,
        )
        return [json_path]
    return [json_path, png_path]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["programs"]:
        from bench import programs

        return programs.main(argv[1:])
    if argv[:1] == ["breakdown"]:
        from bench import breakdown

        return breakdown.main(argv[1:])
    if argv[:1] == ["report"]:
        return report.main(argv[1:])
    if argv[:1] == ["floors"]:
        from bench import floors

        return floors.main(argv[1:])
    if argv[:1] == ["soak"]:
        from bench import soak  # its own command: not part of the quick or full run

        return soak.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="write the JSON here (and the PNG beside it)"
    )
    parser.add_argument(
        "--failovers", type=int, metavar="N", help="primary kills (default 20, quick 3)"
    )
    parser.add_argument("--no-alternatives", action="store_true", help="skip pyraft and PySyncObj")
    args = parser.parse_args(argv)
    require_redis_benchmark()
    plan = Plan.quick_plan() if args.quick else Plan.full()
    if args.failovers is not None:
        plan = dataclasses.replace(plan, failovers=args.failovers)
    if args.no_alternatives:
        plan = dataclasses.replace(plan, alternatives=False)
    result = run(plan)
    report.print_rich(result)
    paths: list[Path] = []
    if not args.quick:
        paths += save(result, RESULTS / f"{stamp(result['taken'])}.json")
    if args.json is not None:
        paths += save(result, args.json)
    for path in paths:
        print(f"bench: wrote {path}")
    if paths:
        print(
            f"bench: the README's Performance section: python -m bench report {paths[0]} --markdown"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
