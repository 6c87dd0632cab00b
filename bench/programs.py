"""Real programs nobody here wrote, as ftproxy runs them: the catalog, their clients, a load.

Each program is a tiny key-value service written the way a user of its framework
writes one (``tests/guests/programs/``: put a key, get it, count): http.server,
wsgiref with Flask and bottle, xmlrpc.server, uvicorn + Starlette, aiohttp and
tornado. ``tests/test_real_programs.py`` fails them over; ``python -m bench
programs`` measures each one bare and as a replicated pair:

    python -m bench programs          # ~5 min: a table, bench/results/programs-<UTC>.json
    python -m bench programs --json out.json --seconds 1 --only flask-wsgiref   # there only
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import importlib.metadata
import json
import multiprocessing
import sys
import tempfile
import threading
import time
import xml.parsers.expat
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.machine import describe, stamp
from bench.procs import FTPROXY, HOST, ROOT, Proc, free_port, wait_until
from bench.services import Arbiter, admin_status

GUESTS = ROOT / "tests" / "guests" / "programs"
RESULTS = Path(__file__).resolve().parent / "results"


# -- the catalog ----------------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    """A real program that ftproxy runs: how to start it, how to talk to it."""

    name: str
    title: str
    packages: tuple[str, ...]  # distributions whose versions the results name
    argv: Callable[[int], list[str]]  # the guest's command line (after ``python``) for a port
    protocol: str = "http"  # or "xmlrpc"
    # One connection at a time (socketserver without threads): a connection the
    # program holds blocks every other one until it is done.
    one_at_a_time: bool = False
    keep_alive: bool = True  # HTTP/1.1 persistent connections

    def command(self, port: int) -> list[str]:
        """How a user runs it without ftproxy."""
        return [sys.executable, *self.argv(port)]


@dataclass(frozen=True)
class Refused:
    """A program ftproxy refuses to run, with what the user must see."""

    name: str
    title: str
    argv: Callable[[int], list[str]]
    why: str
    fix: str  # the message names this as what to do instead
    needs_request: bool  # refused at its first request, not at start
    needs_module: str | None = None  # only refused while this is importable


def _script(name: str) -> Callable[[int], list[str]]:
    return lambda port: [str(GUESTS / name), "--port", str(port)]


def _uvicorn(*flags: str) -> Callable[[int], list[str]]:
    return lambda port: [
        "-m",
        "uvicorn",
        "--app-dir",
        str(GUESTS),
        "starlette_kv:app",
        "--host",
        HOST,
        "--port",
        str(port),
        *flags,
    ]


PROGRAMS: tuple[Program, ...] = (
    Program(
        "http.server",
        "http.server.HTTPServer",
        (),
        _script("httpserver_kv.py"),
        one_at_a_time=True,
        keep_alive=False,
    ),
    Program(
        "ThreadingHTTPServer",
        "http.server.ThreadingHTTPServer (each request served in turn)",
        (),
        _script("threading_httpserver_kv.py"),
        one_at_a_time=True,
        keep_alive=False,
    ),
    Program(
        "flask-wsgiref",
        "Flask on wsgiref.simple_server",
        ("flask",),
        _script("flask_kv.py"),
        one_at_a_time=True,
        keep_alive=False,
    ),
    Program(
        "bottle-wsgiref",
        "bottle on its wsgiref server",
        ("bottle",),
        _script("bottle_kv.py"),
        one_at_a_time=True,
        keep_alive=False,
    ),
    Program(
        "xmlrpc.server",
        "xmlrpc.server.SimpleXMLRPCServer",
        (),
        _script("xmlrpc_kv.py"),
        protocol="xmlrpc",
        one_at_a_time=True,
        keep_alive=False,
    ),
    Program(
        "uvicorn-starlette",
        "uvicorn + Starlette (--loop asyncio --http h11 --workers 1)",
        ("uvicorn", "starlette", "h11"),
        _uvicorn("--loop", "asyncio", "--http", "h11", "--workers", "1"),
    ),
    Program("aiohttp", "aiohttp web.Application", ("aiohttp",), _script("aiohttp_kv.py")),
    Program("tornado", "tornado.web.Application", ("tornado",), _script("tornado_kv.py")),
)

REFUSED: tuple[Refused, ...] = (
    Refused(
        "uvicorn --workers 2",
        "uvicorn + Starlette, --workers 2",
        _uvicorn("--loop", "asyncio", "--http", "h11", "--workers", "2"),
        "starts worker processes that share the listening socket",
        "--workers 1",
        needs_request=False,
    ),
    Refused(
        "uvicorn --loop uvloop",
        "uvicorn + Starlette, --loop uvloop",
        _uvicorn("--loop", "uvloop", "--http", "h11"),
        "uvloop's event loop is C code (libuv) doing its own I/O, outside the virtual devices",
        "--loop asyncio",
        needs_request=False,
        needs_module="uvloop",
    ),
)


def versions(program: Program) -> dict[str, str]:
    """Installed versions of what the program runs on (Python itself included)."""
    found = {"python": sys.version.split()[0]}
    for package in program.packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "missing"
    return found


# -- clients --------------------------------------------------------------------------


class Broken(Exception):
    """The connection failed (reset, EOF, timeout): the request may or may not have run."""


class Wrong(Exception):
    """A reply that is not the answer to this request: an error status or foreign bytes."""


class HttpKv:
    """``http.client`` against the HTTP programs: PUT/GET /kv/KEY, POST /counter/NAME."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def _request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
        try:
            self.conn.request(method, path, body=body)
            reply = self.conn.getresponse()
            data = reply.read()
        except (OSError, http.client.RemoteDisconnected, http.client.IncompleteRead) as exc:
            self.close()
            raise Broken(f"{method} {path}: {exc!r}") from exc
        except http.client.HTTPException as exc:
            self.close()
            raise Wrong(f"{method} {path}: unreadable reply {exc!r}") from exc
        if reply.will_close:
            self.close()
        return reply.status, data

    def _json(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        status, data = self._request(method, path, body)
        if status != 200:
            raise Wrong(f"{method} {path}: status {status}: {data[:300]!r}")
        try:
            return dict(json.loads(data))
        except ValueError:
            raise Wrong(f"{method} {path}: not JSON: {data[:300]!r}") from None

    def put(self, key: str, value: str) -> None:
        encoded = value.encode()
        reply = self._json("PUT", f"/kv/{key}", encoded)
        if reply != {"key": key, "bytes": len(encoded)}:
            raise Wrong(f"PUT /kv/{key} ({len(encoded)} bytes) answered {reply}")

    def get(self, key: str) -> str | None:
        status, data = self._request("GET", f"/kv/{key}")
        if status == 404:
            return None
        if status != 200:
            raise Wrong(f"GET /kv/{key}: status {status}: {data[:300]!r}")
        return data.decode(errors="replace")

    def incr(self, name: str) -> int:
        reply = self._json("POST", f"/counter/{name}")
        if reply.get("name") != name or not isinstance(reply.get("value"), int):
            raise Wrong(f"POST /counter/{name} answered {reply}")
        return int(reply["value"])

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class _TimeoutTransport(xmlrpc.client.Transport):
    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        conn = super().make_connection(host)
        conn.timeout = self.timeout
        return conn


class XmlRpcKv:
    """``xmlrpc.client`` against the XML-RPC program: put, get, incr."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.proxy = xmlrpc.client.ServerProxy(
            f"http://{HOST}:{port}/RPC2", transport=_TimeoutTransport(timeout)
        )

    def _call(self, method: str, *args: str) -> Any:
        try:
            return getattr(self.proxy, method)(*args)
        except xmlrpc.client.Fault:
            raise
        except xmlrpc.client.ProtocolError as exc:
            raise Wrong(f"{method}: HTTP {exc.errcode} {exc.errmsg}") from exc
        except (OSError, http.client.RemoteDisconnected, http.client.IncompleteRead) as exc:
            self.close()
            raise Broken(f"{method}: {exc!r}") from exc
        except (http.client.HTTPException, xml.parsers.expat.ExpatError) as exc:
            self.close()
            raise Wrong(f"{method}: unreadable reply {exc!r}") from exc

    def put(self, key: str, value: str) -> None:
        reply = self._call("put", key, value)
        if reply is not True:
            raise Wrong(f"put({key!r}) answered {reply!r}")

    def get(self, key: str) -> str | None:
        try:
            reply = self._call("get", key)
        except xmlrpc.client.Fault as fault:
            if "KeyError" in fault.faultString:
                return None
            raise Wrong(f"get({key!r}): {fault}") from None
        if not isinstance(reply, str):
            raise Wrong(f"get({key!r}) answered {reply!r}")
        return reply

    def incr(self, name: str) -> int:
        try:
            reply = self._call("incr", name)
        except xmlrpc.client.Fault as fault:
            raise Wrong(f"incr({name!r}): {fault}") from None
        if not isinstance(reply, int):
            raise Wrong(f"incr({name!r}) answered {reply!r}")
        return reply

    def close(self) -> None:
        self.proxy("close")()


Client = HttpKv | XmlRpcKv


def client(program: Program, port: int, timeout: float = 10.0) -> Client:
    return XmlRpcKv(port, timeout) if program.protocol == "xmlrpc" else HttpKv(port, timeout)


def wait_serving(program: Program, port: int, timeout: float = 60.0) -> None:
    """Until the program answers a GET (of a key nobody writes)."""

    def answers() -> bool:
        kv = client(program, port, timeout=5)
        try:
            return kv.get("readiness-probe") is None
        except Broken:
            return False
        finally:
            kv.close()

    wait_until(answers, timeout, f"{program.name} answers on {HOST}:{port}")


# -- load -----------------------------------------------------------------------------


@dataclass
class Writer:
    """One client's closed loop: put a unique key, read it back, count; all checked.

    Every reply is checked against its own request (the key and value carry the
    client's tag and sequence number); what was acknowledged is kept, so that
    ``verify`` can demand it back from a replica.
    """

    program: Program
    port: int
    tag: str
    acked: dict[str, str] = field(default_factory=dict)
    counter_acked: int = 0
    counter_unacked: int = 0  # increments sent whose reply never came
    requests: int = 0
    broken: int = 0
    broken_why: list[str] = field(default_factory=list)  # the first few
    wrong: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def counter(self) -> str:
        return f"ctr-{self.tag}"

    def step(self, n: int, kv: Client) -> None:
        """Three requests; a Broken connection ends the step (the next one reconnects)."""
        key, value = f"k-{self.tag}-{n}", f"v-{self.tag}-{n}"
        try:
            started = time.perf_counter()
            kv.put(key, value)
            self.acked[key] = value
            self._done(started)
            started = time.perf_counter()
            got = kv.get(key)
            self._done(started)
            if got != value:
                self.wrong.append(f"GET {key} right after its PUT answered {got!r:.200}")
            started = time.perf_counter()
            try:
                count = kv.incr(self.counter)
            except Broken:
                self.counter_unacked += 1
                raise
            self._done(started)
            if count <= self.counter_acked:
                self.wrong.append(
                    f"{self.counter} went from {self.counter_acked} to {count}: a write was lost"
                )
            self.counter_acked = count
        except Broken as exc:
            self.broken += 1
            if len(self.broken_why) < 3:
                self.broken_why.append(str(exc))
            kv.close()
        except Wrong as exc:
            self.wrong.append(str(exc))
            kv.close()

    def _done(self, started: float) -> None:
        self.requests += 1
        self.latencies.append(time.perf_counter() - started)

    def run(self, stop: threading.Event | None, steps: int | None = None) -> None:
        kv = client(self.program, self.port)
        n = 0
        try:
            while (stop is None or not stop.is_set()) and (steps is None or n < steps):
                n += 1
                self.step(n, kv)
        finally:
            kv.close()

    def verify(self, port: int) -> list[str]:
        """What of this writer's acknowledged writes a replica on ``port`` lacks."""
        kv = client(self.program, port)
        missing = []
        try:
            for key, value in self.acked.items():
                got = kv.get(key)
                if got != value:
                    missing.append(f"{key}: acknowledged {value!r}, found {got!r:.100}")
            if self.counter_acked:
                count = kv.incr(self.counter) - 1
                high = self.counter_acked + self.counter_unacked
                if not self.counter_acked <= count <= high:
                    missing.append(
                        f"{self.counter}: acknowledged {self.counter_acked}"
                        f" (+{self.counter_unacked} unanswered), found {count}"
                    )
        finally:
            kv.close()
        return missing


@dataclass
class Load:
    """Several writers on threads until stopped (or for a number of steps each)."""

    program: Program
    port: int
    clients: int = 4
    tag: str = "load"
    writers: list[Writer] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)

    def start(self, steps: int | None = None) -> Load:
        for i in range(self.clients):
            writer = Writer(self.program, self.port, f"{self.tag}{i}")
            self.writers.append(writer)
            stop = None if steps is not None else self.stop_event
            thread = threading.Thread(target=writer.run, args=(stop, steps), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        self.join(timeout)

    def join(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(t.is_alive() for t in self.threads)
        if stuck:
            raise TimeoutError(f"{stuck} of {len(self.threads)} clients still waiting")

    def acknowledged(self) -> int:
        return sum(len(w.acked) for w in self.writers)

    def wrong(self) -> list[str]:
        return [line for w in self.writers for line in w.wrong]

    def broken(self) -> list[str]:
        """Why connections broke (the first few per writer)."""
        return [line for w in self.writers for line in w.broken_why]

    def verify(self, port: int) -> list[str]:
        return [line for w in self.writers for line in w.verify(port)]


# -- the benchmark --------------------------------------------------------------------


def by_name(name: str) -> Program:
    return next(p for p in PROGRAMS if p.name == name)


def _closed_loop(args: tuple[str, int, str, float]) -> dict[str, Any]:
    """One client process: writers' steps for ``seconds``; counts, latencies, errors."""
    name, port, tag, seconds = args
    program = by_name(name)
    writer = Writer(program, port, tag)
    kv = client(program, port)
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        n += 1
        writer.step(n, kv)
    kv.close()
    return {
        "requests": writer.requests,
        "latencies": writer.latencies,
        "broken": writer.broken,
        "wrong": writer.wrong[:5],
    }


def measure(program: Program, port: int, clients: int, seconds: float, tag: str) -> dict[str, Any]:
    """``clients`` client processes (not threads: the GIL would be the bottleneck)."""
    jobs = [(program.name, port, f"{tag}{i}", seconds) for i in range(clients)]
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        started = time.perf_counter()
        results = pool.map(_closed_loop, jobs)
        elapsed = time.perf_counter() - started
    latencies = sorted(x for r in results for x in r["latencies"])
    requests = sum(r["requests"] for r in results)

    def quantile(q: float) -> float | None:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else None
        )

    return {
        "clients": clients,
        "seconds": round(elapsed, 3),
        "requests": requests,
        "rps": requests / seconds,
        "p50_ms": quantile(0.5),
        "p99_ms": quantile(0.99),
        "broken": sum(r["broken"] for r in results),
        "wrong": [w for r in results for w in r["wrong"]],
    }


def _start_bare(program: Program, scratch: Path) -> tuple[list[Proc], int]:
    port = free_port()
    return [Proc(f"{program.name}-bare", program.command(port), scratch)], port


def _start_pair(program: Program, scratch: Path, arbiter: Arbiter) -> tuple[list[Proc], int]:
    port, log_port, admin = free_port(), free_port(), free_port()
    common = ["--arbiter", f"{HOST}:{arbiter.port}", "--insecure"]
    guest = ["--", *program.argv(port)]
    primary = [
        *FTPROXY,
        "primary",
        "--log-listen",
        f"{HOST}:{log_port}",
        "--admin",
        f"{HOST}:{admin}",
        "--pair",
        f"bench-{program.name}",
        "--generation",
        str(arbiter.next_generation()),
        *common,
        *guest,
    ]
    backup = [*FTPROXY, "backup", "--primary", f"{HOST}:{log_port}", *common, *guest]
    procs = [
        Proc(f"{program.name}-primary", primary, scratch),
        Proc(f"{program.name}-backup", backup, scratch),
    ]
    wait_until(lambda: admin_status(admin, timeout=2)["role"] == "primary", 60, "a pair")
    return procs, port


def bench_program(
    program: Program,
    scratch: Path,
    arbiter: Arbiter,
    loads: list[int],
    seconds: float,
    rounds: int,
) -> dict[str, Any]:
    """Bare and the pair side by side, taking turns cell by cell over ``rounds``.

    The shared machine drifts; turns make the drift hit both alike, and each
    cell keeps its round of median throughput (``rps_rounds`` lists all).
    """
    row: dict[str, Any] = {"name": program.name, "title": program.title}
    row["versions"] = versions(program)
    bare_procs, bare_port = _start_bare(program, scratch)
    procs = list(bare_procs)
    try:
        pair_procs, pair_port = _start_pair(program, scratch, arbiter)
        procs += pair_procs
        ports = {"bare": bare_port, "pair": pair_port}
        for port in ports.values():
            wait_serving(program, port)
        measured: dict[str, list[list[dict[str, Any]]]] = {"bare": [], "pair": []}
        for config in ports:
            measured[config] = [[] for _ in loads]
        for turn in range(rounds):
            order = list(ports) if turn % 2 == 0 else list(reversed(ports))
            for i, clients in enumerate(loads):
                for config in order:
                    cell = measure(program, ports[config], clients, seconds, f"{config}{turn}c")
                    measured[config][i].append(cell)
        for config, cells in measured.items():
            row[config] = [_median_round(rounds_of_cell) for rounds_of_cell in cells]
    except (TimeoutError, OSError) as exc:
        tails = "; ".join(f"{p.name}: {p.stderr_tail(3)}" for p in procs)
        row["error"] = f"{exc}; {tails}"
        return row
    finally:
        for proc in procs:
            proc.stop()
    # Each round's pair cell ran right beside its bare cell: the ratio of the two
    # drifts less than either, so the figure is the median of the rounds' ratios.
    row["pair_over_bare_rounds"] = [
        [p["rps"] / b["rps"] for p, b in zip(pairs, bares, strict=True) if b["rps"]]
        for pairs, bares in zip(measured["pair"], measured["bare"], strict=True)
    ]
    row["pair_over_bare"] = [
        sorted(ratios)[len(ratios) // 2] if ratios else None
        for ratios in row["pair_over_bare_rounds"]
    ]
    return row


def _median_round(cells: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(cells, key=lambda cell: float(cell["rps"]))
    return {**ordered[len(ordered) // 2], "rps_rounds": [round(c["rps"], 1) for c in cells]}


def table(result: dict[str, Any]) -> str:
    """The results as the README's Markdown table."""
    loads = result["loads"]
    head = ["program", "versions"]
    for clients in loads:
        head += [f"bare req/s c={clients}", f"pair req/s c={clients}", f"pair/bare c={clients}"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "--:|" * (3 * len(loads))]
    for row in result["programs"]:
        named = [f"{k} {v}" for k, v in row["versions"].items() if k != "python"]
        cells = [row["title"], ", ".join(named) or "stdlib"]
        for i in range(len(loads)):
            if "error" in row:
                cells += ["failed", "failed", "-"]
                continue
            for config in ("bare", "pair"):
                cell = row[config][i]
                wrong = f" ({len(cell['wrong'])} wrong)" if cell["wrong"] else ""
                cells.append(f"{cell['rps']:,.0f}{wrong}")
            cells.append(f"{row['pair_over_bare'][i]:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench programs", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per cell (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="turns per cell (default 3)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="loads (1 4)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these programs only")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the JSON here too")
    args = parser.parse_args(argv)
    chosen = [p for p in PROGRAMS if not args.only or p.name in args.only]
    taken = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="ftproxy-bench-programs-") as tmp:
        scratch = Path(tmp)
        arbiter = Arbiter(scratch).start()
        try:
            arbiter.wait_listening()
            rows = []
            for program in chosen:
                print(f"bench programs: {program.name} ...", file=sys.stderr, flush=True)
                rows.append(
                    bench_program(
                        program, scratch, arbiter, args.clients, args.seconds, args.rounds
                    )
                )
        finally:
            arbiter.stop()
    result = {
        "taken": taken.strftime("%Y-%m-%dT%H:%M:%S+0000"),
        "machine": describe(),
        "loads": args.clients,
        "seconds_per_cell": args.seconds,
        "rounds": args.rounds,
        "notes": [
            "Each client is a process running http.client (xmlrpc.client for XML-RPC) in a "
            "closed loop of PUT of a unique key, GET of it, POST to its counter; every reply "
            "is checked. req/s counts the requests answered over the cell.",
            "bare: python PROGRAM on real sockets. pair: ftproxy primary + backup on "
            "loopback with the output rule (the product), one arbiter for the run.",
            "Bare and pair run side by side and take turns cell by cell over the rounds "
            "(reversed order every other round); each cell keeps its round of median req/s; "
            "pair/bare is the median over rounds of each round's pair req/s over its bare.",
        ],
        "programs": rows,
    }
    print(table(result))
    for row in rows:
        if "error" in row:
            print(f"bench programs: {row['name']} failed: {row['error']}", file=sys.stderr)
    paths = [args.json] if args.json else [RESULTS / f"programs-{stamp(result['taken'])}.json"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"bench: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
