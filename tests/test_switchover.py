"""Planned switchover with real processes: ``ftproxy switchover``, SIGUSR1 and
``--on-sigterm leave`` hand the service from the primary to its backup with no
acknowledged write lost, from a first pair and from a re-protected one (a live
replica that took a new backup, as every ``ftproxy run`` pair is); a switchover
that cannot happen changes nothing. (Packet mode: tests/test_packet_failover.py.)
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster, KvClient, Load, Process, status, wait_until
from support import FTPROXY, free_port

EXIT_REFUSED = 6
EXIT_UNAUTHENTICATED = 8
BACKUP_LOG = f"127.0.0.1:{free_port()}"
SECRET = "c3dpdGNob3ZlciB0ZXN0IHNlY3JldCwgbG9uZyBlbm91Z2g=\n"


@pytest.fixture
def cluster(tmp_path: Path):
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    # The backup takes the next backup here once live (re-protection).
    c = Cluster(tmp_path, secret_file=secret, backup_args=("--log-listen", BACKUP_LOG))
    c.start_arbiter()
    yield c
    c.stop()


def switchover(
    c: Cluster, *security: str, admin: int | None = None
) -> subprocess.CompletedProcess[str]:
    admin = admin or c.primary_admin
    return subprocess.run(
        [*FTPROXY, "switchover", f"127.0.0.1:{admin}", *(security or c.security())],
        capture_output=True,
        text=True,
        timeout=60,
    )


def protected_pair(c: Cluster, *primary_args: str) -> None:
    c.primary_args = primary_args
    c.start_replicas()
    wait_until(lambda: status(c.primary_admin)["protected"] is True, 20, "the pair is protected")


def handed_over(c: Cluster) -> None:
    """The old primary exited 0 having handed over; the backup serves, having switched."""
    retired_and_took_over(c.primary, c.backup, c.backup_admin)


def retired_and_took_over(old: Process, new: Process, new_admin: int) -> None:
    """``old`` exited 0 having handed over; ``new`` serves, having switched (no failover)."""
    assert old.wait(30) == 0, old.stderr()
    names = [e.get("event") for e in old.events()]
    assert "handover_sent" in names and "replica_retired" in names
    wait_until(lambda: status(new_admin)["role"] == "live", 20, f"{new.name} is live")

    def changes() -> list[dict]:
        return [e for e in new.events() if e.get("event") == "role_changed"]

    # /status says live once the arbiter said so; the line once the address is bound.
    wait_until(lambda: changes()[-1]["to"] == "live", 20, f"{new.name} says it is live")
    assert changes()[-1].get("switchover") is True
    assert status(new_admin)["failovers_total"] == 0


def join_as_backup(c: Cluster, name: str, of: str, admin: int) -> tuple[Process, str]:
    """A fresh backup of the replica whose log address is ``of``, taking backups of its
    own (once live) at a new log address, which is returned with it."""
    log_listen = f"127.0.0.1:{free_port()}"
    command = c.replica_command("backup", "--log-listen", log_listen)
    command[command.index("--primary") + 1] = of
    command[command.index("--admin") + 1] = f"127.0.0.1:{admin}"
    c.processes[name] = Process(name, command, c.tmp)
    return c.processes[name], log_listen


def protected_under(admin: int, generation: int, timeout: float = 60) -> None:
    wait_until(
        lambda: status(admin)["protected"] is True and status(admin)["generation"] == generation,
        timeout,
        f"protected again under generation {generation}",
    )


def test_switchover_under_load_loses_no_acknowledged_write_and_the_pair_heals(
    cluster: Cluster,
) -> None:
    protected_pair(cluster)
    load = Load(cluster.service_port, clients=4).start()
    wait_until(lambda: load.acknowledged() > 200, 30, "writes acknowledged before")
    result = switchover(cluster)
    assert result.returncode == 0, result.stderr + cluster.primary.stderr()
    assert "switched over" in result.stdout
    handed_over(cluster)
    before = load.acknowledged()
    wait_until(lambda: load.acknowledged() > before + 200, 30, "writes acknowledged after")
    load.stop()
    load.verify(cluster.service_port)
    # The new primary takes a fresh backup and is protected again, under generation 2.
    fresh_admin = free_port()
    fresh, fresh_log = join_as_backup(cluster, "fresh", BACKUP_LOG, fresh_admin)
    protected_under(cluster.backup_admin, 2)
    assert KvClient(cluster.service_port).call("GET", "ctr:0").isdigit()
    # A re-protected primary (the backup that went live) hands over too, under load.
    load = Load(cluster.service_port, clients=4).start()
    try:
        wait_until(lambda: load.acknowledged() > 200, 30, "writes acknowledged before")
        again = switchover(cluster, admin=cluster.backup_admin)
        assert again.returncode == 0, again.stderr + cluster.backup.stderr()
        assert "switched over" in again.stdout
        retired_and_took_over(cluster.backup, fresh, fresh_admin)
        assert status(fresh_admin)["generation"] == 2  # it won generation 2's key
        before = load.acknowledged()
        wait_until(lambda: load.acknowledged() > before + 200, 30, "writes acknowledged after")
        # And the replica switched to is protected again in turn, under generation 3.
        third, _ = join_as_backup(cluster, "third", fresh_log, free_port())
        protected_under(fresh_admin, 3, timeout=120)
    finally:
        load.stop()
    load.verify(cluster.service_port)
    assert third.popen.poll() is None


@pytest.mark.parametrize("how", ["sigusr1", "sigterm-leave"])
def test_a_signal_hands_over_too(cluster: Cluster, how: str) -> None:
    args = ("--on-sigterm", "leave") if how == "sigterm-leave" else ()
    protected_pair(cluster, *args)
    client = KvClient(cluster.service_port)
    assert client.call("SET", "before", "1") == "OK"
    cluster.primary.signal(signal.SIGUSR1 if how == "sigusr1" else signal.SIGTERM)
    handed_over(cluster)
    client = KvClient(cluster.service_port)
    assert client.call("GET", "before") == b"1"
    assert client.call("SET", "after", "2") == "OK"


def test_sigterm_by_default_stops_the_service_on_both(cluster: Cluster) -> None:
    protected_pair(cluster)
    cluster.primary.signal(signal.SIGTERM)
    assert cluster.primary.wait(30) == 0
    assert cluster.backup.wait(30) == 0
    names = [e.get("event") for e in cluster.backup.events()]
    assert "handover_received" not in names


def test_a_switchover_without_a_backup_is_refused_and_changes_nothing(cluster: Cluster) -> None:
    cluster.start_primary()
    wait_until(
        lambda: status(cluster.primary_admin)["role"] == "waiting_for_backup", 20, "admin up"
    )
    result = switchover(cluster)
    assert result.returncode == EXIT_REFUSED, result.stderr
    assert "no backup has joined" in result.stderr
    assert cluster.primary.popen.poll() is None


def test_a_wrong_secret_is_refused_and_changes_nothing(cluster: Cluster, tmp_path: Path) -> None:
    protected_pair(cluster)
    other = tmp_path / "other"
    other.write_text("YW5vdGhlciBzZWNyZXQsIGp1c3QgYXMgbG9uZyBhcyB0aGF0\n")
    result = switchover(cluster, "--secret-file", str(other))
    assert result.returncode == EXIT_UNAUTHENTICATED, result.stderr
    result = switchover(cluster, "--insecure")
    assert result.returncode == EXIT_UNAUTHENTICATED, result.stderr
    assert status(cluster.primary_admin)["role"] == "primary"
    assert status(cluster.primary_admin)["protected"] is True


# -- real third-party servers across a switchover (socket mode) -----------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["http.server", "aiohttp"])
def test_a_real_server_switches_over_with_idle_mid_request_and_mid_response_clients(
    name: str, tmp_path: Path
) -> None:
    """The programs of test_real_programs across ``ftproxy switchover`` instead of a kill:
    old connections end (socket mode), each reply is its request's, no acknowledged
    write is lost, a half request is not applied, new clients are served."""
    from test_real_programs import BIG_KEY, BIG_VALUE, Held, _tail, assert_nothing_lost

    from bench.programs import PROGRAMS, client, wait_serving
    from bench.programs import Load as ProgramLoad

    matches = [p for p in PROGRAMS if name in p.name]
    if not matches:
        pytest.fail(f"no program named like {name!r} in bench/programs.py")
    program = matches[0]
    port = free_port()
    c = Cluster(tmp_path, service_port=port, guest=tuple(program.argv(port)))
    c.start_arbiter()
    try:
        c.start_replicas(ready=None)
        wait_serving(program, port)
        wait_until(lambda: status(c.primary_admin)["protected"] is True, 20, "protected")
        client(program, port, timeout=60).put(BIG_KEY, BIG_VALUE)
        before = ProgramLoad(program, port, clients=4, tag="before").start()
        wait_until(lambda: before.acknowledged() >= 30, 30, "the writers are under way")
        held = Held(program, port).open()
        result = switchover(c)
        try:
            assert result.returncode == 0, result.stderr
            handed_over(c)
            held.check_ended()
            acked = before.acknowledged()
            wait_until(lambda: before.acknowledged() >= acked + 30, 30, "writes go on after")
            after = ProgramLoad(program, port, clients=8, tag="after").start(steps=10)
            after.join(60)
            before.stop()
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{_tail(c)}") from None
        assert_nothing_lost(program, port, before, after)
    finally:
        c.stop()


def test_the_command_says_what_is_wrong_with_its_arguments_or_the_address() -> None:
    from ftproxy.cli import main

    assert main(["switchover", "nonsense", "--insecure"]) == 2
    assert main(["switchover", "127.0.0.1:7201"]) == 2  # no secret, no --insecure
    assert main(["switchover", f"127.0.0.1:{free_port()}", "--insecure"]) == 9  # unreachable


def test_a_backup_that_stalls_during_the_switchover_leaves_the_primary_serving(
    cluster: Cluster,
) -> None:
    """SIGSTOP the backup, then ask: the primary, having released nothing since it held
    its guest, loses the backup, wins the arbiter and serves on; nothing acknowledged is
    lost, and the command says the switchover was not done."""
    # The request must reach the primary before the primary notices the stalled
    # backup by itself (the command's start takes about a second here), and the
    # loss must come before the 5 s drain limit would refuse the switchover.
    protected_pair(cluster, "--peer-timeout-ms", "4000")
    load = Load(cluster.service_port, clients=2).start()
    wait_until(lambda: load.acknowledged() > 100, 30, "writes acknowledged before")
    cluster.backup.signal(signal.SIGSTOP)
    try:
        result = switchover(cluster)
        assert result.returncode == 7, result.stderr + cluster.primary.stderr()
        assert "the backup was lost during the switchover" in result.stderr
        assert status(cluster.primary_admin)["role"] == "live"
        before = load.acknowledged()
        wait_until(lambda: load.acknowledged() > before + 100, 30, "the primary serves on")
    finally:
        cluster.backup.signal(signal.SIGKILL)
    load.stop()
    load.verify(cluster.service_port)
    names = [e.get("event") for e in cluster.primary.events()]
    assert "switchover_started" in names and "handover_sent" not in names


# -- ftproxy run nodes: every pair there is a re-protected one -------------------------


class RunNodes:
    """Two ``ftproxy run`` nodes of one pair, each started by the same command every time."""

    def __init__(self, c: Cluster, *extra: str) -> None:
        from test_reprotect import Node, start_node

        self.c, self.extra = c, extra
        self.ports = {name: (free_port(), free_port()) for name in ("x", "y")}
        self.runs = dict.fromkeys(self.ports, 0)
        self._start_node = start_node
        self.nodes: dict[str, Node] = {}
        for name in self.ports:  # both at once: the arbiter lets exactly one boot
            self.start(name)

    def start(self, name: str) -> None:
        log_port, admin = self.ports[name]
        self.nodes[name] = self._start_node(
            self.c, name, log_port, admin, self.runs[name], *self.extra
        )
        self.runs[name] += 1

    def by_role(self) -> tuple[Any, Any]:
        """(the serving node, the other)."""
        first, second = self.nodes.values()
        return (first, second) if first.status()["role"] == "primary" else (second, first)

    def healed(self, generation: int) -> tuple[Any, Any]:
        wait_until(
            lambda: any(n.protected(generation) for n in self.nodes.values()),
            90,
            f"the nodes form a pair of generation {generation}",
        )
        return self.by_role()


@pytest.mark.timeout(300)
def test_run_nodes_switch_over_by_command_and_by_sigterm_and_the_retired_node_rejoins(
    tmp_path: Path,
) -> None:
    """Two ``ftproxy run`` nodes of one pair, under load: ``ftproxy switchover`` to the
    primary node hands over (the node that booted the service), the other serves, and
    the retired node's command started again rejoins as its backup; then SIGTERM with
    --on-sigterm leave (systemctl stop) hands over from that node (a backup gone live),
    and again the retired node rejoins. Every acknowledged write is found."""
    from test_real_programs import _tail

    c = Cluster(tmp_path)
    c.start_arbiter()
    load = Load(c.service_port, clients=4)
    try:
        pair = RunNodes(c, "--on-sigterm", "leave")
        primary, backup = pair.healed(1)
        load.start()
        wait_until(lambda: load.acknowledged() > 200, 30, "writes acknowledged before")
        result = switchover(c, "--insecure", admin=primary.admin)
        assert result.returncode == 0, result.stderr + primary.process.stderr()
        retired_and_took_over(primary.process, backup.process, backup.admin)
        floor = load.acknowledged()
        wait_until(lambda: load.acknowledged() > floor + 200, 30, "writes go on after")
        pair.start(primary.name)
        new_primary, new_backup = pair.healed(2)
        assert (new_primary.name, new_backup.name) == (backup.name, primary.name)
        # systemctl stop on the primary's host: SIGTERM, --on-sigterm leave.
        new_primary.process.signal(signal.SIGTERM)
        retired_and_took_over(new_primary.process, new_backup.process, new_backup.admin)
        floor = load.acknowledged()
        wait_until(lambda: load.acknowledged() > floor + 200, 30, "writes go on after")
        pair.start(new_primary.name)
        last_primary, _ = pair.healed(3)
        assert last_primary.name == new_backup.name
        load.stop()
        load.verify(c.service_port)
    except (AssertionError, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n{_tail(c)}") from None
    finally:
        load.stop()
        c.stop()


def test_a_run_node_whose_backup_stalls_during_the_switchover_serves_on(tmp_path: Path) -> None:
    """The re-protected primary's side of a stalled handover: the primary node, having
    released nothing since it held its guest, loses the backup node, wins the arbiter
    and serves on; nothing acknowledged is lost, and the command says it was not done."""
    c = Cluster(tmp_path)
    c.start_arbiter()
    load = Load(c.service_port, clients=2)
    try:
        # As in the first pair's test: patience longer than the command's start-up.
        pair = RunNodes(c, "--peer-timeout-ms", "3000")
        primary, backup = pair.healed(1)
        load.start()
        wait_until(lambda: load.acknowledged() > 100, 30, "writes acknowledged before")
        backup.process.signal(signal.SIGSTOP)
        result = switchover(c, "--insecure", admin=primary.admin)
        assert result.returncode == 7, result.stderr + primary.process.stderr()
        assert "the backup was lost during the switchover" in result.stderr
        assert primary.status()["role"] == "live"
        floor = load.acknowledged()
        wait_until(lambda: load.acknowledged() > floor + 100, 30, "the primary node serves on")
        backup.process.signal(signal.SIGKILL)
        load.stop()
        load.verify(c.service_port)
        names = [e.get("event") for e in primary.process.events()]
        assert "switchover_started" in names and "handover_sent" not in names
    finally:
        load.stop()
        c.stop()
