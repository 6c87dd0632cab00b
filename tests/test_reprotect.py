"""Re-protection with real processes: after a failover a fresh backup joins the live
replica, catches up from its log, and the pair survives the next fault too.

Each replica here is its own ``ftproxy`` process with its own log address, admin
port and data dir, as on separate hosts; they share the guest's service port
(whoever is live binds it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster import Cluster, KvClient, Load, Process, status, wait_until
from support import FTPROXY, GUESTS, ROOT, connect, free_port, metric_samples, recv_until

from bench.programs import Load as ProgramLoad

EXIT_HALTED = 4
# Rounds under load: each catch-up replays a longer history, and on a busy host
# (2 cores shared) the whole test takes a few minutes.
LONG_TIMEOUT_S = 400


@dataclass
class Node:
    name: str
    log_port: int
    admin: int
    process: Process

    def status(self) -> dict:
        return status(self.admin)

    def protected(self, generation: int) -> bool:
        now = self.status()
        return now["protected"] is True and now["generation"] == generation


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    c.start_arbiter()
    yield c
    c.stop()


def start_primary(c: Cluster, name: str, guest: tuple[str, ...] = ()) -> Node:
    log_port, admin = free_port(), free_port()
    process = c.replica(
        name, "primary", "--log-listen", f"127.0.0.1:{log_port}", admin=admin, guest=guest
    )
    return Node(name, log_port, admin, process)


def start_backup(c: Cluster, name: str, of: Node, *extra: str, guest: tuple[str, ...] = ()) -> Node:
    log_port, admin = free_port(), free_port()
    process = c.replica(
        name,
        "backup",
        "--primary",
        f"127.0.0.1:{of.log_port}",
        "--log-listen",
        f"127.0.0.1:{log_port}",
        *extra,
        admin=admin,
        guest=guest,
    )
    return Node(name, log_port, admin, process)


def kill(node: Node) -> None:
    node.process.signal(signal.SIGKILL)
    node.process.wait()


def events(node: Node, name: str) -> list[dict]:
    return [e for e in node.process.events() if e.get("event") == name]


def form_pair(c: Cluster) -> tuple[Node, Node]:
    primary = start_primary(c, "a")
    backup = start_backup(c, "b", primary)
    primary.process.wait_for_output("listening")
    wait_until(lambda: primary.protected(1), 20, "the first pair is protected")
    return primary, backup


def wait_role(node: Node, role: str, timeout: float = 20) -> None:
    wait_until(lambda: node.status()["role"] == role, timeout, f"{node.name} is {role}")


def wait_protected(node: Node, generation: int, timeout: float = 60) -> None:
    wait_until(
        lambda: node.protected(generation), timeout, f"protected under generation {generation}"
    )


def wait_writes(load: Load | ProgramLoad, more: int = 50) -> None:
    floor = load.acknowledged() + more
    wait_until(lambda: load.acknowledged() > floor, 20, f"{more} more writes are acknowledged")


@pytest.mark.timeout(LONG_TIMEOUT_S)
def test_three_rounds_of_kill_9_under_load_lose_no_acknowledged_write(cluster) -> None:
    c = cluster
    primary, backup = form_pair(c)
    load = Load(c.service_port, clients=4).start()
    try:
        wait_writes(load)
        names = iter("cdefg")
        for generation in (2, 3, 4):
            kill(primary)
            wait_role(backup, "live")
            wait_writes(load)
            assert backup.status()["protected"] is False
            joiner = start_backup(c, next(names), backup)
            wait_protected(backup, generation)
            joiner_status = joiner.status()
            assert joiner_status["role"] == "backup"
            assert joiner_status["generation"] == generation
            assert joiner_status["protected"] is True
            (protected,) = events(backup, "pair_protected")[-1:]
            assert protected["generation"] == generation and protected["entries_sent"] > 0
            wait_writes(load)
            # Protected again, it measures its log channel as the first pair's primary does.
            assert backup.status()["channel_rtt_ms"]["samples"] > 0
            primary, backup = backup, joiner
        wait_writes(load)
    finally:
        load.stop()
    load.verify(c.service_port)
    # The last pair holds the whole history: kill its primary and nothing is lost either.
    kill(primary)
    wait_role(backup, "live")
    load.verify(c.service_port)
    # What the live replica holds in its data dir is a log like any other.
    log_file = str(c.tmp / f"data-{backup.name}" / "log.ftlog")
    shown = subprocess.run(
        [*FTPROXY, "log", "show", log_file], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "kv.py" in shown.stdout
    replayed = subprocess.run(
        [*FTPROXY, "replay", "--quiet-guest", log_file],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    assert "identical to the recording" in replayed.stderr


def catching_up(node: Node) -> bool:
    catch_up = node.status().get("catch_up")
    return bool(catch_up and catch_up["state"] == "catching_up" and catch_up["acked_seq"] > 0)


@pytest.mark.timeout(LONG_TIMEOUT_S)
@pytest.mark.parametrize("name", ["aiohttp", "uvicorn-starlette"])
def test_a_real_server_is_protected_again_after_each_kill_9_under_load(
    name: str, tmp_path: Path
) -> None:
    """A program nobody here wrote (``bench/programs.py``) through two rounds of kill -9
    of the primary, each with connections idle, mid-request and mid-response, and a
    fresh backup that catches up from the live replica's log under load and protects
    the pair again: every reply is its request's, no acknowledged write is lost, and
    a half request is never applied."""
    from test_real_programs import BIG_KEY, BIG_VALUE, Held, _tail, assert_nothing_lost

    from bench.programs import PROGRAMS, client, wait_serving

    (program,) = [p for p in PROGRAMS if p.name == name]
    port = free_port()
    guest = tuple(program.argv(port))
    c = Cluster(tmp_path, service_port=port)
    c.start_arbiter()
    try:
        primary = start_primary(c, "a", guest)
        live = start_backup(c, "b", primary, guest=guest)
        wait_serving(program, port)
        wait_protected(primary, 1)
        client(program, port, timeout=60).put(BIG_KEY, BIG_VALUE)
        load = ProgramLoad(program, port, clients=4, tag="load").start()
        try:
            wait_until(lambda: load.acknowledged() >= 30, 30, "the writers are under way")
            for generation, joiner in ((2, "c"), (3, "d")):
                held = Held(program, port).open()
                kill(primary)
                wait_role(live, "live")
                held.check_ended()
                fresh = start_backup(c, joiner, live, guest=guest)
                wait_protected(live, generation, 120)
                wait_writes(load, 30)  # the writers go on, protected again
                primary, live = live, fresh
            after = ProgramLoad(program, port, clients=8, tag="after").start(steps=10)
            after.join(60)
            load.stop()
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{_tail(c)}") from None
        assert_nothing_lost(program, port, load, after)
    finally:
        c.stop()


def test_the_joiner_halts_and_sends_nothing_when_the_live_replica_dies_during_catch_up(
    cluster,
) -> None:
    c = cluster
    load = Load(c.service_port, clients=4)
    primary, live = form_pair(c)
    load.start()
    try:
        wait_until(lambda: load.acknowledged() > 1500, 60, "a history of writes")
        kill(primary)
        wait_role(live, "live")
        joiner = start_backup(c, "c", live)
        wait_until(lambda: catching_up(live), 30, "the joiner is catching up")
        # Frozen, the live replica can no longer tell the joiner it is protected.
        live.process.signal(signal.SIGSTOP)
        assert joiner.status()["protected"] is False
        kill(live)
        assert joiner.process.wait(timeout=20) == EXIT_HALTED
    finally:
        load.stop()
    (halted,) = events(joiner, "replica_halted")
    assert "while this backup was catching up" in halted["reason"]
    assert "cannot go live" in halted["reason"]
    (lost,) = events(joiner, "primary_lost")  # what it saw is said with the halt
    assert f"({lost['reason']}; it had received" in halted["reason"]
    assert not [e for e in events(joiner, "role_changed") if e.get("to") == "live"]
    with pytest.raises(OSError):  # nobody serves: the joiner sent nothing
        socket.create_connection(("127.0.0.1", c.service_port), timeout=1).close()


def test_a_stopped_old_primary_thawed_after_generation_2_formed_halts_and_sends_nothing(
    cluster,
) -> None:
    c = cluster
    # Two "hosts": the backups serve another port, so the old primary's client can be
    # watched after the others went on.
    other_port = free_port()
    mapping = ("--map", f"{c.service_port}=127.0.0.1:{other_port}")
    primary = start_primary(c, "a")
    backup = start_backup(c, "b", primary, *mapping)
    primary.process.wait_for_output("listening")
    wait_protected(primary, 1)
    stale = KvClient(c.service_port)
    assert stale.call("INCR", "stale") == 1
    load = Load(other_port, clients=2)
    primary.process.signal(signal.SIGSTOP)
    try:
        assert stale.sock is not None
        stale.sock.sendall(b"*2\r\n$4\r\nINCR\r\n$5\r\nstale\r\n")  # waits in the kernel
        wait_role(backup, "live")
        load.start()
        joiner = start_backup(c, "c", backup, *mapping)
        wait_protected(backup, 2)
        wait_writes(load)
        assert joiner.status()["generation"] == 2
    finally:
        primary.process.signal(signal.SIGCONT)
    assert primary.process.wait(timeout=20) == EXIT_HALTED
    stale.sock.settimeout(10)
    try:
        leftover = stale.sock.recv(4096)
    except ConnectionResetError:
        leftover = b""
    assert leftover == b"", f"the old primary answered after generation 2 formed: {leftover!r}"
    assert [e for e in events(primary, "role_changed") if e.get("to") == "halted"]
    wait_writes(load)
    load.stop()
    load.verify(other_port)
    assert backup.protected(2)


def test_a_second_joiner_is_refused_with_the_name_of_the_attached_one(cluster) -> None:
    c = cluster
    primary, backup = form_pair(c)
    kill(primary)
    wait_role(backup, "live")
    first = start_backup(c, "c", backup)
    wait_protected(backup, 2)
    attached = backup.status()["peer"]["address"]
    second = start_backup(c, "d", backup)
    assert second.process.wait(timeout=20) == EXIT_HALTED
    assert f"a backup is already attached to this replica: {attached}" in second.process.stderr()
    assert backup.protected(2) and first.status()["protected"] is True
    # What /status says, ftproxy status and /metrics say too.
    shown = subprocess.run(
        [*FTPROXY, "status", f"127.0.0.1:{backup.admin}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert shown.returncode == 0, shown.stderr
    assert "generation 2" in shown.stdout and "yes: a backup holds the whole log" in shown.stdout
    assert "protected" in shown.stdout and "catch-up" in shown.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{backup.admin}/metrics", timeout=5) as reply:
        metrics = reply.read().decode()
    sampled = metric_samples(metrics)
    assert sampled["ftproxy_protected"] == 1 and sampled["ftproxy_generation"] == 2
    assert sampled['ftproxy_catch_up_state{state="protected"}'] == 1
    assert sampled["ftproxy_catch_up_entries_sent"] > 0


def test_a_second_backup_of_a_primary_is_refused_with_the_name_of_the_first(cluster) -> None:
    c = cluster
    primary, _ = form_pair(c)
    attached = primary.status()["peer"]["address"]
    second = start_backup(c, "c", primary)
    assert second.process.wait(timeout=20) == EXIT_HALTED
    assert f"a backup is already attached to this replica: {attached}" in second.process.stderr()
    assert primary.protected(1)


def test_a_joiner_that_stalls_mid_catch_up_is_dropped_and_the_next_one_taken(cluster) -> None:
    c = cluster
    load = Load(c.service_port, clients=4)
    primary, live = form_pair(c)
    load.start()
    try:
        wait_until(lambda: load.acknowledged() > 1500, 60, "a history of writes")
        kill(primary)
        wait_role(live, "live")
        stalled = start_backup(c, "c", live)
        wait_until(lambda: catching_up(live), 30, "the joiner is catching up")
        stalled.process.signal(signal.SIGSTOP)
        wait_until(
            lambda: live.status()["catch_up"]["state"] == "dropped", 10, "the joiner is dropped"
        )
        (dropped,) = events(live, "backup_dropped")
        assert "no word from the backup" in dropped["reason"]
        wait_writes(load)  # the live replica served alone all along
        nxt = start_backup(c, "d", live)
        wait_protected(live, 2)
        assert nxt.status()["protected"] is True
        stalled.process.signal(signal.SIGCONT)
        assert stalled.process.wait(timeout=20) == EXIT_HALTED
        # Thawed, the joiner learns from the live replica why it was let go.
        (told,) = events(stalled, "primary_lost")
        assert "let this backup go: no word from the backup" in told["reason"], told
        wait_writes(load)
    finally:
        load.stop()
    load.verify(c.service_port)


def test_a_data_dir_of_another_pair_is_refused(cluster) -> None:
    c = cluster
    data = c.tmp / "data-a"
    data.mkdir()
    (data / "pair").write_text("payments\n")
    primary = start_primary(c, "a")
    assert primary.process.wait(timeout=20) == 2
    (refused,) = events(primary, "data_dir_refused")
    assert "holds the log of pair 'payments', not 'ftproxy'" in refused["reason"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_reported_and_the_replica_keeps_serving_unprotected(cluster) -> None:
    c = cluster
    data = c.tmp / "data-a"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(data)], check=True)
    try:
        primary, backup = form_pair(c)
        load = Load(c.service_port, clients=2).start()
        try:
            wait_until(lambda: primary.status()["log_store"]["error"], 60, "the disk fills up")
            now = primary.status()
            assert "the disk is full" in now["log_store"]["error"]
            assert now["protected"] is False and now["role"] == "primary"
            wait_writes(load)
            # Alone now, it keeps serving, and takes no backup it could not stand behind.
            kill(backup)
            wait_role(primary, "live")
            wait_writes(load)
            joiner = start_backup(c, "c", primary)
            assert joiner.process.wait(timeout=20) == EXIT_HALTED
            assert "cannot stream its log" in joiner.process.stderr()
            wait_writes(load)
        finally:
            load.stop()
        load.verify(c.service_port)
        assert events(primary, "log_write_failed")
    finally:
        c.stop()
        subprocess.run(["umount", str(data)], check=True)


def start_node(c: Cluster, name: str, log_port: int, admin: int, run: int, *extra: str) -> Node:
    """``ftproxy run`` as an operator puts it under systemd: the same command every time."""
    process = c.replica(
        f"{name}-{run}",
        "run",
        "--pair",
        "kv",
        "--log-listen",
        f"127.0.0.1:{log_port}",
        *extra,
        admin=admin,
        data=name,
    )
    return Node(name, log_port, admin, process)


@pytest.mark.timeout(LONG_TIMEOUT_S)
def test_run_nodes_restarted_in_a_loop_heal_the_pair_each_time(cluster) -> None:
    c = cluster
    ports = {name: (free_port(), free_port()) for name in ("x", "y")}
    # Both started at once: the arbiter lets exactly one boot the service.
    nodes = {name: start_node(c, name, *ports[name], run=0) for name in ports}

    def by_role() -> tuple[Node, Node]:
        first, second = nodes.values()
        return (first, second) if first.status()["role"] == "primary" else (second, first)

    def wait_healed(generation: int) -> None:
        wait_until(
            lambda: any(n.protected(generation) for n in nodes.values()),
            60,
            f"the nodes form a pair of generation {generation}",
        )

    wait_healed(1)
    booted = [e for n in nodes.values() for e in events(n, "node_booting")]
    assert len(booted) == 1
    load = Load(c.service_port, clients=2).start()
    try:
        wait_writes(load)
        for run, generation in ((1, 2), (2, 3), (3, 4)):
            primary, backup = by_role()
            kill(primary)
            wait_role(backup, "live")
            wait_writes(load)
            # systemd's Restart=always: the same command again.
            nodes[primary.name] = start_node(c, primary.name, *ports[primary.name], run=run)
            wait_healed(generation)
            assert backup.status()["role"] == "primary"
        # The backup's side killed and restarted: the primary goes on alone, then heals.
        primary, backup = by_role()
        kill(backup)
        wait_role(primary, "live")
        wait_writes(load)
        nodes[backup.name] = start_node(c, backup.name, *ports[backup.name], run=4)
        wait_healed(5)
        assert primary.status()["role"] == "primary"
        wait_writes(load)
    finally:
        load.stop()
    load.verify(c.service_port)


def test_a_joiner_running_another_program_is_refused_and_the_next_one_taken(cluster) -> None:
    c = cluster
    primary, backup = form_pair(c)
    kill(primary)
    wait_role(backup, "live")
    other = c.replica(
        "other",
        "backup",
        "--primary",
        f"127.0.0.1:{backup.log_port}",
        admin=free_port(),
        guest=(str(ROOT / "examples" / "echo.py"),),
    )
    assert other.wait(timeout=20) == EXIT_HALTED
    assert "both must run the same guest command line" in other.stderr()
    (refused,) = events(backup, "backup_refused")
    assert "both must run the same guest command line" in refused["reason"]
    start_backup(c, "c", backup)
    wait_protected(backup, 2)


def test_a_joiner_that_diverges_is_let_go_and_the_live_replica_serves_on(tmp_path: Path) -> None:
    port = free_port()
    c = Cluster(tmp_path, service_port=port)
    c.start_arbiter()
    facts = (str(GUESTS / "host_facts.py"), str(port))

    def ask() -> bytes:
        with connect(port) as sock:
            sock.sendall(b"?")
            return recv_until(sock, b"\n")

    try:
        (a_log, a_admin), (b_log, b_admin) = (free_port(), free_port()), (free_port(), free_port())
        a = c.replica(
            "a", "primary", "--log-listen", f"127.0.0.1:{a_log}", admin=a_admin, guest=facts
        )
        b = c.replica(
            "b", "backup", "--primary", f"127.0.0.1:{a_log}",
            "--log-listen", f"127.0.0.1:{b_log}", admin=b_admin, guest=facts,
        )  # fmt: skip
        primary, live = Node("a", a_log, a_admin, a), Node("b", b_log, b_admin, b)
        wait_until(lambda: primary.protected(1), 20, "the first pair is protected")
        kill(primary)  # before any request: the backup has replayed nothing that differs
        # Its guest binds the service port live (the primary's had not yet, or the
        # front takes it over): either way b logs it once it is listening.
        wait_until(
            lambda: events(live, "listening") or events(live, "address_taken_over"),
            20,
            "b serves the address",
        )
        # Two replies from the live replica alone: the second request's entry carries the
        # digest of the first reply (the host's pid), which a joiner's replay cannot match.
        assert ask().startswith(b"host facts") and ask().startswith(b"host facts")
        joiner = c.replica(
            "c", "backup", "--primary", f"127.0.0.1:{live.log_port}", admin=free_port(),
            guest=facts,
        )  # fmt: skip
        assert joiner.wait(timeout=30) == 1  # EXIT_DIVERGED
        assert any(e.get("event") == "replay_diverged" for e in joiner.events())
        # Caught up (all but the slack replayed), it was protected before its replay reached
        # the entry that differs: the live replica's primary of generation 2 loses its
        # backup, told why, and goes on alone through the arbiter.
        wait_until(lambda: live.status()["catch_up"]["state"] == "lost", 10, "the joiner is lost")
        wait_role(live, "live")
        (told,) = events(live, "backup_diverged")
        assert told["generation"] == 2 and told["seq"] > 0 and told["report"]
        (lost,) = events(live, "backup_lost")
        assert "the backup diverged at log entry" in lost["reason"]
        now = live.status()
        assert now["divergences_total"] == 1 and now["protected"] is False
        assert ask().startswith(b"host facts")  # it served alone all along
    finally:
        c.stop()
