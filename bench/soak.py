"""``python -m bench soak``: one service through a long series of faults, its history checked.

A few clients load examples/kv.py under ftproxy (SET/GET on shared registers,
INCR/GET on shared counters, SETs of fresh keys) and record every operation:
when it was invoked, when its reply came, what the reply was. A client whose
connection breaks (or whose reply does not come within its timeout) records the
operation in flight as pending, reconnects, and goes on. Meanwhile faults hit
the service one after the other, a random kind each time: SIGKILL of the
primary, SIGSTOP of the primary (its host hangs: only the heartbeat timeout
tells), SIGKILL of the backup; with ``--kinds`` also a planned switchover
(SIGUSR1 to the primary: it hands over and must exit 0). After each one a
fresh backup joins the live replica (``ftproxy backup --primary <live's
--log-listen> --log-listen NEW --data-dir NEW``) and the soak waits until
``/status`` says ``protected`` again.

Then every key is read back, and the whole history goes through the
linearizability checker (``bench/linearizability.py``). Reported: faults
survived, acknowledged writes lost, linearizability violations, the client-seen
disruption of each fault (last reply to a request sent before it to first reply
to a request sent after it), re-protection time (fault to protected again), and
the rate at which a joining backup caught up.

Where the installed ftproxy cannot re-protect a pair (``ftproxy backup`` has no
``--log-listen``), ``--mode pair`` runs the same load, faults and check with one
fault per pair, a fresh pair each time (each pair's keys its own objects).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.clients import reply_gap, start_clients, stop_clients
from bench.linearizability import GET, INCR, SET, Operation, check
from bench.machine import stamp
from bench.procs import FTPROXY, HOST, KV, Proc, free_port, wait_until
from bench.resp import Connection, ReplyError
from bench.services import Arbiter, admin_status

RESULTS = Path(__file__).resolve().parent / "results"
# What may hit the service; the default is the three faults. "switchover" is the
# operator's planned handover (SIGUSR1 to the primary) under the same load.
KINDS = ("kill-primary", "stop-primary", "kill-backup", "switchover")
DEFAULT_KINDS = KINDS[:3]
SWITCHOVER_TIMEOUT_S = 20.0  # the primary's drain gives up after 5 s and says so
GUEST_PORT = 6380  # the port kv.py asks for inside the guest; every node maps it
CLIENT_TIMEOUT_S = 0.3  # a SIGSTOPped primary never answers: this bounds the wait
CONNECT_TIMEOUT_S = 0.2
RECONNECT_PAUSE_S = 0.01
REPLIES_AFTER_FAULT = 20
RECOVERY_TIMEOUT_S = 30.0  # default of --recovery-timeout
READ_BACK_TIMEOUT_S = 120.0
PROTECT_TIMEOUT_S = 120.0  # default of --protect-timeout
THAW_EXIT_TIMEOUT_S = 5.0


# --- the load ------------------------------------------------------------------------


@dataclass
class HistoryLoad:
    """Closed-loop clients on shared keys, recording every operation they invoke."""

    ports: Callable[[], list[int]]  # where to connect, the live replica first
    clients: int = 4
    registers: int = 8
    counters: int = 8
    suffix: str = ""  # the key namespace: one per service (pair mode: one per pair)
    seed: int = 0
    history: list[Operation] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> HistoryLoad:
        self._threads += start_clients(self.clients, self._run)
        return self

    def stop(self) -> None:
        stop_clients(self._stop, self._threads)

    def replies_since(self, moment: float) -> int:
        with self._lock:
            return sum(1 for op in self.history[-2000:] if op.invoked > moment and not op.pending)

    def disruption_s(self, moment: float) -> float | None:
        """Last reply to an operation invoked before ``moment`` -> first reply to one after."""
        with self._lock:
            return reply_gap(((o.invoked, o.completed) for o in self.history), moment)

    def longest_pause_s(self, start: float, end: float) -> float | None:
        """The longest stretch in [start, end] with no reply to any client."""
        with self._lock:
            done = sorted(o.completed for o in self.history if o.completed is not None)
        inside = [t for t in done if start <= t <= end]
        if not inside:
            return None
        before = [t for t in done if t < start]
        edges = [before[-1] if before else start, *inside, end]
        return max(b - a for a, b in itertools.pairwise(edges))

    def _connect(self) -> Connection | None:
        for port in self.ports():
            try:
                return Connection(port, timeout=CONNECT_TIMEOUT_S)
            except OSError:
                continue
        return None

    def _pick(self, rng: random.Random, client: int, n: int) -> tuple[str, str, str | None]:
        roll = rng.random()
        if roll < 0.30:
            return f"reg:{rng.randrange(self.registers)}{self.suffix}", SET, f"{client}-{n}"
        if roll < 0.50:
            return f"reg:{rng.randrange(self.registers)}{self.suffix}", GET, None
        if roll < 0.70:
            return f"ctr:{rng.randrange(self.counters)}{self.suffix}", INCR, None
        if roll < 0.85:
            return f"ctr:{rng.randrange(self.counters)}{self.suffix}", GET, None
        return f"w:{client}:{n}{self.suffix}", SET, f"{client}-{n}"

    def _run(self, client: int) -> None:
        rng = random.Random(self.seed * 1000 + client)
        conn: Connection | None = None
        n = 0
        while not self._stop.is_set():
            if conn is None:
                conn = self._connect()
                if conn is None:
                    time.sleep(RECONNECT_PAUSE_S)
                    continue
                conn.sock.settimeout(CLIENT_TIMEOUT_S)
            n += 1
            key, kind, value = self._pick(rng, client, n)
            args = [kind.upper(), key] + ([value] if value is not None else [])
            invoked = time.monotonic()
            try:
                reply = conn.call(*args)
            except (OSError, ReplyError):
                self._record(Operation(client, key, kind, value, invoked, None))
                with self._lock:
                    self.errors += 1
                conn.close()
                conn = None
                continue
            completed = time.monotonic()
            self._record(Operation(client, key, kind, value, invoked, completed, _result(reply)))
        if conn is not None:
            conn.close()

    def _record(self, op: Operation) -> None:
        with self._lock:
            self.history.append(op)

    def read_back(self, port: int) -> None:
        """GET every key the clients touched, after them all, into the history."""
        keys = sorted({op.key for op in self.history})
        with Connection(port, timeout=10.0) as conn:
            for key in keys:
                invoked = time.monotonic()
                reply = conn.call("GET", key)
                self._record(
                    Operation(-1, key, GET, None, invoked, time.monotonic(), _result(reply))
                )


def _result(reply: object) -> str | int | None:
    if isinstance(reply, bytes):
        return reply.decode()
    if isinstance(reply, int | str) or reply is None:
        return reply
    return str(reply)


def lost_acknowledged_writes(history: list[Operation]) -> int | None:
    """Acknowledged writes the final read-back no longer shows.

    A fresh key whose acknowledged SET reads back as something else is one;
    a counter read back below its highest acknowledged INCR misses the
    difference. (The linearizability check is the exact verdict; this counts.)
    """
    final = {op.key: op.result for op in history if op.client == -1}
    if not final and history:
        return None  # never read back: unknown
    lost = 0
    highest: dict[str, int] = {}
    for op in history:
        if op.pending or op.client == -1:
            continue
        if op.kind == SET and op.key.startswith("w:") and final.get(op.key) != op.value:
            lost += 1
        if op.kind == INCR and isinstance(op.result, int):
            highest[op.key] = max(highest.get(op.key, 0), op.result)
    for key, acked in highest.items():
        read = final.get(key)
        lost += max(0, acked - int(read or 0))
    return lost


# --- the replicas --------------------------------------------------------------------


@dataclass
class Node:
    """One ftproxy replica of the soak, with the addresses it was given."""

    name: str
    proc: Proc
    client_port: int  # where it serves the guest's port once primary or live
    admin_port: int
    log_port: int | None  # its --log-listen: where the next backup joins it
    data_dir: Path | None
    started: float = field(default_factory=time.monotonic)

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        return admin_status(self.admin_port, timeout=timeout)

    def serving(self) -> bool:
        """Whether it answers a PING on its client address."""
        with Connection(self.client_port, timeout=CLIENT_TIMEOUT_S) as conn:
            return conn.call("PING") == "PONG"


def can_reprotect() -> bool:
    """Whether this ftproxy re-protects a pair (issue 10): ``ftproxy backup`` takes
    ``--log-listen`` and ``--data-dir`` options."""
    done = subprocess.run(
        [*FTPROXY, "backup", "--help"], capture_output=True, text=True, check=False, cwd=KV.parent
    )
    options = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  -")}
    return {"--log-listen", "--data-dir"} <= options


@dataclass
class Fleet:
    """Every replica started in one soak, who is primary and who is backup now."""

    scratch: Path
    arbiter: Arbiter
    pair: str = "soak"
    reprotect: bool = True
    unsafe: bool = False  # --no-output-rule, to show what the check finds without the rule
    nodes: list[Node] = field(default_factory=list)
    primary: Node | None = None
    backup: Node | None = None
    _count: int = 0

    def _node(self, role: str, extra: list[str]) -> Node:
        self._count += 1
        name = f"{self.pair}-n{self._count}-{role}"
        client_port, admin_port = free_port(), free_port()
        log_port = free_port() if role == "primary" or self.reprotect else None
        data_dir = self.scratch / name if self.reprotect else None
        command = [
            *FTPROXY,
            role,
            *extra,
            "--arbiter",
            f"{HOST}:{self.arbiter.port}",
            "--insecure",
            "--admin",
            f"{HOST}:{admin_port}",
            "--map",
            f"{GUEST_PORT}={HOST}:{client_port}",
            *(["--log-listen", f"{HOST}:{log_port}"] if log_port is not None else []),
            *(["--data-dir", str(data_dir)] if data_dir is not None else []),
            "--",
            str(KV),
            "--port",
            str(GUEST_PORT),
        ]
        node = Node(
            name, Proc(name, command, self.scratch), client_port, admin_port, log_port, data_dir
        )
        self.nodes.append(node)
        return node

    def start_pair(self) -> None:
        """A primary and its first backup, both ready."""
        generation = [] if self.reprotect else ["--generation", str(self.arbiter.next_generation())]
        # Unsafe: every reply of the last 20 ms has its log still on the primary. The
        # lag bound goes out of the way: with the default (100 ms), a backup slow to
        # replay (a loaded machine) pauses the primary's input until all is shipped,
        # and a kill in such a pause would find nothing to lose.
        unsafe = (
            ["--no-output-rule", "--ship-delay-ms", "20", "--max-lag-ms", "10000"]
            if self.unsafe
            else []
        )
        self.primary = self._node("primary", ["--pair", self.pair, *generation, *unsafe])
        assert self.primary.log_port is not None
        self.backup = self._node("backup", ["--primary", f"{HOST}:{self.primary.log_port}"])
        self.primary.proc.wait_for_output("listening", 60)
        self.backup.proc.wait_for_output("listening", 60)

    def join_backup(self) -> Node:
        """A fresh backup for the live replica (re-protection)."""
        assert self.primary is not None and self.primary.log_port is not None
        self.backup = self._node("backup", ["--primary", f"{HOST}:{self.primary.log_port}"])
        return self.backup

    def client_ports(self) -> list[int]:
        """Where clients connect: the replica that is (or is about to be) live, as a
        virtual IP or a DNS name that follows the pair would send them."""
        return [] if self.primary is None else [self.primary.client_port]

    def stop(self) -> None:
        for node in self.nodes:
            node.proc.stop()


# --- faults --------------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    p99 = ordered[min(len(ordered) - 1, max(0, -(-99 * len(ordered) // 100) - 1))]
    return {"p50": statistics.median(ordered), "p99": p99, "max": ordered[-1], "n": len(ordered)}


def _wait_live(node: Node, timeout: float) -> None:
    """Until ``node`` serves clients on its own address."""
    wait_until(node.serving, timeout, f"{node.name} serves clients after the fault")


def _wait_protected(live: Node, joiner: Node, timeout: float) -> dict[str, Any]:
    """Until the live replica says it is protected again; its last status."""
    last: dict[str, Any] = {}
    let_go = len(_let_go(live))  # the joiner has only just started

    def protected() -> bool:
        nonlocal last
        if not joiner.proc.alive():
            raise RuntimeError(
                f"{joiner.name} exited with {joiner.proc.popen.returncode} while joining"
                f"{_why_dropped(live, let_go)}; its log ends with:\n{joiner.proc.stderr_tail()}"
            )
        last = live.status()
        return bool(last.get("protected"))

    wait_until(protected, timeout, f"{live.name} is protected again by {joiner.name}")
    return last


def _let_go(live: Node) -> list[dict[str, Any]]:
    """What the live replica logged each time it let a backup go."""
    return [e for e in live.proc.events() if e.get("event") in ("backup_dropped", "backup_lost")]


def _why_dropped(live: Node, before: int) -> str:
    """Why the live replica let its joiner go, if it said so (after its first ``before``)."""
    said = _let_go(live)[before:]
    if not said:
        return ""
    return f" ({live.name} logged {said[-1]['event']}: {said[-1].get('reason')})"


def inject(fleet: Fleet, load: HistoryLoad, kind: str, plan: SoakPlan) -> dict[str, Any]:
    """One fault, the wait for service and (re-protection) for protection again."""
    assert fleet.primary is not None and fleet.backup is not None
    primary, backup = fleet.primary, fleet.backup
    record: dict[str, Any] = {"kind": kind, "primary": primary.name, "backup": backup.name}
    before = primary.status() if fleet.reprotect else {}
    if fleet.reprotect:
        # A backup that holds the log may not have replayed all of it yet: going
        # live, it must first. How far behind it is now explains the disruption.
        replayed = backup.status().get("replayed_seq")
        if isinstance(replayed, int) and isinstance(before.get("log_seq"), int):
            record["backup_replay_behind"] = before["log_seq"] - replayed
    at = time.monotonic()
    if kind == "kill-primary":
        primary.proc.kill()
        live = backup
    elif kind == "stop-primary":
        primary.proc.pause()
        live = backup
    elif kind == "kill-backup":
        backup.proc.kill()
        live = primary
    elif kind == "switchover":
        _switch_over(primary)
        live = backup
    else:
        raise ValueError(f"unknown fault kind {kind!r}")
    fleet.primary, fleet.backup = live, None
    _wait_live(live, plan.recovery_timeout_s)
    wait_until(
        lambda: load.replies_since(at) >= REPLIES_AFTER_FAULT,
        plan.recovery_timeout_s,
        "replies after the fault",
    )
    record["failover_s"] = load.disruption_s(at)
    record["live"] = live.name
    if kind == "stop-primary":
        record["thawed_primary_exited"] = _thaw(primary)
    if not fleet.reprotect:
        return record
    joined = time.monotonic()
    joiner = fleet.join_backup()
    live_status = _wait_protected(live, joiner, plan.protect_timeout_s)
    protected = time.monotonic()
    record.update(
        reprotect_s=protected - at,
        catchup_s=protected - joined,
        generation_before=before.get("generation"),
        generation_after=live_status.get("generation"),
        log_seq=live_status.get("log_seq"),
        catch_up=live_status.get("catch_up"),
        longest_pause_during_catchup_s=load.longest_pause_s(joined, protected),
    )
    if plan.wait_replay:
        target = live_status.get("log_seq")
        if isinstance(target, int):
            wait_until(
                lambda: int(joiner.status().get("replayed_seq") or 0) >= target,
                plan.protect_timeout_s,
                f"{joiner.name} replays the log it holds",
            )
            replayed = time.monotonic()
            record["replay_caught_up_s"] = replayed - protected
            # The whole log since boot, replayed from the joiner's start.
            record["replay_entries_per_s"] = target / (replayed - joined)
    return record


def _switch_over(node: Node) -> None:
    """SIGUSR1: the primary hands the service to its backup and exits 0. RuntimeError
    if it says the switchover failed (with its reason) or exits otherwise."""
    node.proc.signal(signal.SIGUSR1)

    def handed_over() -> bool:
        for event in node.proc.events():
            if event.get("event") == "switchover_failed":
                raise RuntimeError(f"{node.name}: the switchover failed: {event.get('reason')}")
            if event.get("event") == "switchover_finished":
                return True
        return False

    node.proc.wait_for(handed_over, SWITCHOVER_TIMEOUT_S, "handing over")
    try:
        code = node.proc.wait(SWITCHOVER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{node.name} still runs after handing over") from None
    if code != 0:
        raise RuntimeError(
            f"{node.name} exited with {code} after handing over; its log ends with:\n"
            f"{node.proc.stderr_tail()}"
        )


def _thaw(node: Node) -> bool:
    """SIGCONT a stopped old primary: it must not serve again; True if it exits by itself."""
    with contextlib.suppress(ProcessLookupError):
        node.proc.popen.send_signal(signal.SIGCONT)
    try:
        wait_until(lambda: not node.proc.alive(), THAW_EXIT_TIMEOUT_S, f"{node.name} exits")
        exited = True
    except TimeoutError:
        exited = False
    node.proc.stop()
    return exited


# --- the run -------------------------------------------------------------------------


@dataclass
class SoakPlan:
    faults: int = 100
    duration_s: float | None = None
    clients: int = 4
    kinds: tuple[str, ...] = DEFAULT_KINDS
    seed: int = 1
    load_between_s: tuple[float, float] = (0.5, 1.5)
    mode: str = "auto"
    unsafe: bool = False
    recovery_timeout_s: float = RECOVERY_TIMEOUT_S
    wait_replay: bool = False  # before the next fault, the new backup replays what it holds
    protect_timeout_s: float = PROTECT_TIMEOUT_S
    keep: Path | None = None  # keep every replica's log here (else a temporary directory)


class Target:
    """The service the faults hit: one for every fault, or a fresh pair for each."""

    def __init__(self, plan: SoakPlan, scratch: Path, arbiter: Arbiter, reprotect: bool) -> None:
        self.plan = plan
        self.scratch = scratch
        self.arbiter = arbiter
        self.reprotect = reprotect
        self.history: list[Operation] = []
        self.client_errors = 0
        self._current: tuple[Fleet, HistoryLoad] | None = None
        self._pairs = 0

    def next(self) -> tuple[Fleet, HistoryLoad]:
        """The replicas and the load for the next fault, under load and protected."""
        if self._current is not None and self.reprotect:
            return self._current
        self.finish()
        self._pairs += 1
        pair = "soak" if self.reprotect else f"soak{self._pairs}"
        fleet = Fleet(
            self.scratch,
            self.arbiter,
            pair=pair,
            reprotect=self.reprotect,
            unsafe=self.plan.unsafe,
        )
        load = HistoryLoad(
            fleet.client_ports,
            clients=self.plan.clients,
            suffix="" if self.reprotect else f"@{pair}",
            seed=self.plan.seed * 7919 + self._pairs,
        )
        self._current = fleet, load
        fleet.start_pair()
        assert fleet.primary is not None and fleet.backup is not None
        if self.reprotect:
            _wait_protected(fleet.primary, fleet.backup, PROTECT_TIMEOUT_S)
        load.start()
        return fleet, load

    def finish(self) -> None:
        """Stop the load, read every key back from the live replica, stop the replicas."""
        if self._current is None:
            return
        fleet, load = self._current
        self._current = None
        load.stop()
        try:
            if fleet.primary is not None:
                # After a failed fault the service may still come back: give it time.
                _wait_live(fleet.primary, READ_BACK_TIMEOUT_S)
                load.read_back(fleet.primary.client_port)
        finally:
            fleet.stop()
            self.history += load.history
            self.client_errors += load.errors


def soak(
    plan: SoakPlan, progress: Callable[[str], None] | None = None
) -> tuple[dict[str, Any], list[Operation]]:
    """Run the soak the plan says; return its report (not yet saved) and its history."""
    say = progress or (lambda _line: None)
    reprotect = can_reprotect() if plan.mode == "auto" else plan.mode == "reprotect"
    rng = random.Random(plan.seed)
    started = time.monotonic()
    taken = datetime.datetime.now(datetime.UTC)
    faults: list[dict[str, Any]] = []
    error: str | None = None
    with contextlib.ExitStack() as stack:
        if plan.keep is not None:
            plan.keep.mkdir(parents=True, exist_ok=True)
            scratch = plan.keep
        else:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ftproxy-soak-")))
        arbiter = Arbiter(scratch).start()
        target = Target(plan, scratch, arbiter, reprotect)
        try:
            arbiter.wait_listening()
            for index in range(plan.faults):
                if plan.duration_s is not None and time.monotonic() - started > plan.duration_s:
                    break
                kind = rng.choice(plan.kinds)
                try:
                    fleet, load = target.next()
                    time.sleep(rng.uniform(*plan.load_between_s))  # a random moment of the load
                    record = inject(fleet, load, kind, plan)
                except (TimeoutError, RuntimeError, OSError, ReplyError) as exc:
                    error = f"fault {index + 1} ({kind}): {exc}"
                    faults.append({"fault": index + 1, "kind": kind, "error": str(exc)})
                    say(f"soak: fault {index + 1:>3} {kind:<13} FAILED: {exc}")
                    break
                except KeyboardInterrupt:
                    # Ctrl-C: no new fault; the history so far is still read back and checked.
                    error = f"interrupted during fault {index + 1} ({kind})"
                    say(f"soak: {error}; reading back and checking what ran")
                    break
                record["fault"] = index + 1
                record["at_s"] = round(time.monotonic() - started, 3)
                faults.append(record)
                say(_fault_line(record))
            say("soak: reading every key back, checking the history")
            try:
                target.finish()
            except (TimeoutError, OSError, ReplyError) as exc:
                error = (f"{error}; " if error else "") + f"the read-back failed: {exc}"
                say(f"soak: the read-back failed: {exc}")
        finally:
            if target._current is not None:
                target._current[0].stop()
            arbiter.stop()
    report = _report(
        plan, reprotect, taken, started, faults, target.history, target.client_errors, error
    )
    return report, target.history


def _fault_line(record: dict[str, Any]) -> str:
    line = f"soak: fault {record['fault']:>3} {record['kind']:<13} -> {record['live']} live"
    if record.get("failover_s") is not None:
        line += f", disruption {record['failover_s']:.3f} s"
    if record.get("reprotect_s") is not None:
        line += (
            f", protected again in {record['reprotect_s']:.2f} s"
            f" (joiner start to protected {record['catchup_s']:.2f} s, "
            f"{(record.get('catch_up') or {}).get('entries_sent')} entries streamed)"
        )
    return line


def _report(
    plan: SoakPlan,
    reprotect: bool,
    taken: datetime.datetime,
    started: float,
    faults: list[dict[str, Any]],
    history: list[Operation],
    client_errors: int,
    error: str | None,
) -> dict[str, Any]:
    checked = time.monotonic()
    verdict = check(history)
    check_s = time.monotonic() - checked
    survived = [f for f in faults if "error" not in f]
    # The live replica's own account of each catch-up: what it streamed, how fast.
    streamed = [f["catch_up"] for f in survived if f.get("catch_up")]
    rates = [c["entries_sent"] / c["elapsed_s"] for c in streamed if c.get("elapsed_s")]
    byte_rates = [c["bytes_sent"] / c["elapsed_s"] / 1e6 for c in streamed if c.get("elapsed_s")]
    by_kind = {
        kind: _percentiles(
            [
                f["failover_s"]
                for f in survived
                if f["kind"] == kind and f.get("failover_s") is not None
            ]
        )
        for kind in plan.kinds
    }
    return {
        "schema": 1,
        "taken": taken.isoformat(timespec="seconds"),
        "mode": "reprotect" if reprotect else "pair",
        "plan": {
            "faults": plan.faults,
            "duration_s": plan.duration_s,
            "clients": plan.clients,
            "kinds": list(plan.kinds),
            "seed": plan.seed,
            "output_rule": not plan.unsafe,
            "recovery_timeout_s": plan.recovery_timeout_s,
            "wait_replay": plan.wait_replay,
            "protect_timeout_s": plan.protect_timeout_s,
        },
        "duration_s": round(time.monotonic() - started, 1),
        "faults_injected": len(faults),
        "faults_survived": len(survived),
        "error": error,
        "operations": len(history),
        "acknowledged": sum(1 for op in history if not op.pending and op.client != -1),
        "pending": sum(1 for op in history if op.pending),
        "client_errors": client_errors,
        "acknowledged_writes_lost": lost_acknowledged_writes(history),
        "linearizable": verdict.linearizable,
        "linearizability_violations": len(verdict.violations),
        "linearizability": {**verdict.as_dict(), "check_s": round(check_s, 2)},
        "failover_s": _percentiles(
            [f["failover_s"] for f in survived if f.get("failover_s") is not None]
        ),
        "failover_s_by_kind": by_kind,
        "backup_replay_behind_entries": _percentiles(
            [f["backup_replay_behind"] for f in survived if "backup_replay_behind" in f]
        ),
        "longest_pause_during_catchup_s": _percentiles(
            [
                f["longest_pause_during_catchup_s"]
                for f in survived
                if f.get("longest_pause_during_catchup_s") is not None
            ]
        ),
        "replay_caught_up_s": _percentiles(
            [f["replay_caught_up_s"] for f in survived if "replay_caught_up_s" in f]
        ),
        "replay_entries_per_s": _percentiles(
            [f["replay_entries_per_s"] for f in survived if "replay_entries_per_s" in f]
        ),
        "reprotect_s": _percentiles([f["reprotect_s"] for f in survived if "reprotect_s" in f]),
        "catchup_s": _percentiles([f["catchup_s"] for f in survived if "catchup_s" in f]),
        "catchup_entries_per_s": _percentiles(rates),
        "catchup_mb_per_s": _percentiles(byte_rates),
        "faults": faults,
    }


def print_report(report: dict[str, Any]) -> None:
    def p(figure: dict[str, Any], unit: str = "s", digits: int = 3) -> str:
        if figure.get("p50") is None:
            return "-"
        return f"p50 {figure['p50']:.{digits}f} {unit}, p99 {figure['p99']:.{digits}f} {unit}"

    lines = [
        f"soak ({report['mode']} mode, {report['duration_s']:.0f} s, "
        f"{report['plan']['clients']} clients)",
        f"  faults survived          {report['faults_survived']} of {report['faults_injected']}",
        f"  operations               {report['operations']:,} "
        f"({report['acknowledged']:,} acknowledged, {report['pending']:,} pending)",
        "  acknowledged writes lost "
        + (
            "unknown (nothing was read back)"
            if report["acknowledged_writes_lost"] is None
            else str(report["acknowledged_writes_lost"])
        ),
        f"  linearizability          "
        f"{'linearizable' if report['linearizable'] else 'NOT linearizable'}, "
        f"{report['linearizability_violations']} keys in violation of "
        f"{report['linearizability']['keys']} "
        f"(checked in {report['linearizability']['check_s']:.1f} s)",
        f"  disruption per fault     {p(report['failover_s'])}",
    ]
    for kind, figure in report["failover_s_by_kind"].items():
        lines.append(f"    {kind:<22} {p(figure)} ({figure['n']})")
    lines += [
        f"  re-protection            {p(report['reprotect_s'], digits=2)}",
        f"  joiner start->protected  {p(report['catchup_s'], digits=2)}",
        f"  protected->replayed      {p(report['replay_caught_up_s'], digits=2)}; "
        f"joiner's replay {p(report['replay_entries_per_s'], 'entries/s', 0)}",
        f"  longest pause in replies during a catch-up "
        f"{p(report['longest_pause_during_catchup_s'])}",
        f"  backup's replay behind the log at the fault "
        f"{p(report['backup_replay_behind_entries'], 'entries', 0)}",
        f"  catch-up rate            {p(report['catchup_entries_per_s'], 'entries/s', 0)}; "
        f"{p(report['catchup_mb_per_s'], 'MB/s', 2)}",
    ]
    if report["error"]:
        lines.append(f"  stopped by               {report['error']}")
    for violation in report["linearizability"]["violations"][:5]:
        lines.append(
            f"  violation on {violation['key']}: no order explains {violation['stuck_at']}"
        )
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench soak", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--faults", type=int, default=100, help="faults in a row (default 100)")
    parser.add_argument(
        "--duration", type=float, metavar="SECONDS", help="inject no new fault after this long"
    )
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument(
        "--kinds",
        default=",".join(DEFAULT_KINDS),
        help=f"fault kinds, comma-separated, chosen at random, of {', '.join(KINDS)} "
        f"(default {','.join(DEFAULT_KINDS)}; switchover: a planned handover, SIGUSR1)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--mode",
        choices=("auto", "reprotect", "pair"),
        default="auto",
        help="reprotect: one service for every fault; pair: a fresh pair per fault "
        "(ftproxy without re-protection); auto: reprotect where ftproxy can (default)",
    )
    parser.add_argument(
        "--unsafe-no-output-rule",
        action="store_true",
        help="UNSAFE: run the primaries with --no-output-rule (and a 20 ms ship delay), "
        "to see the check find the acknowledged writes a failover then loses",
    )
    parser.add_argument(
        "--recovery-timeout",
        type=float,
        default=RECOVERY_TIMEOUT_S,
        metavar="SECONDS",
        help="a fault the service does not recover from within this long ends the soak "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--protect-timeout",
        type=float,
        default=PROTECT_TIMEOUT_S,
        metavar="SECONDS",
        help="a new backup that has not made the pair protected within this long ends the "
        "soak (default %(default)s)",
    )
    parser.add_argument(
        "--wait-replay",
        action="store_true",
        help="before the next fault, wait until the new backup has replayed the log it "
        "holds (default: the next fault may come as soon as the pair is protected)",
    )
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="keep every replica's output and data here"
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="write the JSON report here (default: bench/results/soak-TIME.json)",
    )
    parser.add_argument("--history", type=Path, metavar="PATH", help="write the history here")
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        parser.error(f"unknown fault kinds {unknown}; choose from {', '.join(KINDS)}")
    if args.faults < 1 or args.clients < 1:
        parser.error("--faults and --clients must be at least 1")
    plan = SoakPlan(
        faults=args.faults,
        duration_s=args.duration,
        clients=args.clients,
        kinds=kinds,
        seed=args.seed,
        mode=args.mode,
        unsafe=args.unsafe_no_output_rule,
        keep=args.keep,
        recovery_timeout_s=args.recovery_timeout,
        wait_replay=args.wait_replay,
        protect_timeout_s=args.protect_timeout,
    )
    report, history = soak(plan, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print_report(report)
    path = args.json or RESULTS / f"soak-{stamp(report['taken'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"soak: wrote {path}")
    if args.history is not None:
        args.history.write_text(json.dumps([op.as_dict() for op in history]) + "\n")
        print(f"soak: wrote {args.history} (check it with python -m bench.linearizability)")
    ok = (
        report["error"] is None
        and report["acknowledged_writes_lost"] == 0
        and report["linearizable"]
    )
    return 0 if ok else 1
