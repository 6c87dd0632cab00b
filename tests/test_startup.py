"""Start-up checks: what the flags name is checked at start, in one line, exit 5.

Real processes, real busy ports: never a traceback, never only once a backup
joins; and the admin endpoint answers from the start.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import KV, Cluster, Process, status, wait_until
from support import FTPROXY, ROOT, free_port
from test_metrics import healthz

EXIT_STARTUP = 5
TIMEOUT = 30


@pytest.fixture
def busy() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def replica(role: str, *flags: str, guest: tuple[str, ...] = ()) -> list[str]:
    where = ["--log-listen", "127.0.0.1:0"] if role == "primary" else ["--primary", "127.0.0.1:9"]
    if "--log-listen" in flags:
        where = []
    return [
        *FTPROXY,
        role,
        *where,
        "--arbiter",
        f"127.0.0.1:{free_port()}",
        "--insecure",
        *flags,
        "--",
        *(guest or (str(KV), "--port", str(free_port()))),
    ]


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line that says why it did not start, and nothing like a traceback."""
    assert result.returncode == EXIT_STARTUP, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("role", ["primary", "backup"])
def test_a_missing_script(role: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    line = one_line(run(replica(role, guest=(str(missing),))))
    assert line == f"ftproxy {role}: cannot start: -- {missing}: no such file"


def test_a_busy_log_listen_port(busy: int) -> None:
    line = one_line(run(replica("primary", "--log-listen", f"127.0.0.1:{busy}")))
    assert (
        line
        == f"ftproxy primary: cannot start: --log-listen 127.0.0.1:{busy}: Address already in use"
    )


@pytest.mark.parametrize("role", ["primary", "backup"])
def test_a_busy_admin_port_fails_at_start_not_when_a_backup_joins(role: str, busy: int) -> None:
    line = one_line(run(replica(role, "--admin", f"127.0.0.1:{busy}")))
    assert line == f"ftproxy {role}: cannot start: --admin 127.0.0.1:{busy}: Address already in use"


def test_a_busy_service_address(busy: int) -> None:
    line = one_line(run(replica("primary", "--map", f"6380=127.0.0.1:{busy}")))
    assert line == (
        f"ftproxy primary: cannot start: --map 6380=127.0.0.1:{busy}: Address already in use"
    )


def test_the_arbiter_with_a_busy_port_or_an_unusable_data_dir(busy: int, tmp_path: Path) -> None:
    arbiter = [*FTPROXY, "arbiter", "--insecure"]
    result = run([*arbiter, "--listen", f"127.0.0.1:{busy}", "--data-dir", str(tmp_path / "d")])
    assert result.returncode == EXIT_STARTUP and "Traceback" not in result.stderr
    failed = json.loads(result.stderr.splitlines()[-1])
    assert failed["reason"] == f"--listen 127.0.0.1:{busy}: Address already in use"
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = run([*arbiter, "--listen", "127.0.0.1:0", "--data-dir", str(not_a_dir)])
    assert result.returncode == EXIT_STARTUP and "Traceback" not in result.stderr
    failed = json.loads(result.stderr.splitlines()[-1])
    assert failed["event"] == "arbiter_failed"
    assert failed["reason"].startswith(f"--data-dir {not_a_dir}: ")


def test_the_admin_endpoint_answers_before_a_backup_joins(tmp_path: Path) -> None:
    admin = free_port()
    primary = Process("primary", replica("primary", "--admin", f"127.0.0.1:{admin}"), tmp_path)
    try:
        wait_until(lambda: status(admin)["role"] == "waiting_for_backup", 20, "the admin answers")
        assert healthz(admin) == (
            503,
            "waiting_for_backup: neither serving nor ready to take over\n",
        )
        assert primary.popen.poll() is None
    finally:
        primary.stop()


def test_a_busy_port_the_guest_binds_itself_ends_both_replicas_without_a_failover(
    tmp_path: Path, busy: int
) -> None:
    """No --map: the port is the guest's business, known when it binds. The backup
    replays the same refused bind and ends the same way: nobody goes live."""
    cluster = Cluster(tmp_path, service_port=busy)
    cluster.start_arbiter()
    cluster.processes["primary"] = Process("primary", cluster.replica_command("primary"), tmp_path)
    cluster.processes["backup"] = Process("backup", cluster.replica_command("backup"), tmp_path)
    try:
        assert cluster.primary.wait(timeout=TIMEOUT) == 3
        assert cluster.backup.wait(timeout=TIMEOUT) == 3
        assert f"kv: cannot listen on 127.0.0.1:{busy}" in cluster.primary.stderr()
        assert not any(e["event"] == "role_changed" for e in cluster.backup.events())
        assert "Traceback" not in cluster.primary.stderr() + cluster.backup.stderr()
    finally:
        cluster.stop()


def test_record_refuses_a_missing_script_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    result = run([*FTPROXY, "record", "--log", str(tmp_path / "x.ftlog"), "--", str(missing)])
    assert one_line(result) == f"ftproxy record: cannot start: -- {missing}: no such file"
    assert not (tmp_path / "x.ftlog").exists()


def node(*flags: str) -> list[str]:
    """``ftproxy run``, which checks its flags before it asks the arbiter anything."""
    return [
        *FTPROXY,
        "run",
        "--pair",
        "kv",
        "--log-listen",
        f"127.0.0.1:{free_port()}",
        "--arbiter",
        f"127.0.0.1:{free_port()}",
        "--insecure",
        *flags,
        "--",
        str(KV),
        "--port",
        str(free_port()),
    ]


@pytest.mark.parametrize("role", ["primary", "backup", "run"])
@pytest.mark.parametrize("below", [False, True])
def test_a_data_dir_that_cannot_be_a_directory(role: str, below: bool, tmp_path: Path) -> None:
    file = tmp_path / "data"
    file.write_text("not a directory\n")
    data_dir = file / "d" if below else file
    flags = ("--data-dir", str(data_dir))
    line = one_line(run(node(*flags) if role == "run" else replica(role, *flags)))
    assert line == f"ftproxy {role}: cannot start: --data-dir {data_dir}: {file} is not a directory"
