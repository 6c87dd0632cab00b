"""Real programs nobody here wrote, failed over under concurrent clients, recorded, replayed.

Each program (``bench/programs.py`` lists them, ``tests/guests/programs/`` holds
them) is a key-value service written the way a user of its framework writes one.
For each: a replicated pair, several writers, and at the kill one connection
idle, one mid-request and one mid-response; then many new clients at once. Every
reply must answer its own request, every acknowledged write must be on the
replica that went live, and an old connection must end, never carry another's
bytes. Then the same program under ``ftproxy record`` and ``ftproxy replay``.
And what a user sees when the program is one ftproxy refuses.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster, status, wait_until
from support import Recording, free_port, run_ftproxy

from bench.programs import (
    PROGRAMS,
    REFUSED,
    Broken,
    HttpKv,
    Load,
    Program,
    Refused,
    Wrong,
    client,
    wait_serving,
)

BIG_KEY = "big"
BIG_VALUE = "big-value:" + "".join(f"{i:08d};" for i in range(900_000))  # ~8 MiB, no repeats
PARTIAL_KEY = "held-partial"


@pytest.fixture(scope="module")
def arbiter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One arbiter for the module; each program's pair has a name of its own there."""
    holder = Cluster(tmp_path_factory.mktemp("arbiter"))
    holder.start_arbiter()
    yield holder
    holder.stop()


def ids(programs: tuple[Program, ...] | tuple[Refused, ...]) -> list[str]:
    return [p.name for p in programs]


# -- raw connections held across the kill ----------------------------------------------


def _request(program: Program, method: str, *args: str) -> bytes:
    """One whole request, as bytes, for a raw socket."""
    if program.protocol == "xmlrpc":
        body = xmlrpc.client.dumps(args, methodname=method).encode()
        head = "POST /RPC2 HTTP/1.1\r\nHost: t\r\nContent-Type: text/xml\r\n"
    else:
        verb, path = {"get": ("GET", "/kv/"), "put": ("PUT", "/kv/")}[method]
        body = args[1].encode() if method == "put" else b""
        head = f"{verb} {path}{args[0]} HTTP/1.1\r\nHost: t\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def _expected_body(program: Program, value: str) -> bytes:
    """What a GET of ``value`` answers with, past the headers."""
    if program.protocol == "xmlrpc":
        # xmlrpc.server marshals its answer with this very call.
        return xmlrpc.client.dumps((value,), methodresponse=True).encode()
    return value.encode()


def _read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length, from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection ended inside a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection ended inside a response body"
        body += chunk
    return head


def _rest(sock: socket.socket) -> bytes:
    """Whatever a connection still delivers before it ends (reset counts as the end)."""
    sock.settimeout(20)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(
            f"an old connection neither ended nor answered; got {data[:200]!r}"
        ) from None
    return data


def assert_nothing_lost(program: Program, port: int, before: Load, after: Load) -> None:
    """After a fault under load: every reply was its request's, the 8 new clients of 10
    steps each were all served, every acknowledged write is there, and the request held
    half-sent across the fault was never applied."""
    wrong = before.wrong() + after.wrong()
    assert not wrong, f"{len(wrong)} replies not their request's, e.g. {wrong[:3]}"
    broken = after.broken()
    assert not broken, f"new clients' connections broke on a live replica: {broken[:3]}"
    assert after.acknowledged() == 8 * 10
    missing = before.verify(port) + after.verify(port)
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
    assert client(program, port).get(PARTIAL_KEY) is None, "a half request was applied"


class Held:
    """One connection mid-response, one idle, one mid-request, held across the kill."""

    def __init__(self, program: Program, port: int) -> None:
        self.program = program
        self.port = port

    def open(self) -> Held:
        program, port = self.program, self.port
        # Mid-response first: a program that serves one connection at a time is
        # then busy sending it, and takes the other two only after.
        self.slow = socket.socket()
        self.slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.slow.settimeout(20)
        self.slow.connect(("127.0.0.1", port))
        self.slow.sendall(_request(program, "get", BIG_KEY))
        self.slow_got = b""
        while b"\r\n\r\n" not in self.slow_got or self.slow_got.endswith(b"\r\n\r\n"):
            chunk = self.slow.recv(4096)
            assert chunk, f"the big reply ended at once: {self.slow_got!r}"
            self.slow_got += chunk
        # Idle: on a keep-alive server, after one whole exchange; else just connected.
        self.idle = socket.create_connection(("127.0.0.1", port), timeout=20)
        talk_first = program.keep_alive and not program.one_at_a_time
        if talk_first:
            self.idle.sendall(_request(program, "get", "readiness-probe"))
            _read_response(self.idle)
        # Mid-request: half a request (its headers cut short), after a whole one.
        self.partial = socket.create_connection(("127.0.0.1", port), timeout=20)
        if talk_first:
            self.partial.sendall(_request(program, "get", "readiness-probe"))
            _read_response(self.partial)
        whole = _request(program, "put", PARTIAL_KEY, "never-acknowledged")
        self.partial.sendall(whole[: len(whole) // 2 if program.protocol == "xmlrpc" else 40])
        if not program.one_at_a_time:
            # A round trip on a fresh connection: the program has been given what
            # came before it (the front reads connections in arrival order).
            kv = client(program, port)
            assert kv.get("readiness-probe") is None
            kv.close()
        return self

    def check_ended(self) -> None:
        """Old connections end; the slow one brought only a prefix of its own answer."""
        for name, sock in (("idle", self.idle), ("mid-request", self.partial)):
            leftover = _rest(sock)
            assert leftover == b"", f"the {name} connection received {leftover[:300]!r}"
            sock.close()
        got = self.slow_got + _rest(self.slow)
        self.slow.close()
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0].split()[1] == b"200", f"the big reply began {got[:300]!r}"
        expected = _expected_body(self.program, BIG_VALUE)
        assert len(body) < len(expected), "the big reply was whole: it was not mid-response"
        assert expected.startswith(body), f"the big reply went astray at {body[:100]!r}"


# -- failover -------------------------------------------------------------------------


def _tail(cluster: Cluster) -> str:
    return "\n".join(
        f"--- {name}:\n" + "\n".join(p.stderr().splitlines()[-12:])
        for name, p in cluster.processes.items()
    )


@pytest.mark.timeout(180)
@pytest.mark.parametrize("program", PROGRAMS, ids=ids(PROGRAMS))
def test_kill_9_with_connections_idle_mid_request_and_mid_response(
    program: Program, arbiter: Cluster, tmp_path: Path
) -> None:
    port = free_port()
    c = Cluster(
        tmp_path,
        service_port=port,
        arbiter_port=arbiter.arbiter_port,
        primary_args=("--pair", f"programs-{program.name}"),
        guest=tuple(program.argv(port)),
    )
    try:
        c.start_replicas(ready=None)
        wait_serving(program, port)
        client(program, port, timeout=60).put(BIG_KEY, BIG_VALUE)
        before = Load(program, port, clients=4, tag="before").start()
        wait_until(lambda: before.acknowledged() >= 30, 30, "the writers are under way")
        held = Held(program, port).open()
        acked_at_kill = before.acknowledged()
        c.kill_primary()
        try:
            wait_until(lambda: status(c.backup_admin)["role"] == "live", 20, "the backup is live")
            held.check_ended()
            wait_until(
                lambda: before.acknowledged() >= acked_at_kill + 30, 30, "writes go on after"
            )
            after = Load(program, port, clients=8, tag="after").start(steps=10)
            after.join(60)
            before.stop()
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{_tail(c)}") from None
        assert_nothing_lost(program, port, before, after)
    finally:
        c.stop()


# -- record and replay ----------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("program", PROGRAMS, ids=ids(PROGRAMS))
def test_record_under_concurrent_clients_and_replay_exactly(
    program: Program, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / f"{program.name}.ftlog"
    argv = program.argv(port)
    with Recording(log, *argv, ready_marker="") as rec:
        wait_serving(program, port)
        load = Load(program, port, clients=4, tag="rec").start(steps=15)
        # A client that gives up half-way through its request, as a reset.
        quitter = socket.create_connection(("127.0.0.1", port), timeout=10)
        quitter.sendall(_request(program, "put", "quitter", "x")[:30])
        quitter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        quitter.close()
        load.join(60)
        assert not load.wrong(), load.wrong()[:3]
        assert not load.verify(port)
        code = rec.stop()
    assert code == 0, f"record exited {code}:\n{rec.stderr[-3000:]}"
    done = run_ftproxy("replay", str(log), "--", *argv)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "identical to the recording" in done.stderr, done.stderr[-3000:]


# -- refused programs -----------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("refused", REFUSED, ids=ids(REFUSED))
def test_a_refused_program_stops_with_exit_3_and_says_what_to_do(
    refused: Refused, tmp_path: Path
) -> None:
    if refused.needs_module and importlib.util.find_spec(refused.needs_module) is None:
        pytest.skip(f"{refused.needs_module} is not installed (the dev extra installs it)")
    port = free_port()
    with Recording(tmp_path / "refused.ftlog", *refused.argv(port), ready_marker="") as rec:
        if refused.needs_request:
            wait_until(
                lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close() is None,
                30,
                "the program listens",
            )
            with pytest.raises((Broken, Wrong)):
                HttpKv(port).get("anything")
        try:
            code = rec.stop(signum=None, timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{refused.name} was not stopped: it runs on") from None
    assert code == 3, f"exit {code}:\n{rec.stderr[-3000:]}"
    assert refused.fix in rec.stderr, rec.stderr[-3000:]
    assert "Traceback" not in rec.stderr, rec.stderr[-3000:]
