"""``ftproxy demo``: a real failover under load, with and without the output rule.

The end-to-end tests run the demo as a user does, in its own process; the rest check
the pieces that decide its verdict (the RESP parsing) and its exits (bad options,
a replica that fails, Ctrl-C), which must never leave a process or a directory.
``--packet`` runs as root only (network namespaces, raw sockets): one connection
must survive the failover, and the demo's lab must be gone afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import FTPROXY, ROOT

from ftproxy.tools import demo
from ftproxy.tools.procs import Proc

RUN_TIMEOUT = 30.0
PACKET_RUN_TIMEOUT = 90.0
FIELDS = {"acked", "found", "lost", "failover_s", "output_rule", "passed", "verdict"}

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="ftproxy demo --packet needs root and iproute2 (network namespaces, raw sockets)",
)


def demo_command() -> tuple[str, ...]:
    """``ftproxy demo``, as the README runs it."""
    return (*FTPROXY, "demo")


def run_demo(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*demo_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def verdict(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one JSON object on stdout; the failure message shows stderr."""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"stdout: {result.stdout!r}\nstderr:\n{result.stderr}"
    parsed = json.loads(lines[0])
    assert isinstance(parsed, dict)
    return parsed


def test_kill_9_under_load_loses_no_acknowledged_write() -> None:
    started = time.monotonic()
    result = run_demo("--json", "--warmup", "1.5", "--after", "2")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    answer = verdict(result)
    assert answer.keys() >= FIELDS
    assert answer["output_rule"] is True
    assert answer["acked"] > 0
    assert answer["lost"] == 0
    assert answer["found"] == answer["acked"]
    assert answer["failover_s"] is not None and 0 <= answer["failover_s"] < 5
    assert "Traceback" not in result.stderr
    assert took < 20


def test_without_the_output_rule_acknowledged_writes_are_lost() -> None:
    result = run_demo("--json", "--warmup", "1.5", "--after", "2", "--no-output-rule")
    # Losing writes is what it demonstrates, and still a verdict of lost writes.
    assert result.returncode == demo.EXIT_LOST_UNSAFE, result.stderr
    answer = verdict(result)
    assert answer["output_rule"] is False and answer["passed"] is False
    assert answer["acked"] > 0
    assert answer["lost"] > 0
    assert answer["found"] == answer["acked"] - answer["lost"]


def test_without_a_terminal_log_lines_and_the_verdict_never_share_a_line() -> None:
    """stdout and stderr in one pipe, as under ``| tee`` or systemd: no live view."""
    result = subprocess.run(
        [*demo_command(), "--warmup", "1", "--after", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(event["event"] == "key_decided" for event in logged)  # the arbiter's log
    panel = [line for line in lines if not line.startswith("{")]
    assert any("no acknowledged write lost" in line for line in panel), result.stdout
    assert not any('{"' in line for line in panel), result.stdout


def test_both_modes_give_the_same_json_fields() -> None:
    socket_verdict = demo.Verdict(True, 3, 3, 2, 2, 0, 0.01, 5, 0, 0.0, 2.0)
    packet_verdict = demo.PacketVerdict(
        "kill", "10.200.0.100:6380", "10.200.0.10:4000", None, "the same connection",
        3, 3, 0, 2, 2, 5, (), 0, 0.2, 1, 700.0, 1300.0, 6.0,
    )  # fmt: skip
    socket_json, packet_json = socket_verdict.as_json(), packet_verdict.as_json()
    assert list(socket_json) == list(packet_json) == list(demo.VERDICT_FIELDS)
    assert socket_json["passed"] is packet_json["passed"] is True
    assert (socket_json["mode"], packet_json["mode"]) == ("socket", "packet")
    lost = demo.Verdict(False, 3, 2, 2, 2, 0, 0.01, 5, 1, 200.0, 2.0).as_json()
    assert lost["passed"] is False and lost["lost"] == 1


def test_three_rounds_of_kill_9_heal_the_pair_each_time_and_lose_nothing() -> None:
    result = run_demo("--json", "--rounds", "3", "--warmup", "1", "--after", "1", timeout=200)
    assert result.returncode == 0, result.stderr
    answer = verdict(result)
    assert answer["lost"] == 0 and answer["acked"] > 0
    assert answer["found"] == answer["acked"]
    rounds = answer["rounds"]
    assert [r["generation"] for r in rounds] == [2, 3, 4]
    assert [r["killed"] for r in rounds] == ["primary", "backup", "backup 2"]
    for done in rounds:
        assert done["failover_s"] is not None and 0 <= done["failover_s"] < 5
        assert done["reprotect_s"] > 0 and done["catch_up_entries"] > 0
    assert answer["failover_s"] == max(r["failover_s"] for r in rounds)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--warmup", "-1"), "--warmup"),
        (("--rounds", "0"), "--rounds"),
        (("--rounds", "2", "--no-output-rule"), "--rounds"),
        (("--clients", "0"), "--clients"),
        (("--ship-delay-ms", "1000"), "--ship-delay-ms"),
    ],
)
def test_bad_options_get_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    result = run_demo("--json", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_guest_that_fails_gives_one_line_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise SystemExit('the service refuses to start')\n")
    args = demo_parser().parse_args(["--json", "--start-timeout", "10"])
    assert demo.run_demo(args, guest=broken) == demo.EXIT_FAILED
    out, err = capsys.readouterr()
    assert '"acked"' not in out  # no verdict (structlog, unconfigured here, logs to stdout)
    message = [line for line in err.splitlines() if line.startswith("ftproxy demo:")]
    assert len(message) == 1, err
    assert "exited" in message[0] and "refuses to start" in message[0], err
    assert "Traceback" not in err


def interrupt_under_load(
    scratch: Path,
    args: list[str],
    signum: int,
    timeout: float,
    while_running: Callable[[], None],
) -> dict[str, dict[str, Any]]:
    """Start the demo, signal it once its load runs; check it says so and exits 130.

    ``while_running`` checks the running demo just before the signal; the
    events seen up to then are returned (by name). Its output goes to ``scratch``.
    """
    process = Proc("demo", [*demo_command(), *args], scratch, cwd=ROOT, pipes=True)
    try:
        ready = process.wait_for_event("load_started", timeout)
        while_running()
        seen = {str(record.get("event", "")): record for record in process.events()}
        process.signal(signum)
        process.wait(timeout)
        process.wait_output(timeout)
    finally:
        if process.alive():  # only then: what the demo leaves behind is for the test to see
            process.stop()
    stderr = process.stderr()
    assert ready
    assert process.popen.returncode == demo.EXIT_INTERRUPTED, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    return seen


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_leaves_no_process_and_no_directory(signum: int, tmp_path: Path) -> None:
    seen = interrupt_under_load(
        tmp_path, ["--json", "--warmup", "30"], signum, RUN_TIMEOUT, lambda: None
    )
    pair = seen["pair_ready"]
    pids = [pid for group in pair["pids"].values() for pid in group]
    assert len(pids) == 4  # both supervisors and both guests
    assert wait_gone(pids), f"still running: {[p for p in pids if running(p)]}"
    assert not Path(pair["workdir"]).exists()


@needs_root
def test_packet_demo_keeps_one_connection_through_kill_9() -> None:
    result = run_demo(
        "--packet", "--json", "--warmup", "2", "--after", "2", timeout=PACKET_RUN_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    answer = verdict(result)
    assert answer.keys() >= FIELDS
    assert answer["mode"] == "packet" and answer["failure"] == "kill"
    assert answer["connection_survived"] is True, answer["connection_error"]
    assert answer["connections"] == 1 and answer["reconnects"] == 0
    assert answer["read_back_on"] == "the same connection"
    assert answer["acked"] > 0 and answer["lost"] == 0 and answer["found"] == answer["acked"]
    assert answer["wrong_replies"] == 0 and answer["extra_incrs"] == 0
    assert answer["found_incrs"] == answer["acked_incrs"] > 0
    assert answer["failover_s"] is not None and 0 < answer["failover_s"] < 5
    assert "Traceback" not in result.stderr
    assert not demo_lab_namespaces()


@needs_root
def test_interrupted_packet_demo_takes_its_lab_down(tmp_path: Path) -> None:
    def lab_is_up() -> None:
        assert demo_lab_namespaces()

    args = ["--packet", "--json", "--warmup", "30"]
    seen = interrupt_under_load(tmp_path, args, signal.SIGINT, PACKET_RUN_TIMEOUT, lab_is_up)
    pids = [pid for group in seen["pair_ready"]["pids"].values() for pid in group]
    assert wait_gone(pids), f"still running: {[p for p in pids if running(p)]}"
    assert not demo_lab_namespaces()


def test_packet_demo_without_root_says_so_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    args = demo_parser().parse_args(["--packet", "--json"])
    assert demo.run_demo(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().splitlines() == [f"ftproxy demo: {demo.NEEDS_ROOT}"]
    assert "root" in err and "sudo" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--partition",), "--partition needs --packet"),
        (("--packet", "--clients", "2"), "--clients"),
        (("--packet", "--no-output-rule"), "--no-output-rule"),
    ],
)
def test_packet_options_that_make_no_sense_exit_2(
    args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.run_demo(demo_parser().parse_args(args)) == 2
    assert message in capsys.readouterr().err


needs_etcd = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="--etcd needs etcd (Debian: apt-get install etcd-server)"
)


@needs_etcd
def test_etcd_demo_decides_through_etcd_with_a_member_killed() -> None:
    result = run_demo("--json", "--etcd", "--warmup", "2", "--after", "2", timeout=60)
    assert result.returncode == 0, result.stderr
    answer = verdict(result)
    assert answer["acked"] > 0 and answer["lost"] == 0
    etcd = answer["arbiter"]
    assert etcd["kind"] == "etcd" and etcd["members"] == 3 and etcd["members_killed"] == 1
    assert etcd["key"] == "ftproxy/ftproxy/generation/1"
    assert etcd["winner"] == etcd["backup"] and etcd["winner"].startswith("backup@")
    assert "decided through etcd" in answer["verdict"]
    assert "Traceback" not in result.stderr


@needs_etcd
def test_interrupted_etcd_demo_leaves_no_etcd_member(tmp_path: Path) -> None:
    seen = interrupt_under_load(
        tmp_path, ["--json", "--etcd", "--warmup", "30"], signal.SIGINT, 60, lambda: None
    )
    members = seen["arbiter_started"]["pids"]
    assert len(members) == 3
    assert wait_gone(members), f"still running: {[p for p in members if running(p)]}"
    assert not Path(seen["pair_ready"]["workdir"]).exists()


def test_etcd_demo_without_etcd_names_the_package() -> None:
    result = subprocess.run(
        [*demo_command(), "--json", "--etcd"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=ROOT,
        env={**os.environ, "PATH": "/nonexistent"},
    )
    assert result.returncode == demo.EXIT_FAILED
    assert result.stdout == ""
    assert "apt-get install etcd-server" in result.stderr and "Traceback" not in result.stderr
    assert demo.run_demo(demo_parser().parse_args(["--etcd", "--packet"])) == 2


def test_resp_replies_parse_whole_or_not_at_all() -> None:
    assert demo.parse_reply(b"+OK\r\n") == ("OK", 5)
    assert demo.parse_reply(b":42\r\n:1") == (42, 5)
    assert demo.parse_reply(b"$3\r\nabc\r\n") == (b"abc", 9)
    assert demo.parse_reply(b"$-1\r\n") == (None, 5)
    assert demo.parse_reply(b"-ERR nope\r\n") == (demo.ErrorReply("ERR nope"), 11)
    assert demo.parse_reply(b"$3\r\nab") is None
    assert demo.parse_reply(b":4") is None
    assert demo.encode_command(b"SET", b"k", b"") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"


def test_stderr_summary_keeps_what_explains_a_failure() -> None:
    text = "\n".join(
        [
            '{"event": "joined_primary", "level": "info"}',
            '{"event": "primary_lost", "reason": "closed", "level": "warning"}',
            "  | Traceback (most recent call last):",
            "  |     raise Boom(",
            "  |     ^^^^^^^^^",
            "  | Boom: it broke",
            "  +------------------------------------",
        ]
    )
    assert demo.summarize_stderr(text) == [
        "Traceback (most recent call last):",
        "raise Boom(",
        "Boom: it broke",
    ]
    assert demo.summarize_stderr(text, lines=5)[:2] == ["joined_primary", "primary_lost (closed)"]


# --- helpers -------------------------------------------------------------------------------


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    demo.add_demo_arguments(parser)
    return parser


def demo_lab_namespaces() -> list[str]:
    """The network namespaces of the packet demo's lab that exist now."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{demo.LAB_PREFIX}-")]


def running(pid: int) -> bool:
    """Alive and not a zombie (a reparented guest may wait for a reaper that never comes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
