"""``python -m bench soak`` in small: a few faults, every figure reported, and it can fail.

Real processes: an arbiter, ftproxy replicas running examples/kv.py, four RESP
clients, SIGKILL and SIGSTOP. The figures (disruption, re-protection time) are
not asserted, only reported; what is asserted is the soak's verdict: with the
output rule nothing acknowledged is lost and the history is linearizable, and
without it the same soak finds the loss.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_soak(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "soak", *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.exists(), f"no report; stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    return done.returncode, dict(json.loads(out.read_text())), done.stdout + done.stderr


@pytest.mark.timeout(240)
def test_a_short_soak_survives_every_kind_of_fault(tmp_path: Path) -> None:
    history = tmp_path / "history.json"
    code, report, output = run_soak(
        tmp_path,
        "--faults",
        "3",
        "--kinds",
        "kill-primary,stop-primary,kill-backup",
        "--seed",
        "3",
        "--history",
        str(history),
    )
    assert code == 0, output
    assert report["error"] is None, output
    assert report["faults_injected"] == report["faults_survived"] == 3
    assert report["acknowledged_writes_lost"] == 0
    assert report["linearizable"] and report["linearizability_violations"] == 0
    assert report["acknowledged"] > 100
    for fault in report["faults"]:
        assert fault["failover_s"] is not None, fault
        if report["mode"] == "reprotect":
            assert fault["reprotect_s"] >= fault["catchup_s"] > 0, fault
    assert "acknowledged writes lost 0" in output
    # The saved history checks the same way on its own.
    done = subprocess.run(
        [sys.executable, "-m", "bench.linearizability", str(history)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and json.loads(done.stdout)["linearizable"] is True


@pytest.mark.timeout(240)
def test_planned_switchovers_under_load_lose_nothing_and_each_old_primary_exits_0(
    tmp_path: Path,
) -> None:
    # Two in a row: the second from the backup gone live and re-protected, back again.
    code, report, output = run_soak(tmp_path, "--faults", "2", "--kinds", "switchover")
    assert code == 0, output
    assert report["error"] is None, output
    assert report["faults_injected"] == report["faults_survived"] == 2
    assert [fault["kind"] for fault in report["faults"]] == ["switchover", "switchover"]
    assert report["acknowledged_writes_lost"] == 0
    assert report["linearizable"] and report["linearizability_violations"] == 0
    assert report["acknowledged"] > 100


@pytest.mark.timeout(240)
def test_without_the_output_rule_the_soak_finds_the_lost_writes(tmp_path: Path) -> None:
    code, report, output = run_soak(
        tmp_path, "--faults", "2", "--kinds", "kill-primary", "--unsafe-no-output-rule"
    )
    assert code == 1, output
    assert report["plan"]["output_rule"] is False
    assert not report["linearizable"], output
    assert report["linearizability_violations"] > 0
    assert "NOT linearizable" in output
