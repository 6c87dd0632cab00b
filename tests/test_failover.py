"""Primary, backup and arbiter in real processes: kill -9, SIGSTOP, the arbiter down.

The claim under test is the product's: no acknowledged write is ever lost, and
there is never a moment when two replicas act alone.
"""

from __future__ import annotations

import random
import signal
import socket
import time
from pathlib import Path

import pytest
from cluster import KvClient, Load, Process, status, wait_until
from support import FTPROXY, free_port

from ftproxy.tools.resp import encode_command, receive_reply

EXIT_HALTED = 4


def role(admin_port: int) -> str:
    return str(status(admin_port)["role"])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_of_the_primary_under_load_loses_no_acknowledged_write(cluster, seed: int) -> None:
    c = cluster().start()
    load = Load(c.service_port, clients=4).start()
    before = random.Random(seed).uniform(0.3, 1.5)
    wait_until(lambda: load.acknowledged() > 50, 20, "the load is running")
    time.sleep(before)  # a random point of the execution to fail at, not synchronisation
    acked_at_kill = load.acknowledged()
    c.kill_primary()
    wait_until(lambda: load.acknowledged() > acked_at_kill + 50, 20, "writes go on after failover")
    load.stop()
    assert role(c.backup_admin) == "live"
    load.verify(c.service_port)


def test_kill_9_of_the_backup_lets_the_primary_go_on_alone(cluster) -> None:
    c = cluster().start()
    load = Load(c.service_port, clients=2).start()
    wait_until(lambda: load.acknowledged() > 50, 20, "the load is running")
    c.backup.signal(signal.SIGKILL)
    acked = load.acknowledged()
    wait_until(lambda: role(c.primary_admin) == "live", 10, "the primary goes on alone")
    wait_until(lambda: load.acknowledged() > acked + 50, 20, "writes go on")
    load.stop()
    load.verify(c.service_port)
    events = [e["event"] for e in c.primary.events()]
    assert "backup_lost" in events and "arbiter_decided" in events


def test_a_stopped_primary_loses_to_the_backup_and_sends_nothing_after(cluster) -> None:
    # Two "hosts": the backup serves another port, so a client of the old
    # primary can be watched after the backup went live.
    c = cluster(backup_service_port=free_port()).start()
    load = Load(c.service_port, clients=2).start()
    wait_until(lambda: load.acknowledged() > 50, 20, "the load is running")
    load.stop()
    stale = KvClient(c.service_port)
    assert stale.call("INCR", "stale") == 1
    c.primary.signal(signal.SIGSTOP)
    try:
        stale.sock.sendall(b"*2\r\n$4\r\nINCR\r\n$5\r\nstale\r\n")  # waits in the kernel
        wait_until(lambda: role(c.backup_admin) == "live", 10, "the backup goes live")
        assert c.backup_service_port is not None
        load.verify(c.backup_service_port)
    finally:
        c.primary.signal(signal.SIGCONT)
    assert c.primary.wait(timeout=20) == EXIT_HALTED
    stale.sock.settimeout(10)
    try:
        leftover = stale.sock.recv(4096)
    except ConnectionResetError:
        leftover = b""
    assert leftover == b"", f"the old primary answered after the backup went live: {leftover!r}"
    assert "role_changed" in [e["event"] for e in c.primary.events() if e.get("to") == "halted"]


def test_without_the_rule_a_reply_after_a_stall_still_has_its_log_held_back(cluster) -> None:
    """--no-output-rule --ship-delay-ms, what the unsafe demonstrations run: each
    entry stays on the primary for the whole delay after it is logged, even when
    the primary was off the CPU for longer than that (on a loaded machine), so a
    kill just after a reply always finds that reply's write unshipped."""
    slow = ("--peer-timeout-ms", "20000")  # the stall below is no failure of either side
    c = cluster(
        primary_args=("--no-output-rule", "--ship-delay-ms", "1500", "--max-lag-ms", "9000", *slow),
        backup_args=slow,
    ).start()
    client = KvClient(c.service_port)
    assert client.call("SET", "before", "1") == "OK"  # its entry is held until ~1.5 s on
    assert client.sock is not None
    c.primary.signal(signal.SIGSTOP)
    try:
        client.sock.sendall(encode_command("SET", "after", "2"))
        time.sleep(2.0)  # the stall's length (past the delay), not synchronisation
    finally:
        c.primary.signal(signal.SIGCONT)
    client.sock.settimeout(10)
    assert receive_reply(client.sock, client.buffer) == "OK"  # released at once: no rule
    c.kill_primary()  # well within the 1.5 s that entry waits
    wait_until(lambda: role(c.backup_admin) == "live", 20, "the backup goes live")
    survivor = KvClient(c.service_port)
    assert survivor.call("GET", "after") is None, "the acknowledged write was shipped early"


def test_the_arbiter_down_in_steady_state_changes_nothing(cluster) -> None:
    c = cluster().start()
    c.arbiter.signal(signal.SIGKILL)
    load = Load(c.service_port, clients=2).start()
    wait_until(lambda: load.acknowledged() > 100, 20, "writes are acknowledged")
    load.stop()
    load.verify(c.service_port)
    assert role(c.primary_admin) == "primary" and role(c.backup_admin) == "backup"


def test_with_the_arbiter_down_nobody_goes_live_until_it_is_back(cluster) -> None:
    c = cluster().start()
    load = Load(c.service_port, clients=2).start()
    wait_until(lambda: load.acknowledged() > 50, 20, "the load is running")
    c.arbiter.signal(signal.SIGKILL)
    c.arbiter.wait()
    c.kill_primary()
    wait_until(lambda: role(c.backup_admin) == "arbitrating", 10, "the backup asks the arbiter")
    # While it cannot get an answer it stays put, and the service address stays dark.
    for _ in range(10):
        assert role(c.backup_admin) == "arbitrating"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", c.service_port), timeout=1).close()
        time.sleep(0.1)
    c.start_arbiter()
    wait_until(lambda: role(c.backup_admin) == "live", 20, "the backup goes live")
    acked = load.acknowledged()
    wait_until(lambda: load.acknowledged() > acked + 20, 20, "writes go on")
    load.stop()
    load.verify(c.service_port)


def test_a_backup_running_another_program_is_refused(cluster) -> None:
    c = cluster()
    c.start_arbiter()
    primary = Process("primary", c.replica_command("primary"), c.tmp)
    c.processes["primary"] = primary
    other = Process(
        "other",
        c.replica_command(
            "backup", guest=(str(Path(__file__).parent.parent / "examples" / "echo.py"),)
        ),
        c.tmp,
    )
    c.processes["other"] = other
    assert other.wait() == EXIT_HALTED
    assert "both must run the same guest command line" in other.stderr()
    # The primary keeps waiting for a proper backup, and takes it.
    c.processes["backup"] = Process("backup", c.replica_command("backup"), c.tmp)
    primary.wait_for_output("listening")
    assert KvClient(c.service_port).call("PING") == "PONG"


def test_a_replica_of_a_decided_generation_refuses_to_serve(cluster) -> None:
    c = cluster().start()
    c.kill_primary()
    wait_until(lambda: role(c.backup_admin) == "live", 10, "the backup goes live")
    again = Process("again", c.replica_command("primary"), c.tmp)
    c.processes["again"] = again
    assert again.wait() == EXIT_HALTED
    assert "was already decided" in again.stderr()


def test_replicas_refuse_to_start_without_a_secret_or_insecure(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        [
            *FTPROXY,
            "primary",
            "--log-listen",
            "127.0.0.1:1",
            "--arbiter",
            "127.0.0.1:2",
            "--",
            "examples/kv.py",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "refuses to start without --secret-file" in done.stderr
    assert "Traceback" not in done.stderr


def test_replicas_authenticate_with_a_shared_secret(cluster, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    secret.chmod(0o600)
    wrong = tmp_path / "wrong"
    wrong.write_text("w" * 32)
    wrong.chmod(0o600)
    c = cluster()
    arbiter = Process(
        "arbiter",
        [
            *FTPROXY,
            "arbiter",
            "--listen",
            f"127.0.0.1:{c.arbiter_port}",
            "--data-dir",
            str(tmp_path / "arb"),
            "--secret-file",
            str(secret),
        ],
        tmp_path,
    )
    c.processes["arbiter"] = arbiter

    def with_secret(command: list[str], path: Path) -> list[str]:
        at = command.index("--insecure")
        return [*command[:at], "--secret-file", str(path), *command[at + 1 :]]

    primary = Process("primary", with_secret(c.replica_command("primary"), secret), tmp_path)
    c.processes["primary"] = primary
    intruder = Process("intruder", with_secret(c.replica_command("backup"), wrong), tmp_path)
    c.processes["intruder"] = intruder
    assert intruder.wait() == EXIT_HALTED
    assert "different secrets" in intruder.stderr()
    c.processes["backup"] = Process(
        "backup", with_secret(c.replica_command("backup"), secret), tmp_path
    )
    primary.wait_for_output("listening")
    assert KvClient(c.service_port).call("SET", "k", "v") == "OK"
    assert "different secrets" in primary.stderr()
