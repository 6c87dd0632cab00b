"""--on-role-change: a real hook script records its environment across a failover."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

from cluster import Cluster, KvClient, Process, status, wait_until
from support import free_port

RECORDER = """\
import json, os, sys
with open(sys.argv[1], "a") as out:
    env = {k: v for k, v in os.environ.items() if k.startswith("FTPROXY_")}
    out.write(json.dumps({"argv": sys.argv[2:], **env}) + "\\n")
"""


def recorded(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def roles(path: Path) -> list[str]:
    return [change["FTPROXY_ROLE"] for change in recorded(path)]


def test_hooks_see_every_role_change_and_a_failing_hook_is_not_fatal(tmp_path: Path) -> None:
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    failing = tmp_path / "failing.py"
    failing.write_text(RECORDER + "print('no floating IP here', file=sys.stderr)\nsys.exit(7)\n")
    primary_log, backup_log = tmp_path / "primary.jsonl", tmp_path / "backup.jsonl"

    def hook(script: Path, out: Path) -> tuple[str, ...]:
        # Quoting as a shell would, run without one: the argument keeps its space.
        return ("--on-role-change", f"{sys.executable} {script} {out} 'two words'")

    cluster = Cluster(tmp_path)
    cluster.start_arbiter()
    cluster.processes["primary"] = Process(
        "primary", cluster.replica_command("primary", *hook(failing, primary_log)), tmp_path
    )
    cluster.processes["backup"] = Process(
        "backup", cluster.replica_command("backup", *hook(recorder, backup_log)), tmp_path
    )
    try:
        cluster.primary.wait_for_output("listening")
        cluster.backup.wait_for_output("listening")
        wait_until(lambda: roles(backup_log) == ["backup"], 20, "the backup's hook ran")
        wait_until(lambda: roles(primary_log) == ["primary"], 20, "the primary's hook ran")
        wait_until(
            lambda: any(e["event"] == "role_hook_failed" for e in cluster.primary.events()),
            20,
            "the primary logs its hook's failure",
        )
        failed = next(e for e in cluster.primary.events() if e["event"] == "role_hook_failed")
        assert failed["reason"] == "exit code 7" and "no floating IP here" in failed["stderr"]
        client = KvClient(cluster.service_port)
        assert client.call("INCR", "n") == 1  # the primary serves on: not fatal

        cluster.kill_primary()
        wait_until(lambda: roles(backup_log) == ["backup", "live"], 20, "the live hook ran")
        joined, live = recorded(backup_log)
        assert joined["argv"] == live["argv"] == ["two words"]
        assert live["FTPROXY_PREVIOUS_ROLE"] == "backup"
        assert live["FTPROXY_PAIR"] == "ftproxy" and live["FTPROXY_GENERATION"] == "1"
        assert "won the arbiter" in live["FTPROXY_REASON"]
        assert live["FTPROXY_PID"] == str(cluster.backup.popen.pid)
        assert joined["FTPROXY_PREVIOUS_ROLE"] == "starting"
        # Socket mode: the old connection reads as reset; a new one finds the write.
        assert KvClient(cluster.service_port).call("INCR", "n") == 2
    finally:
        cluster.stop()


def test_a_hook_that_runs_too_long_is_killed_and_logged(tmp_path: Path) -> None:
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import time\ntime.sleep(60)\n")
    cluster = Cluster(tmp_path)
    cluster.start_arbiter()
    hook = ("--on-role-change", f"{sys.executable} {sleeper}", "--on-role-change-timeout-s", "0.5")
    cluster.processes["primary"] = Process(
        "primary", cluster.replica_command("primary", *hook), tmp_path
    )
    cluster.processes["backup"] = Process("backup", cluster.replica_command("backup"), tmp_path)
    try:
        cluster.primary.wait_for_output("listening")
        wait_until(
            lambda: any(e["event"] == "role_hook_failed" for e in cluster.primary.events()),
            20,
            "the slow hook is given up",
        )
        failed = next(e for e in cluster.primary.events() if e["event"] == "role_hook_failed")
        assert failed["reason"] == "still running after 0.5 s"
        assert KvClient(cluster.service_port).call("INCR", "n") == 1
    finally:
        cluster.stop()


def test_a_primary_that_halts_runs_its_halted_hook_before_it_exits(tmp_path: Path) -> None:
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    primary_log = tmp_path / "primary.jsonl"
    cluster = Cluster(tmp_path)
    cluster.start_arbiter()
    hook = ("--on-role-change", f"{sys.executable} {recorder} {primary_log}")
    cluster.processes["primary"] = Process(
        "primary", cluster.replica_command("primary", *hook), tmp_path
    )
    cluster.processes["backup"] = Process("backup", cluster.replica_command("backup"), tmp_path)
    try:
        cluster.primary.wait_for_output("listening")
        wait_until(lambda: roles(primary_log) == ["primary"], 20, "the primary's hook ran")
        cluster.primary.signal(signal.SIGSTOP)  # hung: the backup takes over
        wait_until(lambda: status(cluster.backup_admin)["role"] == "live", 20, "backup live")
        cluster.primary.signal(signal.SIGCONT)  # wakes up, asks the arbiter, loses
        assert cluster.primary.wait() == 4
        assert roles(primary_log) == ["primary", "halted"]
        halted = recorded(primary_log)[-1]
        assert halted["FTPROXY_PREVIOUS_ROLE"] == "primary"
        assert "the backup won the arbiter" in halted["FTPROXY_REASON"]
    finally:
        cluster.stop()


def test_a_primary_that_loses_its_backup_and_goes_on_alone_runs_its_live_hook(
    tmp_path: Path,
) -> None:
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    primary_log = tmp_path / "primary.jsonl"
    cluster = Cluster(tmp_path)
    cluster.start_arbiter()
    hook = ("--on-role-change", f"{sys.executable} {recorder} {primary_log}")
    cluster.processes["primary"] = Process(
        "primary", cluster.replica_command("primary", *hook), tmp_path
    )
    cluster.processes["backup"] = Process("backup", cluster.replica_command("backup"), tmp_path)
    try:
        cluster.primary.wait_for_output("listening")
        wait_until(lambda: roles(primary_log) == ["primary"], 20, "the primary's hook ran")
        cluster.backup.signal(signal.SIGKILL)
        wait_until(lambda: roles(primary_log) == ["primary", "live"], 20, "the live hook ran")
        live = recorded(primary_log)[-1]
        assert live["FTPROXY_PREVIOUS_ROLE"] == "primary"
        assert "this primary won the arbiter" in live["FTPROXY_REASON"]
        assert KvClient(cluster.service_port).call("INCR", "n") == 1  # served alone
    finally:
        cluster.stop()


def test_re_protection_runs_the_primary_hook_of_the_next_generation(tmp_path: Path) -> None:
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    primary_log = tmp_path / "primary.jsonl"
    cluster = Cluster(tmp_path)
    cluster.start_arbiter()
    log_port, admin = free_port(), free_port()
    hook = ("--on-role-change", f"{sys.executable} {recorder} {primary_log}")
    primary = cluster.replica(
        "a", "primary", "--log-listen", f"127.0.0.1:{log_port}", *hook, admin=admin
    )
    joining = ("--primary", f"127.0.0.1:{log_port}")
    try:
        first = cluster.replica("b", "backup", *joining, admin=free_port())
        primary.wait_for_output("listening")
        wait_until(lambda: roles(primary_log) == ["primary"], 20, "the primary's hook ran")
        first.signal(signal.SIGKILL)
        wait_until(lambda: roles(primary_log) == ["primary", "live"], 20, "the live hook ran")
        cluster.replica("c", "backup", *joining, admin=free_port())  # the next backup
        wait_until(
            lambda: roles(primary_log) == ["primary", "live", "primary"], 30, "protected again"
        )
        again = recorded(primary_log)[-1]
        assert again["FTPROXY_GENERATION"] == "2" and again["FTPROXY_PREVIOUS_ROLE"] == "live"
        assert "caught up" in again["FTPROXY_REASON"]
        assert status(admin)["protected"] is True
    finally:
        cluster.stop()
