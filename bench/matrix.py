"""The load matrix: every load x operation on every configuration, with its costs.

One *cell* is one redis-benchmark run of one operation under one load against
one configuration. Around it the benchmark reads the configuration's CPU time
(primary side and backup side), its log size (the record file, or the primary's
``log_bytes_total`` and ``input_bytes_total``, and the bytes the kernel counted
on the log channel's TCP connection), and for the replicated pair the
log channel's round trip and the backup's lag from the primary's ``/status``
(lag in entries is polled during the run; lag in ms and the channel RTT are the
primary's own percentiles over its last 4,096 acks).

Each cell starts with a short warm-up run whose rate sizes the measured run to
about ``Plan.cell_seconds``, so slow and fast configurations get comparable
measurement windows.
"""

from __future__ import annotations

import math
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import load as bm
from bench.load import Load, Op
from bench.plan import Plan
from bench.resp import ReplyError, call_once, encode
from bench.services import Service, admin_status

FLUSH_WAIT_S = 0.15  # ftproxy record flushes its log every 50 ms
TOOL_OUTPUT_CHARS = 2000
LOG_TAIL_LINES = 15

# What a cell's measurement can die of: the tool exits non-zero or hangs, the
# service refuses or drops the connection, or answers what cannot be parsed.
CELL_FAILURES = (
    subprocess.CalledProcessError,
    subprocess.TimeoutExpired,
    OSError,
    ReplyError,
    ValueError,
    StopIteration,
    KeyError,
)


class LagPoller:
    """Polls the primary's /status in a thread during a cell: lag in entries and ms."""

    def __init__(self, admin_port: int, period: float) -> None:
        self.admin_port = admin_port
        self.period = period
        self.entries: list[int] = []
        self.ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LagPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                lag = admin_status(self.admin_port, timeout=2.0)["lag"]
            except (OSError, KeyError, ValueError):
                continue
            self.entries.append(int(lag["entries"]))
            self.ms.append(float(lag["ms"]))


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def supports(service: Service, op: Op) -> str | None:
    """None if ``service`` answers ``op`` with a non-error reply, else the error."""
    try:
        call_once(service.port, *op.request(), timeout=10.0)
    except ReplyError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Snapshot:
    """A configuration's counters at one moment: CPU, log size, the primary's status."""

    cpu: tuple[float, float]  # seconds, primary side and backup side
    status: dict[str, Any] | None
    log_file_bytes: int | None
    channel_bytes: int | None

    @classmethod
    def take(cls, service: Service) -> Snapshot:
        return cls(
            service.cpu_seconds(),
            service.status(),
            service.log_bytes(),
            service.channel_bytes(),
        )


COST_FIELDS = (
    "input_bytes_per_request",
    "log_bytes_per_request",
    "log_bytes_per_input_byte",
    "channel_bytes_per_request",
    "channel_bytes_per_input_byte",
    "lag_entries_p99",
    "lag_ms_p99",
    "channel_rtt_ms_p50",
    "channel_rtt_ms_p99",
)


def costs(
    service: Service,
    before: Snapshot,
    after: Snapshot,
    requests: int,
    client_bytes: int,
    lag_entries: list[int],
) -> dict[str, Any]:
    """Per-request costs between two snapshots (None where the configuration has none)."""
    out: dict[str, Any] = dict.fromkeys(COST_FIELDS)
    out["cpu_primary_s_per_request"] = (after.cpu[0] - before.cpu[0]) / requests
    out["cpu_backup_s_per_request"] = (
        (after.cpu[1] - before.cpu[1]) / requests if service.backup else None
    )
    if before.log_file_bytes is not None and after.log_file_bytes is not None:
        log_bytes = after.log_file_bytes - before.log_file_bytes
        out.update(
            input_bytes_per_request=client_bytes / requests,
            log_bytes_per_request=log_bytes / requests,
            log_bytes_per_input_byte=log_bytes / client_bytes,
        )
    if before.status is not None and after.status is not None:
        log_bytes = after.status["log_bytes_total"] - before.status["log_bytes_total"]
        input_bytes = after.status["input_bytes_total"] - before.status["input_bytes_total"]
        out.update(
            input_bytes_per_request=input_bytes / requests,
            log_bytes_per_request=log_bytes / requests,
            log_bytes_per_input_byte=log_bytes / input_bytes if input_bytes else None,
            lag_entries_p99=percentile(lag_entries, 0.99),
            lag_ms_p99=after.status["lag_ms"]["p99"],
            channel_rtt_ms_p50=after.status["channel_rtt_ms"]["p50"],
            channel_rtt_ms_p99=after.status["channel_rtt_ms"]["p99"],
            held_outputs_end=after.status["held_outputs"],
        )
        if before.channel_bytes is not None and after.channel_bytes is not None:
            wire = after.channel_bytes - before.channel_bytes
            out.update(
                channel_bytes_per_request=wire / requests,
                channel_bytes_per_input_byte=wire / input_bytes if input_bytes else None,
            )
    return out


def measure_cell(service: Service, load: Load, op: Op, plan: Plan) -> dict[str, Any]:
    """Run one cell against ``service`` and return every figure it yields.

    A cell that fails (the tool exits non-zero or hangs, the service died or
    drops the connection) comes back marked ``failed``, with the reason, the
    tool's output and the tail of every process's log, so that the run goes on.
    """
    cell: dict[str, Any] = {
        "load": load.name,
        "clients": load.clients,
        "pipeline": load.pipeline,
        "op": op.test,
        "size": op.size,
        "label": op.label,
    }
    try:
        return _measure(service, load, op, plan, cell)
    except CELL_FAILURES as exc:
        return failed_cell(cell, service, exc)


def failed_cell(cell: dict[str, Any], service: Service, exc: BaseException) -> dict[str, Any]:
    """The cell as failed: why, what the tool printed, how each process ended."""
    output = ""
    if isinstance(exc, subprocess.CalledProcessError):
        reason = f"{Path(str(exc.cmd[0])).name} exited with {exc.returncode}"
        output = _text(exc.stdout) + _text(exc.stderr)
    elif isinstance(exc, subprocess.TimeoutExpired):
        reason = f"{Path(str(exc.cmd[0])).name} did not finish within {exc.timeout:.0f} s"
        output = _text(exc.stdout) + _text(exc.stderr)
    else:
        reason = f"{type(exc).__name__}: {exc}"
    processes = {}
    for proc in service.procs:
        code = proc.popen.poll()
        processes[proc.name] = {
            "state": "running" if code is None else f"exited with {code}",
            "log_tail": proc.stderr_tail(LOG_TAIL_LINES),
        }
    dead = [f"{name} {p['state']}" for name, p in processes.items() if p["state"] != "running"]
    if dead:
        reason += f" ({', '.join(dead)})"
    return {
        **cell,
        "supported": False,
        "failed": True,
        "reason": reason,
        "tool_output": output.strip()[-TOOL_OUTPUT_CHARS:],
        "service_log": processes,
    }


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _measure(
    service: Service, load: Load, op: Op, plan: Plan, cell: dict[str, Any]
) -> dict[str, Any]:
    unsupported = supports(service, op)
    if unsupported is not None:
        return {**cell, "supported": False, "reason": unsupported}
    probe_n = max(plan.probe_requests, 4 * load.clients * load.pipeline)
    probe = bm.run(service.port, load, op, probe_n)
    requests = int(min(plan.max_requests, max(probe_n, probe.rps * plan.cell_seconds)))

    before = Snapshot.take(service)
    lag_entries: list[int] = []
    if service.admin_port is not None:
        with LagPoller(service.admin_port, plan.lag_poll_s) as poller:
            result = bm.run(service.port, load, op, requests)
        lag_entries = poller.entries
    else:
        result = bm.run(service.port, load, op, requests)
    after = Snapshot.take(service)
    if service.log_path is not None:
        time.sleep(FLUSH_WAIT_S)  # the file's size once the run's tail is flushed
        after = replace(after, log_file_bytes=service.log_bytes())

    n = result.requests
    client_bytes = len(encode(*op.request())) * n
    cell.update(
        supported=True,
        requests=n,
        seconds=result.seconds,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        p999_ms=result.p999_ms,
        max_ms=result.max_ms,
        cdf=result.cdf,
        client_bytes_per_request=client_bytes / n,
        **costs(service, before, after, n, client_bytes, lag_entries),
    )
    return cell


def run_matrix(
    services: list[Service], plan: Plan, progress: Any = None
) -> dict[str, list[dict[str, Any]]]:
    """Every cell on every service, ``plan.rounds`` times; per cell, the median round.

    Configurations take turns cell by cell (in reverse order every other round),
    and rounds follow each other, so drift in the shared machine's load hits
    every configuration alike. A cell's figures all come from its round of
    median throughput; ``rps_rounds`` keeps every round's throughput.
    """
    rounds: dict[tuple[str, str, str, int | None], list[dict[str, Any]]] = {}
    for index in range(plan.rounds):
        order = services if index % 2 == 0 else services[::-1]
        for load in plan.loads:
            for op in plan.ops:
                for service in order:
                    cell = measure_cell(service, load, op, plan)
                    rounds.setdefault((service.name, load.name, op.test, op.size), []).append(cell)
                    if progress is not None:
                        progress(service.name, cell)
    cells: dict[str, list[dict[str, Any]]] = {s.name: [] for s in services}
    for (name, *_), measured in rounds.items():
        cells[name].append(median_round(measured))
    return cells


def median_round(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """The round of median throughput, with every round's throughput attached.

    Rounds that failed are left out (and listed); ``rps_by_round`` keeps each
    round in its place (None where it failed), so that two configurations'
    rounds, which ran side by side, can be compared round by round. If every
    round failed or the operation is not supported, the first round stands.
    """
    good = [cell for cell in measured if cell.get("supported")]
    if not good:
        return measured[0]
    ordered = sorted(good, key=lambda cell: float(cell["rps"]))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rps_rounds"] = [cell["rps"] for cell in good]
    chosen["rps_by_round"] = [cell["rps"] if cell.get("supported") else None for cell in measured]
    failed = [cell["reason"] for cell in measured if cell.get("failed")]
    if failed:
        chosen["failed_rounds"] = failed
    return chosen


def failed_cells(configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every failed cell of a result, one line each (the cells keep the details)."""
    return [
        {
            "configuration": name,
            "load": cell["load"],
            "label": cell["label"],
            "reason": cell["reason"],
        }
        for name, config in configs.items()
        for cell in config.get("cells", [])
        if cell.get("failed")
    ]
