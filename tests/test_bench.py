"""``python -m bench --quick`` as a smoke test: it completes and reports every figure.

No timing is asserted (the machine is shared and noisy); what is asserted is
the shape of the JSON and the product's claim: with the output rule, no
acknowledged write is lost across the SIGKILLs of the primary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

TOP = {
    "schema",
    "taken",
    "quick",
    "duration_s",
    "machine",
    "plan",
    "configurations",
    "failover",
    "targets",
    "notes",
    "breakdown",
    "floors",
}
MACHINE = {"cpu_model", "cpus", "memory_gib", "kernel", "python", "redis_benchmark"}
CONFIGS = {
    "bare",
    "record",
    "no-output-rule",
    "output-rule",
    "output-rule-healed",
    "pyraft",
    "pysyncobj",
}
CONFIG = {"label", "description", "available", "reason", "cells", "by_load"}
CELL = {
    "load",
    "clients",
    "pipeline",
    "op",
    "size",
    "supported",
    "requests",
    "rps",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "cdf",
    "cpu_primary_s_per_request",
    "cpu_backup_s_per_request",
    "input_bytes_per_request",
    "log_bytes_per_request",
    "log_bytes_per_input_byte",
    "channel_bytes_per_input_byte",
    "lag_entries_p99",
    "lag_ms_p99",
    "channel_rtt_ms_p50",
    "channel_rtt_ms_p99",
    "vs_bare",
    "vs_no_output_rule",
}
BY_LOAD = {
    "rps",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "cpu_primary_s_per_request",
    "cpu_backup_s_per_request",
    "log_bytes_per_request",
    "log_bytes_per_input_byte",
    "lag_entries_p99",
    "lag_ms_p99",
    "channel_rtt_ms_p50",
    "vs_bare",
    "vs_no_output_rule",
}
FAILOVER = {"trials", "completed", "failed", "failover_s", "lost_acknowledged_writes"}
TARGET = {"target", "figure", "limit", "op", "status", "met", "detail", "reason"}
STATUSES = {"met", "MISSED", "not measured"}
BREAKDOWN_KEYS = {"record@this", "no-rule@this", "rule@this", "rule, healed@this"}
FLOORS = {"pipe", "pipe_pinned", "tcp"}
LOADS = {"c=1", "c=50", "c=1 P=16"}
OPS = {("set", 16), ("get", 16), ("set", 4096), ("get", 4096), ("incr", None)}


def missing(mapping: dict[str, Any], keys: set[str]) -> set[str]:
    return keys - mapping.keys()


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if shutil.which("redis-benchmark") is None:
        pytest.skip("redis-benchmark is not installed (apt-get install redis-tools)")
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    assert out.with_suffix(".png").stat().st_size > 0
    return dict(json.loads(out.read_text()))


@pytest.mark.timeout(600)
def test_quick_run_reports_every_field(result: dict[str, Any]) -> None:
    assert not missing(result, TOP)
    assert result["quick"] is True
    assert not missing(result["machine"], MACHINE)
    assert set(result["configurations"]) == CONFIGS
    for name, config in result["configurations"].items():
        assert not missing(config, CONFIG), name
        if name in {"pyraft", "pysyncobj"} and not config["available"]:
            assert config["reason"], f"{name} is unavailable without a reason"
            continue
        assert config["available"], name
        assert {(c["op"], c["size"]) for c in config["cells"]} == OPS
        assert {c["load"] for c in config["cells"]} == LOADS
        for cell in config["cells"]:
            if cell["supported"]:
                assert not missing(cell, CELL), (name, cell["load"], cell["label"])
                assert cell["requests"] > 0 and cell["rps"] > 0 and cell["cdf"]
        assert set(config["by_load"]) == LOADS
        for load, figures in config["by_load"].items():
            assert not missing(figures, BY_LOAD), (name, load)
    for name in ("bare", "record", "no-output-rule", "output-rule", "output-rule-healed"):
        assert all(c["supported"] for c in result["configurations"][name]["cells"]), name
    for name in ("output-rule", "output-rule-healed"):  # the healed pair measures its channel too
        for cell in result["configurations"][name]["cells"]:
            for key in ("log_bytes_per_request", "lag_ms_p99", "channel_rtt_ms_p50"):
                assert cell[key] is not None, (name, cell["load"], cell["label"], key)
    series_only = {"output-rule-sigstop", "output-rule-etcd"}
    matrix_only = {"bare", "record", "output-rule-healed"}
    assert set(result["failover"]) == CONFIGS - matrix_only | series_only
    for name, series in result["failover"].items():
        assert not missing(series, FAILOVER), name
    assert len(result["targets"]) == 9
    for target in result["targets"]:
        assert not missing(target, TARGET)
        assert target["status"] in STATUSES, target
        if target["status"] != "met":  # a miss or a gap always says why, in numbers
            assert target["reason"], target
    # The phases that explain the misses ran in the same run.
    assert set(result["breakdown"]["results"]) == BREAKDOWN_KEYS, result["breakdown"]
    for key, path in result["breakdown"]["results"].items():
        assert path["requests"] > 0 and path["client_p50_us"] > 0, key
        assert path["cpu_us_per_request"][0] > 0, key
    for name in FLOORS:
        assert result["floors"][name]["p50_us"] > 0, result["floors"]


@pytest.mark.timeout(600)
def test_no_acknowledged_write_is_lost_with_the_output_rule(result: dict[str, Any]) -> None:
    series = result["failover"]["output-rule"]
    assert len(series["trials"]) == 3
    assert series["failed"] == 0, series["trials"]
    assert series["lost_acknowledged_writes"] == 0, series["trials"]
    assert all(t["lost_acknowledged_writes"] == 0 for t in series["trials"])
    assert result["failover"]["no-output-rule"]["completed"] == 3
    silent = result["failover"]["output-rule-sigstop"]
    assert silent["failed"] == 0 and silent["lost_acknowledged_writes"] == 0, silent["trials"]
    etcd = result["failover"]["output-rule-etcd"]  # the same kills, etcd deciding
    assert len(etcd["trials"]) == 3, etcd.get("reason")
    assert etcd["failed"] == 0 and etcd["lost_acknowledged_writes"] == 0, etcd["trials"]


def test_bench_programs_measures_a_real_program_bare_and_as_a_pair(tmp_path: Path) -> None:
    out = tmp_path / "programs.json"
    quick = ["--only", "http.server", "--seconds", "0.3", "--rounds", "1", "--clients", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "bench", "programs", *quick, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["programs"]
    assert "error" not in row, row
    for config in ("bare", "pair"):
        (cell,) = row[config]
        assert cell["requests"] > 0 and cell["wrong"] == [] and cell["rps"] > 0
    assert row["pair_over_bare"][0] > 0
    assert "| http.server.HTTPServer | stdlib |" in done.stdout


@pytest.mark.timeout(600)
def test_breakdown_finds_every_stage_of_a_request(tmp_path: Path) -> None:
    """``python -m bench breakdown``: every process stamps its stages, and the join finds
    each stage inside the requests' windows (no figure is filled in when it is not)."""
    out = tmp_path / "breakdown.json"
    command = [sys.executable, "-m", "bench", "breakdown", "--requests", "150", "--rounds", "1"]
    done = subprocess.run(
        [*command, "--warmup", "30", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    results = json.loads(out.read_text())["results"]
    assert set(results) == BREAKDOWN_KEYS
    for key, result in results.items():
        assert result["requests"] == 150, key
        for stage in result["stages"]:
            assert stage["n"] > 0 and stage["p50_us"] is not None, (key, stage)
        # With the rule, the output waits for the ack in the same window: every
        # request's log path is there (without it the ack may come after the reply).
        # The healed pair's live replica (the first pair's backup) stamps the same path.
        if key in ("rule@this", "rule, healed@this"):
            by_name = {stage["stage"]: stage for stage in result["stages"]}
            assert by_name["ack -> output released"]["n"] >= 140, by_name
        assert result["stages"][-1]["n"] == 150  # the client's own round trip
