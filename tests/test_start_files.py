"""Files are not devices: each replica runs in its own directory, from a pinned program.

A service that keeps its state in a file (sqlite here) must not share that file
with its backup, and both must start the same program: the backup refuses, at
the opening, a copy of the script that differs from the primary's.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import urllib.request
from pathlib import Path

import pytest
from cluster import Cluster, Process, status, wait_until
from support import GUESTS, Recording, free_port, run_ftproxy

EXIT_HALTED = 4


@pytest.fixture
def pair(tmp_path: Path):
    made: list[Cluster] = []

    def make() -> Cluster:
        c = Cluster(tmp_path)
        c.start_arbiter()
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def _replica_dirs(tmp_path: Path) -> tuple[Path, Path]:
    dirs = tmp_path / "primary-host", tmp_path / "backup-host"
    for where in dirs:
        where.mkdir()
        shutil.copy(GUESTS / "sqlite_kv.py", where / "app.py")
    return dirs


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as reply:
        return str(reply.read().decode())


def test_a_sqlite_service_keeps_every_write_across_failover_each_replica_in_its_own_directory(
    pair, tmp_path: Path
) -> None:
    c = pair()
    primary_dir, backup_dir = _replica_dirs(tmp_path)
    guest = ("app.py", str(c.service_port))
    c.processes["primary"] = Process(
        "primary", c.replica_command("primary", guest=guest), tmp_path, cwd=primary_dir
    )
    c.processes["backup"] = Process(
        "backup", c.replica_command("backup", "--workdir", str(backup_dir), guest=guest), tmp_path
    )
    c.primary.wait_for_output("listening")
    c.backup.wait_for_output("listening")
    with concurrent.futures.ThreadPoolExecutor(4) as clients:
        acks = list(
            clients.map(lambda i: _get(c.service_port, f"/put?k=key{i}&v=value{i}"), range(20))
        )
    assert sorted(acks, key=lambda a: int(a.split()[1])) == [f"ok {n}\n" for n in range(1, 21)]
    c.kill_primary()
    wait_until(lambda: status(c.backup_admin)["role"] == "live", 20, "the backup goes live")
    for i in range(20):
        assert _get(c.service_port, f"/get?k=key{i}") == f"value{i}\n"
    # The live guest's own file holds every write: the next one is the 21st.
    assert _get(c.service_port, "/put?k=after&v=failover") == "ok 21\n"
    assert (primary_dir / "kv.sqlite3").exists() and (backup_dir / "kv.sqlite3").exists()
    chosen = [e for e in c.backup.events() if e["event"] == "guest_directory_chosen"]
    assert chosen and chosen[0]["workdir"] == str(backup_dir)
    assert chosen[0]["primary_workdir"] == str(primary_dir)
    assert "guest_directory_shared" not in c.backup.stderr()
    assert "replay_diverged" not in c.backup.stderr()


def test_the_backup_refuses_a_script_that_differs_from_the_primarys(pair, tmp_path: Path) -> None:
    c = pair()
    primary_dir, backup_dir = _replica_dirs(tmp_path)
    with open(backup_dir / "app.py", "a") as script:
        script.write("# edited on the backup's host only\n")
    guest = ("app.py", str(c.service_port))
    c.processes["primary"] = Process(
        "primary", c.replica_command("primary", guest=guest), tmp_path, cwd=primary_dir
    )
    c.processes["backup"] = Process(
        "backup", c.replica_command("backup", guest=guest), tmp_path, cwd=backup_dir
    )
    assert c.backup.wait(timeout=30) == EXIT_HALTED
    refused = [e for e in c.backup.events() if e["event"] == "replica_refused"]
    assert refused, c.backup.stderr()
    reason = refused[0]["reason"]
    assert f"the guest's file {backup_dir / 'app.py'} differs from the primary's" in reason
    assert "start each replica from an identical copy of the program" in reason
    assert not (backup_dir / "kv.sqlite3").exists()  # the guest never started there


def test_replay_refuses_a_script_edited_since_the_recording(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    shutil.copy(GUESTS / "sqlite_kv.py", script)
    port = free_port()
    log = tmp_path / "kv.ftlog"
    with Recording(log, script, str(port), cwd=tmp_path) as rec:
        assert _get(port, "/put?k=a&v=1") == "ok 1\n"
        assert rec.stop() == 0, rec.stderr
    with open(script, "a") as edited:
        edited.write("# changed after the recording\n")
    cli = run_ftproxy("replay", str(log), "--quiet-guest")
    assert cli.returncode == 2, cli.stderr
    assert f"the guest's file {script} differs from the recording's" in cli.stderr
    assert (tmp_path / "kv.sqlite3").exists()


def test_a_pair_runs_python_m_http_server_and_fails_over(pair, tmp_path: Path) -> None:
    c = pair()
    site = tmp_path / "site"
    site.mkdir()
    (site / "page.txt").write_text("the same page on both replicas\n")
    guest = ("-m", "http.server", "--bind", "127.0.0.1", "--directory", str(site))
    guest += (str(c.service_port),)
    c.processes["primary"] = Process("primary", c.replica_command("primary", guest=guest), tmp_path)
    c.processes["backup"] = Process("backup", c.replica_command("backup", guest=guest), tmp_path)
    c.primary.wait_for_output("Serving HTTP")
    c.backup.wait_for_output("Serving HTTP")
    assert _get(c.service_port, "/page.txt") == "the same page on both replicas\n"
    c.kill_primary()
    wait_until(lambda: status(c.backup_admin)["role"] == "live", 20, "the backup goes live")
    with concurrent.futures.ThreadPoolExecutor(4) as clients:
        pages = list(clients.map(lambda _: _get(c.service_port, "/page.txt"), range(8)))
    assert pages == ["the same page on both replicas\n"] * 8
    chosen = [e for e in c.backup.events() if e["event"] == "guest_directory_chosen"]
    assert chosen and "replay_diverged" not in c.backup.stderr()


@pytest.mark.parametrize("change", ["a file added", "a file changed"])
def test_a_pinned_data_directory_must_be_the_same_on_the_backup(
    pair, tmp_path: Path, change: str
) -> None:
    c = pair()
    primary_dir, backup_dir = _replica_dirs(tmp_path)
    for where in (primary_dir, backup_dir):
        (where / "seed").mkdir()
        (where / "seed" / "config.json").write_text('{"greeting": "hello"}\n')
    if change == "a file added":
        (backup_dir / "seed" / "stray.json").write_text("{}\n")
        expected = f"the guest's directory {backup_dir / 'seed'}/ does not list the files"
    else:
        (backup_dir / "seed" / "config.json").write_text('{"greeting": "bye"}\n')
        expected = f"the guest's file {backup_dir / 'seed' / 'config.json'} differs"
    guest = ("app.py", str(c.service_port))
    primary = c.replica_command("primary", "--pin", "seed", guest=guest)
    c.processes["primary"] = Process("primary", primary, tmp_path, cwd=primary_dir)
    backup = c.replica_command("backup", guest=guest)
    c.processes["backup"] = Process("backup", backup, tmp_path, cwd=backup_dir)
    assert c.backup.wait(timeout=30) == EXIT_HALTED
    reason = next(e["reason"] for e in c.backup.events() if e["event"] == "replica_refused")
    assert expected in reason


def test_pinning_a_path_that_is_not_there_is_a_usage_error(tmp_path: Path) -> None:
    cli = run_ftproxy(
        "record",
        "--log",
        str(tmp_path / "x.ftlog"),
        "--pin",
        "no/such/dir",
        "--",
        str(GUESTS / "sqlite_kv.py"),
        "0",
    )
    assert cli.returncode == 2
    assert "--pin 'no/such/dir': no such file or directory" in cli.stderr
