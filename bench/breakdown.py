"""``python -m bench breakdown``: where one client's request spends its time, stage by stage.

record, no-rule, rule and the healed pair (rule after a kill -9 of the first
primary and a re-protection: how every ``ftproxy run`` pair serves) are
started with ``FTPROXY_TRACE_DIR`` set, so every
supervisor, guest and backup stamps each request at each stage of its path
(``ftproxy.guest._trace``: one CLOCK_MONOTONIC clock for all processes). A
1-client closed-loop SET 16 B load from this process stamps its own send and
receive with the same clock; the stamps of every process that fall inside
one request's [sent, got] window are that request's path (one client, one
request in flight: nothing else happens in that window but heartbeats). Each
stage's figure is the p50 over requests of the time between two stamps.
Measured, not estimated: a stage whose stamps are missing for a request is
counted as missing, never filled in.

``--baseline TREE`` runs the same configurations from another checkout of
ftproxy as well (a ``git archive`` of the commit to compare with), taking
turns with this one round by round, and adds redis-benchmark's 1-client SET
rate for both: the before/after of a change in one run, on the same load.

    python -m bench breakdown                          # ~1 minute; saved in bench/results/
    python -m bench breakdown --baseline /tmp/base     # A/B against another tree
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load as bm
from bench.load import Load, Op
from bench.machine import describe, load_average, stamp
from bench.matrix import percentile
from bench.plan import NO_RULE, RECORD, RULE, RULE_HEALED, SHORT
from bench.procs import HOST, ROOT
from bench.resp import encode
from bench.services import Arbiter, Service, start_healed_pair, start_pair, start_record
from ftproxy.guest import _trace as t

RESULTS = ROOT / "bench" / "results"
CONFIGS = (RECORD, NO_RULE, RULE, RULE_HEALED)
WITH_RULE = (RULE, RULE_HEALED)

# (name, from (process, stage), to (process, stage)). Processes: the bench's
# client, the supervisor that serves the client (record, primary, or the healed
# pair's live replica), its guest, and the backup's supervisor.
Stage = tuple[str, tuple[str, int], tuple[str, int]]
GUEST_PATH: tuple[Stage, ...] = (
    ("client -> supervisor wakes", ("client", t.CLIENT_SENT), ("sup", t.SUP_WOKE)),
    ("wake -> recv of the request", ("sup", t.SUP_WOKE), ("sup", t.SUP_READ)),
    ("recv -> reply written to guest pipe", ("sup", t.SUP_READ), ("sup", t.REPLY_WRITTEN)),
    ("pipe hop to the guest", ("sup", t.REPLY_WRITTEN), ("guest", t.GUEST_WOKE)),
    ("guest computes", ("guest", t.GUEST_WOKE), ("guest", t.GUEST_WROTE)),
    ("pipe hop back (output taken)", ("guest", t.GUEST_WROTE), ("sup", t.OUTPUT_TAKEN)),
)
LOG_PATH: tuple[Stage, ...] = (
    ("reply written -> ship task runs", ("sup", t.REPLY_WRITTEN), ("sup", t.SHIP_STARTED)),
    ("entry encoded and sent", ("sup", t.SHIP_STARTED), ("sup", t.ENTRY_SHIPPED)),
    ("entry shipped -> backup decoded it", ("sup", t.ENTRY_SHIPPED), ("backup", t.BACKUP_RECEIVED)),
    ("backup decoded -> its ack sent", ("backup", t.BACKUP_RECEIVED), ("backup", t.ACK_SENT)),
    (
        "backup decoded -> primary has the ack",
        ("backup", t.BACKUP_RECEIVED),
        ("sup", t.ACK_RECEIVED),
    ),
    ("log round trip (shipped -> ack)", ("sup", t.ENTRY_SHIPPED), ("sup", t.ACK_RECEIVED)),
    ("ack -> output released", ("sup", t.ACK_RECEIVED), ("sup", t.OUTPUT_RELEASED)),
    ("output held (taken -> released)", ("sup", t.OUTPUT_TAKEN), ("sup", t.OUTPUT_RELEASED)),
)
TAIL: tuple[Stage, ...] = (
    ("output taken -> client write", ("sup", t.OUTPUT_TAKEN), ("sup", t.CLIENT_WRITE)),
    ("client write -> client has reply", ("sup", t.CLIENT_WRITE), ("client", t.CLIENT_GOT)),
    ("total (client's round trip)", ("client", t.CLIENT_SENT), ("client", t.CLIENT_GOT)),
)
TAIL_RULE: tuple[Stage, ...] = (
    ("output released -> client write", ("sup", t.OUTPUT_RELEASED), ("sup", t.CLIENT_WRITE)),
    *TAIL[1:],
)


def stages(config: str) -> tuple[Stage, ...]:
    if config == RECORD:
        return GUEST_PATH + TAIL
    if config == NO_RULE:
        return GUEST_PATH + LOG_PATH[:6] + TAIL
    return GUEST_PATH + LOG_PATH + TAIL_RULE


@dataclass
class Build:
    """One checkout of ftproxy whose supervisors the run starts."""

    name: str
    tree: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, trace_dir: Path) -> dict[str, str]:
        # Run from the tree (cwd), so that ``python -m`` imports its ftproxy, guests too.
        return {**self.extra_env, t.ENV: str(trace_dir)}


@dataclass
class Subject:
    """One configuration of one build, started and traced."""

    build: Build
    config: str
    service: Service
    trace_dir: Path
    windows: list[tuple[int, int]] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # redis-benchmark 1-client SET req/s
    rates_many: list[float] = field(default_factory=list)  # ... with --redis-clients
    cpu_start: tuple[float, float] = (0.0, 0.0)
    cpu_used: list[float] = field(default_factory=lambda: [0.0, 0.0])
    requests: int = 0

    @property
    def key(self) -> str:
        return f"{SHORT[self.config]}@{self.build.name}"


def start(build: Build, config: str, scratch: Path, arbiter: Arbiter) -> Subject:
    trace_dir = scratch / f"trace-{build.name}-{config}"
    env = build.env(trace_dir)
    here = scratch / f"{build.name}-{config}"
    here.mkdir()
    if config == RECORD:
        service = start_record(here, env=env, tree=build.tree)
    elif config == RULE_HEALED:
        # The first pair's primary is gone (its stamps are in the directory, under a
        # pid no longer served); the survivor serves, and its new backup acks.
        service = start_healed_pair(config, here, arbiter, env=env, tree=build.tree)
    else:
        # This tree: port 0 everywhere, reported back, so that no service races another
        # for a port; another checkout (--baseline) may predate that, so it gets free ports.
        service = start_pair(
            config,
            here,
            arbiter,
            output_rule=config == RULE,
            env=env,
            tree=build.tree,
            ephemeral=build.tree == ROOT,
        )
    return Subject(build, config, service, trace_dir)


def client_load(port: int, requests: int) -> list[tuple[int, int]]:
    """``requests`` SETs one at a time; each one's (sent, got) in CLOCK_MONOTONIC ns."""
    request = encode("SET", "key:1", "x" * 16)
    expected = b"+OK\r\n"
    now = time.monotonic_ns
    windows = []
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(requests):
            sent = now()
            sock.sendall(request)
            got = b""
            while len(got) < len(expected):
                chunk = sock.recv(64)
                if not chunk:
                    raise ConnectionResetError("the service closed the connection")
                got += chunk
            windows.append((sent, now()))
            if got != expected:
                raise ValueError(f"unexpected reply {got!r}")
    return windows


def load_stamps(subject: Subject) -> dict[str, dict[int, list[int]]]:
    """Sorted stamp times by process (sup, guest, backup) and stage."""
    files = sorted(subject.trace_dir.glob("*.trace"))
    by_pid = {int(f.stem.split("-")[-1]): f for f in files}
    sup = subject.service.primary[0].pid
    backup = subject.service.backup[0].pid if subject.service.backup else -1
    names: dict[int, str] = {sup: "sup", backup: "backup"}
    for f in files:
        role, ppid, pid = f.stem.split("-")
        if role == "guest" and int(ppid) == sup:
            names[int(pid)] = "guest"
    out: dict[str, dict[int, list[int]]] = {}
    for pid, path in by_pid.items():
        name = names.get(pid)
        if name is None:
            continue
        stages_here = out.setdefault(name, {})
        for stage, _seq, ns in t.read(str(path)):
            stages_here.setdefault(stage, []).append(ns)
    for stages_here in out.values():
        for times in stages_here.values():
            times.sort()
    return out


# Each stamp's causal predecessor: a request's stamp of a stage is the first one
# at or after its predecessor's (and inside the request's window), so a stamp
# that a descheduled process wrote late for the previous request is not taken.
AFTER: dict[tuple[str, int], tuple[str, int]] = {
    ("sup", t.SUP_WOKE): ("client", t.CLIENT_SENT),
    ("sup", t.SUP_READ): ("client", t.CLIENT_SENT),
    ("sup", t.REPLY_WRITTEN): ("sup", t.SUP_READ),
    ("guest", t.GUEST_WOKE): ("sup", t.REPLY_WRITTEN),  # stamped before its write
    ("guest", t.GUEST_WROTE): ("guest", t.GUEST_WOKE),
    ("sup", t.OUTPUT_TAKEN): ("guest", t.GUEST_WROTE),
    ("sup", t.SHIP_STARTED): ("sup", t.SUP_READ),
    ("sup", t.ENTRY_SHIPPED): ("sup", t.SHIP_STARTED),
    ("backup", t.BACKUP_RECEIVED): ("sup", t.SHIP_STARTED),
    ("backup", t.ACK_SENT): ("backup", t.BACKUP_RECEIVED),
    ("sup", t.ACK_RECEIVED): ("backup", t.BACKUP_RECEIVED),
    ("sup", t.OUTPUT_RELEASED): ("sup", t.OUTPUT_TAKEN),
}


def join(subject: Subject) -> dict[str, Any]:
    """Each request's stage times from the stamps inside its window; p50/p90 per stage."""
    stamps = load_stamps(subject)
    rule = subject.config in WITH_RULE
    client_write_after = ("sup", t.OUTPUT_RELEASED) if rule else ("sup", t.OUTPUT_TAKEN)

    def resolve(
        point: tuple[str, int], window: tuple[int, int], seen: dict[Any, int | None]
    ) -> int | None:
        if point in seen:
            return seen[point]
        process, stage = point
        found: int | None = None
        if process == "client":
            found = window[0] if stage == t.CLIENT_SENT else window[1]
        else:
            before = client_write_after if stage == t.CLIENT_WRITE else AFTER[point]
            earliest = resolve(before, window, seen)
            if rule and stage == t.OUTPUT_RELEASED:
                acked = resolve(("sup", t.ACK_RECEIVED), window, seen)
                earliest = None if earliest is None or acked is None else max(earliest, acked)
            times = stamps.get(process, {}).get(stage)
            if earliest is not None and times:
                i = bisect_left(times, earliest)
                if i < len(times) and times[i] <= window[1]:
                    found = times[i]
        seen[point] = found
        return found

    rows = []
    resolved = [dict[Any, int | None]() for _ in subject.windows]
    for name, a, b in stages(subject.config):
        values = []
        for window, seen in zip(subject.windows, resolved, strict=True):
            start_ns, end_ns = resolve(a, window, seen), resolve(b, window, seen)
            if start_ns is not None and end_ns is not None:
                values.append((end_ns - start_ns) / 1000)
        rows.append(
            {
                "stage": name,
                "from": f"{a[0]}.{t.STAGE_NAMES[a[1]]}",
                "to": f"{b[0]}.{t.STAGE_NAMES[b[1]]}",
                "n": len(values),
                "p50_us": _round(percentile(values, 0.5)),
                "p90_us": _round(percentile(values, 0.9)),
            }
        )
    return {"requests": len(subject.windows), "stages": rows}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@contextmanager
def started(subjects: list[Subject]) -> Iterator[None]:
    try:
        for subject in subjects:
            subject.service.ready()
        yield
    finally:
        for subject in subjects:
            subject.service.stop()


@contextmanager
def untraced(subject: Subject) -> Iterator[None]:
    """Nothing of ``subject``'s stamps meanwhile: redis-benchmark's requests lie outside
    every window, and would fill the trace files before the later rounds."""
    t.pause(str(subject.trace_dir), True)
    try:
        yield
    finally:
        t.pause(str(subject.trace_dir), False)


def redis_rate(port: int, requests: int, clients: int = 1) -> float:
    """redis-benchmark's SET 16 B rate with ``clients`` clients."""
    return bm.run(port, Load(f"c={clients}", clients, 1), Op("set", 16), requests).rps


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's run: this tree, and a baseline if one is asked for."""
    extra = dict(item.partition("=")[::2] for item in args.env)
    builds = [Build("this", ROOT, extra)]
    if args.baseline is not None:
        builds.insert(0, Build("baseline", args.baseline.resolve()))
    if args.baseline_env is not None:
        baseline_extra = dict(item.partition("=")[::2] for item in args.baseline_env)
        builds.insert(0, Build("baseline", ROOT, baseline_extra))
    result = measure(
        builds,
        args.configs,
        requests=args.requests,
        rounds=args.rounds,
        warmup=args.warmup,
        redis_requests=args.redis_requests,
        redis_clients=args.redis_clients,
        pin=args.pin,
        keep=args.keep,
    )
    result["baseline"] = str(args.baseline) if args.baseline else None
    # What each build ran with, so that a saved A/B of one tree says what it compared.
    result["environments"] = {build.name: build.extra_env for build in builds}
    return result


def critical_path(requests: int = 2000, rounds: int = 3, warmup: int = 300) -> dict[str, Any]:
    """This tree's record, no-rule, rule and healed rule, 1 client: the stage table and CPU
    per request (what ``python -m bench`` puts in its result as ``breakdown``)."""
    return measure([Build("this", ROOT)], CONFIGS, requests=requests, rounds=rounds, warmup=warmup)


def measure(
    builds: list[Build],
    configs: Sequence[str],
    *,
    requests: int,
    rounds: int,
    warmup: int,
    redis_requests: int = 0,
    redis_clients: int = 0,
    pin: str | None = None,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Start every config of every build, load them in turn round by round, join the stamps."""
    with tempfile.TemporaryDirectory(prefix="ftproxy-breakdown-") as tmp:
        scratch = keep or Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        arbiter = Arbiter(scratch).start()
        try:
            arbiter.wait_listening()
            subjects = []
            for build in builds:
                for config in configs:
                    subjects.append(start(build, config, scratch, arbiter))
            with started(subjects):
                for subject in subjects:
                    if subject.build.name == "this" and pin:
                        _pin(subject, pin)
                for subject in subjects:  # warm-up, not measured
                    client_load(subject.service.port, warmup)
                for round_no in range(rounds):
                    order = subjects if round_no % 2 == 0 else subjects[::-1]
                    for subject in order:
                        before = subject.service.cpu_seconds()
                        subject.windows += client_load(subject.service.port, requests)
                        after = subject.service.cpu_seconds()
                        subject.cpu_used[0] += after[0] - before[0]
                        subject.cpu_used[1] += after[1] - before[1]
                        subject.requests += requests
                        if redis_requests and bm.require_redis_benchmark():
                            with untraced(subject):
                                port = subject.service.port
                                subject.rates.append(redis_rate(port, redis_requests))
                                if redis_clients > 1:
                                    subject.rates_many.append(
                                        redis_rate(port, redis_requests * 4, redis_clients)
                                    )
                        print(f"  round {round_no + 1}: {subject.key} done", file=sys.stderr)
                results = {subject.key: _summary(subject) for subject in subjects}
                if keep:
                    windows = {s.key: s.windows for s in subjects}
                    (keep / "windows.json").write_text(json.dumps(windows))
        finally:
            arbiter.stop()
    return {
        "taken": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**describe(), "load_average_end": load_average()},
        "commit": _commit(ROOT),
        "baseline": None,
        "load": f"1 client closed-loop, SET 16 B, {rounds} round{'s' * (rounds != 1)} x "
        f"{requests} "
        "requests per configuration, interleaved; CPU: each side's process tree",
        "results": results,
    }


def _pin(subject: Subject, layout: str) -> None:
    """Experiment: "primary": the primary side (supervisor and its guest) on CPU 0, the
    rest free; "split": that, and the backup side on CPU 1."""
    sides = [(subject.service.primary, 0)]
    if layout == "split":
        sides.append((subject.service.backup, 1))
    for procs, cpu in sides:
        for proc in procs:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            for pid in [proc.pid, *map(int, children)]:
                for task in os.listdir(f"/proc/{pid}/task"):
                    os.sched_setaffinity(int(task), {cpu})


def _summary(subject: Subject) -> dict[str, Any]:
    joined = join(subject)
    totals = [(got - sent) / 1000 for sent, got in subject.windows]
    seconds = sum(totals) / 1e6
    return {
        "config": subject.config,
        "build": subject.build.name,
        **joined,
        "client_p50_us": _round(percentile(totals, 0.5)),
        "client_rps": round(len(totals) / seconds) if seconds else None,
        "cpu_us_per_request": [
            round(used * 1e6 / max(1, subject.requests)) for used in subject.cpu_used
        ],
        "redis_benchmark_c1_set_rps": [round(r) for r in subject.rates],
        "redis_benchmark_cN_set_rps": [round(r) for r in subject.rates_many],
    }


def _commit(tree: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def print_report(result: dict[str, Any]) -> None:
    results = result["results"]
    keys = list(results)
    print(f"breakdown: {result['load']}; load average {result['machine']['load_average_end']}")
    names: list[str] = []
    for key in keys:
        for row in results[key]["stages"]:
            if row["stage"] not in names:
                names.append(row["stage"])
    width = max(len(n) for n in names) + 2
    print(f"{'p50 us per stage':<{width}}" + "".join(f"{k:>18}" for k in keys))
    for name in names:
        cells = []
        for key in keys:
            row = next((r for r in results[key]["stages"] if r["stage"] == name), None)
            if row is None or row["p50_us"] is None:
                cells.append(f"{'-':>18}")
            else:
                found = row["n"] * 100 // max(1, results[key]["requests"])
                cells.append(f"{row['p50_us']:>11.1f} ({found:>3}%)")
        print(f"{name:<{width}}" + "".join(cells))
    for label, field_name in (
        ("client p50 us", "client_p50_us"),
        ("client req/s", "client_rps"),
        ("CPU us/req (primary, backup)", "cpu_us_per_request"),
        ("redis-benchmark c=1 SET req/s", "redis_benchmark_c1_set_rps"),
        ("redis-benchmark c=N SET req/s", "redis_benchmark_cN_set_rps"),
    ):
        print(f"{label:<{width}}" + "".join(f"{results[k][field_name]!s:>18}" for k in keys))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench breakdown", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--requests", type=int, default=2000, help="per round and config")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument(
        "--redis-requests",
        type=int,
        default=0,
        metavar="N",
        help="also run redis-benchmark -c 1 SET for N requests per round (0: not)",
    )
    parser.add_argument(
        "--redis-clients",
        type=int,
        default=0,
        metavar="N",
        help="with --redis-requests, also N clients (4x the requests)",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        choices=CONFIGS,
        help="configurations to measure",
    )
    parser.add_argument(
        "--baseline", type=Path, metavar="TREE", help="another ftproxy checkout to compare with"
    )
    parser.add_argument(
        "--env",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="environment for this build's supervisors (e.g. FTPROXY_SPIN_US=100)",
    )
    parser.add_argument(
        "--baseline-env",
        nargs="*",
        metavar="NAME=VALUE",
        help="run this tree a second time as the baseline, with this environment instead",
    )
    parser.add_argument(
        "--pin",
        choices=("primary", "split"),
        help="pin this build's primary side (supervisor and guest) to CPU 0; "
        "split: and its backup side to CPU 1",
    )
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="keep the trace files and logs in DIR"
    )
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="write the JSON here (default: bench/results/)"
    )
    args = parser.parse_args(argv)
    result = run(args)
    print_report(result)
    for path in [args.json or RESULTS / f"breakdown-{stamp(result['taken'])}.json"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"bench: wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.pop(t.ENV, None)
    sys.exit(main())
