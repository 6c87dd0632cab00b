"""The ``ftproxy`` command line by the conventions users know: --version, flags anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
import trio
from support import ROOT

import arbiter
import ftproxy
from ftproxy.logsetup import configure_logging
from ftproxy.tools.procs import Proc

BARE = [sys.executable, "-m", "ftproxy.cli"]


def test_version() -> None:
    done = subprocess.run([*BARE, "--version"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0
    assert done.stdout.strip() == f"ftproxy {ftproxy.__version__}"


@pytest.mark.parametrize(
    "flags_before, flags_after",
    [
        (["-v", "--log-format", "json"], []),
        ([], ["-v", "--log-format", "json"]),
        (["--log-format", "console"], ["--log-format", "json", "--verbose"]),
    ],
    ids=["before", "after", "after-wins"],
)
def test_arbiter_honours_the_logging_flags_wherever_they_are(
    tmp_path: Path, flags_before: list[str], flags_after: list[str]
) -> None:
    command = [
        *BARE,
        *flags_before,
        "arbiter",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path / "data"),
        "--insecure",
        *flags_after,
    ]
    process = Proc("arbiter", command, tmp_path, cwd=ROOT)
    try:
        listening = process.wait_for_event("arbiter_listening", timeout=20.0)  # JSON, as asked
        address = (listening["host"], listening["port"])
        answer = trio.run(arbiter.query, address, "pair/generation/1", None)
        assert isinstance(answer, arbiter.Undecided)
        # A debug event: only there with -v.
        process.wait_for_event("peer_authenticated", timeout=20.0)
    finally:
        process.stop()


def test_arbiter_usage_names_ftproxy_arbiter(tmp_path: Path) -> None:
    done = subprocess.run(
        [*BARE, "arbiter", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith("usage: ftproxy arbiter ")
    assert "ftproxy arbiter: error: refusing to start without --secret-file" in done.stderr


def test_json_logs_keep_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(json_logs=True)
    try:
        try:
            raise ValueError("the reason")
        except ValueError:
            structlog.get_logger("test").exception("something_failed")
        event = json.loads(capsys.readouterr().err.splitlines()[-1])
    finally:
        structlog.reset_defaults()
    assert event["event"] == "something_failed"
    assert "Traceback" in event["exception"] and "ValueError: the reason" in event["exception"]
