"""A benchmark cell that fails is reported as failed, with why, and the run goes on.

Real processes: a service that exits at once, one that closes every connection
after answering the support probe (so redis-benchmark itself exits non-zero),
and a real kv.py measured in the same matrix after both.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench import matrix, report
from bench.load import Op
from bench.plan import LOADS, Plan
from bench.procs import Proc, free_port
from bench.services import Service, start_bare

pytestmark = pytest.mark.skipif(
    shutil.which("redis-benchmark") is None,
    reason="redis-benchmark is not installed (apt-get install redis-tools)",
)

EXITS_AT_ONCE = (
    "import sys; print('broken: cannot open its data file', file=sys.stderr); sys.exit(3)"
)
# Answers one request per connection with +OK, then closes it: the support probe
# passes, redis-benchmark's run breaks off.
CLOSES_CONNECTIONS = """
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    conn.recv(65536)
    conn.sendall(b"+OK\\r\\n")
    conn.close()
"""


@pytest.mark.timeout(120)
def test_failing_cells_are_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    broken = Service(
        "broken",
        free_port(),
        primary=[Proc("broken", [sys.executable, "-c", EXITS_AT_ONCE], tmp_path)],
        ready_marker=None,
    )
    closer_port = free_port()
    closer = Service(
        "closer",
        closer_port,
        primary=[
            Proc("closer", [sys.executable, "-c", CLOSES_CONNECTIONS, str(closer_port)], tmp_path)
        ],
    )
    good = start_bare(tmp_path)
    services = [broken, closer, good]
    plan = replace(Plan.quick_plan(), loads=(LOADS[0],), ops=(Op("set", 16), Op("get", 16)))
    try:
        closer.ready()
        good.ready()
        broken.primary[0].popen.wait(timeout=30)
        cells = matrix.run_matrix(services, plan)
    finally:
        for service in services:
            service.stop()

    for cell in cells["broken"]:
        assert cell["failed"] and not cell["supported"], cell
        assert "broken exited with 3" in cell["reason"], cell["reason"]
        assert "cannot open its data file" in cell["service_log"]["broken"]["log_tail"]
    for cell in cells["closer"]:
        assert cell["failed"], cell
        assert cell["reason"] == "redis-benchmark exited with 1", cell["reason"]
        # "Server closed the connection" or "Connection reset by peer", by timing.
        assert "Error: " in cell["tool_output"] and "onnection" in cell["tool_output"]
        assert cell["service_log"]["closer"]["state"] == "running"
    for cell in cells["bare"]:
        assert cell["supported"] and not cell.get("failed"), cell
        assert cell["rps"] > 0 and cell["requests"] > 0

    configs = {name: {"cells": found} for name, found in cells.items()}
    listed = matrix.failed_cells(configs)
    assert sorted((f["configuration"], f["label"]) for f in listed) == [
        ("broken", "GET 16 B"),
        ("broken", "SET 16 B"),
        ("closer", "GET 16 B"),
        ("closer", "SET 16 B"),
    ]
    lines = "\n".join(report.failure_lines({"configurations": configs}))
    assert "FAILED cell: closer c=1 SET 16 B: redis-benchmark exited with 1" in lines
    assert "tool output: " in lines and "Error: " in lines
    assert "cannot open its data file" in lines


def test_a_failed_round_is_left_out_of_the_median() -> None:
    ok = {"supported": True, "rps": 100.0}
    failed = {"supported": False, "failed": True, "reason": "redis-benchmark exited with 1"}
    chosen = matrix.median_round([failed, ok, {"supported": True, "rps": 300.0}])
    assert chosen["rps"] == 100.0
    assert chosen["rps_rounds"] == [100.0, 300.0]
    assert chosen["rps_by_round"] == [None, 100.0, 300.0]
    assert chosen["failed_rounds"] == ["redis-benchmark exited with 1"]
    assert matrix.median_round([failed, failed])["failed"] is True
