"""The failover series: kill the primary (or Raft leader) under a write load.

Each trial starts a fresh cluster, runs a few closed-loop writers (INCR on a
counter per writer, SET of a fresh key), kills the primary at a random moment
and waits until writes are acknowledged again. Figures per trial:

- failover time: from the last reply to a request sent before the kill to the
  first reply to a request sent after it (the old primary can only have
  answered the first kind, the new one only the second);
- lost acknowledged writes: every acknowledged SET must read back its value
  and every counter must be at least its last acknowledged INCR (each missing
  increment counts as one lost write), read from the new primary.
"""

from __future__ import annotations

import random
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench import alternatives
from bench.clients import reply_gap, start_clients, stop_clients
from bench.procs import Proc, wait_until
from bench.resp import Connection, ReplyError
from bench.services import Arbiter, EtcdArbiter, admin_status, start_pair
from ftproxy.tools import etcdlocal

WRITERS = 4
ACKS_BEFORE_KILL = 50
ACKS_AFTER_KILL = 20
RECOVERY_TIMEOUT_S = 30.0
RECONNECT_PAUSE_S = 0.005
SILENT_CLIENT_TIMEOUT_S = 0.2
# A SIGKILL closes the dead primary's log channel at once: every kill so far took
# 0.006-0.03 s, one of ~260 took 0.63 s (2026-12-07) and its logs were gone with
# the run's scratch. A kill slower than this keeps its pair's logs.
SLOW_KILL_S = 0.1


@dataclass
class WriteLoad:
    """Closed-loop writers; every acknowledged write and its timing is recorded."""

    connect: Callable[[], Connection]
    incr: bool = True  # pyraft has no INCR: SETs only
    writers: int = WRITERS
    acked_incr: dict[str, int] = field(default_factory=dict)
    acked_set: dict[str, str] = field(default_factory=dict)
    timings: list[tuple[float, float]] = field(default_factory=list)  # (sent, replied)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> WriteLoad:
        self._threads += start_clients(self.writers, self._write)
        return self

    def stop(self) -> None:
        stop_clients(self._stop, self._threads)

    def acknowledged(self) -> int:
        with self._lock:
            return len(self.timings)

    def acknowledged_since(self, moment: float) -> int:
        with self._lock:
            return sum(1 for sent, _ in self.timings if sent > moment)

    def _write(self, index: int) -> None:
        conn: Connection | None = None
        counter = f"ctr:{index}"
        n = 0
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self.connect()
                n += 1
                if self.incr:
                    sent = time.monotonic()
                    value = conn.call("INCR", counter)
                    replied = time.monotonic()
                    with self._lock:
                        assert isinstance(value, int)
                        self.acked_incr[counter] = value
                        self.timings.append((sent, replied))
                key = f"key:{index}:{n}"
                sent = time.monotonic()
                if conn.call("SET", key, str(n)) == "OK":
                    replied = time.monotonic()
                    with self._lock:
                        self.acked_set[key] = str(n)
                        self.timings.append((sent, replied))
            except (OSError, ReplyError):
                with self._lock:
                    self.errors += 1
                if conn is not None:
                    conn.close()
                    conn = None
                time.sleep(RECONNECT_PAUSE_S)
        if conn is not None:
            conn.close()

    def failover_s(self, killed_at: float) -> float | None:
        """Last reply to a request sent before the kill -> first reply to one sent after."""
        with self._lock:
            return reply_gap(self.timings, killed_at)

    def lost(self, conn: Connection) -> int:
        """Acknowledged writes the service no longer has."""
        lost = 0
        for counter, acked in self.acked_incr.items():
            found = _text(conn.call("GET", counter))
            lost += max(0, acked - int(found or 0))
        for key, acked_value in self.acked_set.items():
            if _text(conn.call("GET", key)) != acked_value:
                lost += 1
        return lost


def _text(reply: object) -> str | None:
    """A GET reply as text (pyraft answers with status strings, others with bulk)."""
    if reply is None:
        return None
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _connect_port(port: int, timeout: float = 2.0) -> Connection:
    return Connection(port, timeout=timeout)


def _connect_takeover_first(takeover: int, primary: int) -> Connection:
    """The backup's own address once it is live (refused before), else the primary's.

    A stopped primary still completes TCP handshakes and then never answers: a
    short timeout moves writers on, and bounds what it adds to the failover time.
    """
    try:
        return Connection(takeover, timeout=SILENT_CLIENT_TIMEOUT_S)
    except ConnectionRefusedError:
        return Connection(primary, timeout=SILENT_CLIENT_TIMEOUT_S)


def _connect_leader(cluster: alternatives.Cluster) -> Connection:
    """A connection to the current leader among the nodes still alive."""
    live = [p for p in cluster.ports if cluster.node_for(p).alive()]
    return Connection(alternatives.find_leader(live, timeout=2.0), timeout=2.0)


def _trial(
    load: WriteLoad,
    fail: Callable[[], None],
    rng: random.Random,
    verify_port: Callable[[], int],
) -> dict[str, Any]:
    """Run the load, ``fail()`` the primary, wait for writes to resume, verify."""
    load.start()
    try:
        wait_until(lambda: load.acknowledged() >= ACKS_BEFORE_KILL, 30, "writes are acknowledged")
        time.sleep(rng.uniform(0.2, 0.6))  # a random point of the execution, not a sync
        killed_at = time.monotonic()
        fail()
        wait_until(
            lambda: load.acknowledged_since(killed_at) >= ACKS_AFTER_KILL,
            RECOVERY_TIMEOUT_S,
            "writes are acknowledged again after the kill",
        )
    finally:
        load.stop()
    with Connection(verify_port(), timeout=5.0) as conn:
        lost = load.lost(conn)
    return {
        "failover_s": load.failover_s(killed_at),
        "acknowledged_writes": load.acknowledged(),
        "lost_acknowledged_writes": lost,
        "client_errors": load.errors,
    }


def ftproxy_series(
    name: str,
    scratch: Path,
    arbiter: Arbiter | EtcdArbiter,
    *,
    output_rule: bool,
    trials: int,
    seed: int,
    silent: bool = False,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
    keep_slow: Path | None = None,
    slow_s: float = SLOW_KILL_S,
) -> dict[str, Any]:
    """``trials`` failures of ftproxy's primary, each on a fresh pair (default timings).

    SIGKILL by default: the kernel closes the dead primary's log channel, so the
    backup learns of it at once. ``silent``: SIGSTOP instead, with the backup on
    an address of its own; nothing closes, and only the heartbeat timeout
    (``--peer-timeout-ms``, 500) tells the backup. With ``keep_slow``, a kill whose
    gap in service passed ``slow_s`` (or that failed) keeps the logs of its pair
    and of the arbiter there, and its result says where (``logs``).
    """
    rng = random.Random(seed)
    results = []
    for index in range(trials):
        service = start_pair(name, scratch, arbiter, output_rule=output_rule, two_addresses=silent)
        try:
            service.ready()
            primary = service.primary[0]
            assert service.takeover_port is not None
            if silent:
                connect = partial(_connect_takeover_first, service.takeover_port, service.port)
                fail = primary.pause
            else:
                connect = partial(_connect_port, service.port)
                fail = primary.kill
            load = WriteLoad(connect)
            result = _trial(load, fail, rng, lambda s=service.takeover_port: s)
            assert service.backup_admin_port is not None
            result["role_after"] = admin_status(service.backup_admin_port)["role"]
        except (TimeoutError, RuntimeError, OSError, ReplyError) as exc:
            result = {"failover_s": None, "lost_acknowledged_writes": None, "error": str(exc)}
        finally:
            service.stop()
        result["trial"] = index + 1
        if keep_slow is not None and not silent and _slow(result, slow_s):
            kept = keep_slow / f"{name}-trial{index + 1}"
            arbiter_proc = arbiter.proc if isinstance(arbiter, Arbiter) else None
            _keep_logs(kept, [*service.procs, arbiter_proc])
            result["logs"] = str(kept)
        results.append(result)
        if progress is not None:
            progress(name, result)
    return summarize(results)


def _slow(result: dict[str, Any], slow_s: float) -> bool:
    failover_s = result.get("failover_s")
    return failover_s is None or failover_s > slow_s


def _keep_logs(where: Path, procs: list[Proc | None]) -> None:
    """Copy each process's stdout and stderr files (as they are now) into ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    for proc in procs:
        if proc is None:
            continue
        for path in (proc.stdout_path, proc.stderr_path):
            if path.exists():
                shutil.copy2(path, where / path.name)


ETCD_MEMBERS = 3


def etcd_series(
    name: str,
    scratch: Path,
    *,
    trials: int,
    seed: int,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
    keep_slow: Path | None = None,
) -> dict[str, Any]:
    """The SIGKILL series with the output rule, decided by a 3-member etcd cluster.

    One cluster for the whole series (each pair its own generation key), as one
    built-in arbiter serves the other series: the figures differ by the arbiter only.
    """
    if trials == 0:
        return {**summarize([]), "reason": "not measured in this mode"}
    try:
        cluster = etcdlocal.start_cluster(scratch / "etcd", ETCD_MEMBERS)
    except (etcdlocal.EtcdMissing, etcdlocal.EtcdFailed) as exc:
        return {**summarize([]), "reason": str(exc)}
    try:
        return ftproxy_series(
            name,
            scratch,
            EtcdArbiter(cluster),
            output_rule=True,
            trials=trials,
            seed=seed,
            progress=progress,
            keep_slow=keep_slow,
        )
    finally:
        cluster.stop()


def alternative_series(
    alternative: alternatives.Alternative,
    installed: Path,
    scratch: Path,
    *,
    trials: int,
    seed: int,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """``trials`` SIGKILLs of an alternative's Raft leader; writers follow the leader."""
    rng = random.Random(seed)
    results = []
    for index in range(trials):
        cluster = alternatives.start(alternative, installed, scratch, tag=f"-failover{index + 1}")
        try:
            cluster.ready()
            leader = alternatives.find_leader(cluster.ports)
            survivors = [p for p in cluster.ports if p != leader]

            load = WriteLoad(partial(_connect_leader, cluster), incr=alternative.incr)
            result = _trial(
                load,
                cluster.node_for(leader).kill,
                rng,
                lambda s=survivors: alternatives.find_leader(s),
            )
        except (TimeoutError, RuntimeError, OSError, ReplyError) as exc:
            result = {"failover_s": None, "lost_acknowledged_writes": None, "error": str(exc)}
        finally:
            cluster.stop()
        result["trial"] = index + 1
        results.append(result)
        if progress is not None:
            progress(alternative.name, result)
    return summarize(results)


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The distribution of failover times and the lost-write count over trials."""
    times = sorted(t["failover_s"] for t in trials if t.get("failover_s") is not None)
    lost = [t["lost_acknowledged_writes"] for t in trials if t.get("lost_acknowledged_writes")]
    return {
        "trials": trials,
        "completed": len(times),
        "failed": sum(1 for t in trials if t.get("failover_s") is None),
        "failover_s": {
            "p50": statistics.median(times) if times else None,
            "p90": _nearest_rank(times, 0.9),
            "min": times[0] if times else None,
            "max": times[-1] if times else None,
            "mean": statistics.fmean(times) if times else None,
        },
        "lost_acknowledged_writes": sum(lost),
        "runs_with_loss": len(lost),
    }


def _nearest_rank(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]
