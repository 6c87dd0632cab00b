"""The admin endpoint: its h11 server (shell.admin); ``ftproxy status`` (tools.status)."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import AsyncIterator, Iterator, Mapping, MutableMapping
from functools import partial
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from ftproxy.shell.admin import serve_admin
from ftproxy.shell.metrics import ReplicaMetrics
from ftproxy.tools.status import (
    AdminUnavailable,
    build_status_parser,
    fetch,
    fetch_status,
    parse_address,
    render_status,
    status_main,
    watch_status,
)

EXAMPLE: dict[str, Any] = {
    "role": "primary",
    "pair": "ftproxy",
    "generation": 1,
    "guest_pid": 1234,
    "uptime_s": 12.5,
    "icount": 123456,
    "log_seq": 5000,
    "acked_seq": 4998,
    "replayed_seq": 4990,
    "held_outputs": 2,
    "lag": {"entries": 10, "bytes": 2048, "ms": 3.2},
    "output_rule": True,
    "peer": {"state": "connected", "silent_ms": 12.0, "address": "127.0.0.1:7100"},
    "arbiter": {"state": "idle", "address": "127.0.0.1:7000"},
    "requests_total": 4000,
    "outputs_total": 4100,
    "log_bytes_total": 123456,
}


class StatusSource:
    """The status callable a replica would pass; ``error`` makes it raise."""

    def __init__(self, status: Mapping[str, Any]) -> None:
        self.status = status
        self.error: Exception | None = None
        self.error_after = 0  # calls answered before ``error`` is raised
        self.calls = 0

    def __call__(self) -> Mapping[str, Any]:
        self.calls += 1
        if self.error is not None and self.calls > self.error_after:
            raise self.error
        return self.status


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured
    # Whatever a test's clients did, no connection task failed in an unforeseen way.
    assert [entry for entry in captured if entry["event"] == "admin_connection_failed"] == []


@pytest.fixture
def source() -> StatusSource:
    return StatusSource(EXAMPLE)


@pytest.fixture
def metrics(source: StatusSource) -> ReplicaMetrics:
    """A replica's metrics, read from the same status source."""
    metrics = ReplicaMetrics()
    metrics.serve_status(source)
    return metrics


@pytest.fixture
async def admin(nursery: trio.Nursery, source: StatusSource, metrics: ReplicaMetrics) -> str:
    port = await nursery.start(partial(serve_admin, "127.0.0.1", 0, source, metrics=metrics.render))
    return f"127.0.0.1:{port}"


@pytest.fixture
async def refused_address() -> AsyncIterator[str]:
    """An address nothing listens on: a port held bound, so no one else takes it."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def connect(address: str) -> trio.SocketStream:
    host, port = parse_address(address)
    return await trio.open_tcp_stream(host, port)


class RawResponse:
    def __init__(self, status_line: bytes, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status_line = status_line
        self.headers = headers
        self.body = body


async def read_response(
    stream: trio.SocketStream, buffer: bytearray, *, head: bool = False
) -> RawResponse:
    """One response off a raw stream, framed by Content-Length; what follows stays in ``buffer``."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some()
        assert chunk, f"connection closed mid-response: {bytes(buffer)!r}"
        buffer += chunk
    head_bytes, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.split(b"\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head else int(headers[b"content-length"])
    end = len(head_bytes) + 4 + length
    while len(buffer) < end:
        chunk = await stream.receive_some()
        assert chunk, "connection closed mid-body"
        buffer += chunk
    body = bytes(buffer[len(head_bytes) + 4 : end])
    del buffer[:end]
    return RawResponse(status_line, headers, body)


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


def get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *extra, "", ""]
    return "\r\n".join(lines).encode()


# -- /metrics of any status ------------------------------------------------------


JSON_KEYS = st.sampled_from(["role", "state", "peer", "arbiter", "lag", "x_total"]) | st.text()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(JSON_KEYS, children, max_size=4)
    ),
    max_leaves=20,
)
STATUS_MAPPINGS = st.dictionaries(JSON_KEYS, JSON_VALUES, max_size=8)


@given(STATUS_MAPPINGS)
def test_replica_metrics_always_speak_the_text_format(status: dict[str, Any]) -> None:
    metrics = ReplicaMetrics()
    metrics.serve_status(lambda: status)
    text = metrics.render().decode()
    names = [family.name for family in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    assert "ftproxy_build_info" in names
    # A state family is there exactly when the status holds that state as a string.
    assert ("ftproxy_role" in names) == isinstance(status.get("role"), str)


@settings(deadline=None)
@given(STATUS_MAPPINGS)
def test_render_status_shows_any_mapping(status: dict[str, Any]) -> None:
    Console(file=io.StringIO(), width=80).print(render_status(status))


def test_render_status_shows_the_example() -> None:
    console = Console(file=io.StringIO(), width=100)
    console.print(render_status(EXAMPLE))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for shown in (
        "primary",
        "generation 1",
        "pid 1234",
        "seq 5,000",
        "acked 4,998",
        "10 entries",
        "2.0 KiB",
        "3.2 ms",
        "2 held",
        "output rule on",
        "connected",
        "127.0.0.1:7100",
        "idle",
        "4,000 requests",
    ):
        assert shown in text


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("127.0.0.1", ":80", "host:0", "host:99999", "host:http"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad)


# -- the server, through fetch and raw sockets -------------------------------------


async def test_status_and_metrics_over_http(admin: str, metrics: ReplicaMetrics) -> None:
    assert await fetch_status(admin) == EXAMPLE
    scraped = await fetch(admin, "/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert scraped.body == metrics.render()
    index = await fetch(admin, "/")
    assert index.status_code == 200
    assert b"/status" in index.body
    assert b"/metrics" in index.body
    assert (await fetch(admin, "/status?pretty=1")).status_code == 200


async def test_healthz_answers_what_the_health_source_says(
    nursery: trio.Nursery, metrics: ReplicaMetrics
) -> None:
    health = [(False, "backup: neither serving nor ready to take over")]
    port = await nursery.start(
        partial(
            serve_admin,
            "127.0.0.1",
            0,
            StatusSource(EXAMPLE),
            metrics=metrics.render,
            health=lambda: health[-1],
        )
    )
    reply = await fetch(f"127.0.0.1:{port}", "/healthz")
    assert (reply.status_code, reply.body) == (
        503,
        b"backup: neither serving nor ready to take over\n",
    )
    health.append((True, "live: serving alone"))
    reply = await fetch(f"127.0.0.1:{port}", "/healthz")
    assert (reply.status_code, reply.body) == (200, b"live: serving alone\n")


async def test_keep_alive_and_pipelining_on_one_connection(
    admin: str, metrics: ReplicaMetrics
) -> None:
    buffer = bytearray()
    async with await connect(admin) as stream:
        await stream.send_all(get("/status"))
        first = await read_response(stream, buffer)
        await stream.send_all(get("/metrics"))
        second = await read_response(stream, buffer)
        await stream.send_all(get("/status") + get("/nope") + get("/metrics"))
        pipelined = [await read_response(stream, buffer) for _ in range(3)]
    assert first.status_line == b"HTTP/1.1 200 OK"
    assert first.headers[b"content-type"] == b"application/json"
    assert json.loads(first.body) == EXAMPLE
    assert second.status_line == b"HTTP/1.1 200 OK"
    assert second.body == metrics.render()
    assert [r.status_line.split()[1] for r in pipelined] == [b"200", b"404", b"200"]
    assert buffer == b""


async def test_head_sends_the_headers_of_get_and_no_body(admin: str) -> None:
    buffer = bytearray()
    async with await connect(admin) as stream:
        await stream.send_all(get("/status").replace(b"GET", b"HEAD", 1))
        head = await read_response(stream, buffer, head=True)
        await stream.send_all(get("/status"))
        full = await read_response(stream, buffer)
    assert head.status_line == b"HTTP/1.1 200 OK"
    assert int(head.headers[b"content-length"]) == len(full.body) > 0
    assert json.loads(full.body) == EXAMPLE  # nothing of a HEAD body came before it


async def test_unknown_path_is_404(admin: str) -> None:
    reply = await fetch(admin, "/nope")
    assert reply.status_code == 404
    assert reply.body == b"not found: /nope (see / for the endpoints)\n"


async def test_other_methods_are_405(admin: str) -> None:
    buffer = bytearray()
    async with await connect(admin) as stream:
        await stream.send_all(b"DELETE /status HTTP/1.1\r\nHost: x\r\n\r\n")
        no_body = await read_response(stream, buffer)
        await stream.send_all(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        )
        with_body = await read_response(stream, buffer)
        rest = await read_to_eof(stream)  # a body nobody reads: the server closes
    for reply in (no_body, with_body):
        assert reply.status_line == b"HTTP/1.1 405 Method Not Allowed"
        assert reply.headers[b"allow"] == b"GET, HEAD"
    assert b"connection" not in no_body.headers
    assert with_body.headers[b"connection"] == b"close"
    assert bytes(buffer) + rest == b""


async def test_garbage_gets_400_and_the_server_goes_on(admin: str) -> None:
    async with await connect(admin) as stream:
        await stream.send_all(b"\x00\x01 this is not HTTP\r\n\r\n")
        reply = await read_to_eof(stream)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in reply.lower()
    async with await connect(admin) as stream:
        await stream.send_all(b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        assert (await read_to_eof(stream)).startswith(b"HTTP/1.1 400 ")
    async with await connect(admin) as stream:  # gone halfway through a request
        await stream.send_all(b"GET /sta")
    assert await fetch_status(admin) == EXAMPLE


async def test_idle_and_slow_connections_are_closed(
    admin: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with await connect(admin) as idle, await connect(admin) as slow:
        await slow.send_all(b"GET /status HTTP/1.1\r\n")
        assert await read_to_eof(idle) == b""
        assert await read_to_eof(slow) == b""
    assert await fetch_status(admin) == EXAMPLE


async def test_failing_status_is_500_and_logged(
    admin: str, source: StatusSource, logs: list[MutableMapping[str, Any]]
) -> None:
    source.error = RuntimeError("replica is\nshutting down")
    for path in ("/status", "/metrics"):
        reply = await fetch(admin, path)
        assert reply.status_code == 500
        assert reply.body == b"status unavailable: RuntimeError: replica is shutting down\n"
    with pytest.raises(AdminUnavailable, match="HTTP 500: status unavailable: RuntimeError"):
        await fetch_status(admin)
    failures = [entry for entry in logs if entry["event"] == "admin_status_failed"]
    assert len(failures) == 3
    assert all(entry["log_level"] == "error" for entry in failures)
    source.error = None
    assert await fetch_status(admin) == EXAMPLE


async def test_status_that_is_not_json_serialisable_is_500(
    admin: str, source: StatusSource
) -> None:
    source.status = {("tuple", "key"): 1}  # type: ignore[dict-item]
    assert (await fetch(admin, "/status")).status_code == 500
    source.status = {"when": object(), "nested": {"ok": 1}}
    assert (await fetch_status(admin))["nested"] == {"ok": 1}  # default=str for the rest


# -- fetch_status's failures ------------------------------------------------------


async def serve_canned(reply: bytes, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A server that answers any request with ``reply`` and closes."""

    async def handler(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some()
        await stream.send_all(reply)
        await stream.aclose()

    await trio.serve_tcp(handler, 0, host="127.0.0.1", task_status=task_status)


async def canned_address(nursery: trio.Nursery, reply: bytes) -> str:
    listeners = await nursery.start(serve_canned, reply)
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_fetch_status_connection_refused(refused_address: str) -> None:
    with pytest.raises(AdminUnavailable) as caught:
        await fetch_status(refused_address)
    assert caught.value.reason == "Connection refused"
    assert str(caught.value) == f"{refused_address}: Connection refused"


async def test_fetch_status_timeout(autojump_clock: trio.testing.MockClock) -> None:
    with trio.socket.socket() as silent:  # accepts in the kernel, never answers
        await silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(AdminUnavailable, match=r"no reply within 2\.5 s"):
            await fetch_status(address, timeout=2.5)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnope!", "the status is not JSON"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", "a JSON list, not an object"),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", "HTTP 503$"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP reply"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "not an HTTP reply"),
    ],
)
async def test_fetch_status_bad_replies(nursery: trio.Nursery, reply: bytes, reason: str) -> None:
    address = await canned_address(nursery, reply)
    with pytest.raises(AdminUnavailable, match=reason):
        await fetch_status(address)


# -- ftproxy status ---------------------------------------------------------------


async def test_status_main_json(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = await trio.to_thread.run_sync(status_main, [admin, "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    assert json.loads(out) == EXAMPLE
    assert err == ""


async def test_status_main_rendered(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = await trio.to_thread.run_sync(status_main, [admin])
    out, err = capsys.readouterr()
    assert code == 0
    assert "primary" in out
    assert "connected" in out
    assert err == ""


async def test_status_main_unreachable(
    refused_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await trio.to_thread.run_sync(status_main, [refused_address, "--timeout", "2"])
    out, err = capsys.readouterr()
    assert code == 3
    assert out == ""
    assert err == f"ftproxy status: cannot read {refused_address}: Connection refused\n"


def test_status_main_rejects_a_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        status_main(["localhost"])
    assert caught.value.code == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_build_status_parser_fits_a_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="ftproxy")
    commands = parser.add_subparsers(dest="command", required=True)
    build_status_parser(commands.add_parser("status"))
    args = parser.parse_args(["status", "127.0.0.1:9", "--watch", "2", "--json"])
    assert (args.address, args.watch, args.json, args.timeout) == ("127.0.0.1:9", 2.0, True, 5.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["status", "127.0.0.1:9", "--watch", "0"])


async def test_watch_shows_a_replica_going_away(admin: str, source: StatusSource) -> None:
    source.error, source.error_after = RuntimeError("stopped"), 1
    console = Console(file=io.StringIO(), width=100)
    await watch_status(admin, 0.01, console=console, refreshes=3)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "primary" in text  # the last status, still shown
    assert f"cannot read {admin}: HTTP 500: status unavailable: RuntimeError: stopped" in text
    assert source.calls == 3


async def test_watch_json_prints_a_line_each_refresh(admin: str) -> None:
    console = Console(file=io.StringIO())
    await watch_status(admin, 0.01, console=console, as_json=True, refreshes=2)
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert [json.loads(line) for line in lines] == [EXAMPLE, EXAMPLE]


async def test_watch_needs_a_first_answer(refused_address: str) -> None:
    with pytest.raises(AdminUnavailable, match="Connection refused"):
        await watch_status(refused_address, 1.0, console=Console(file=io.StringIO()))


def test_render_status_shows_the_packet_front_in_one_row() -> None:
    status = {
        **EXAMPLE,
        "front": {
            "mode": "packet",
            "vip": "10.200.0.100",
            "mac": "02:00:0a:c8:00:64",
            "interface": "eth0",
            "frames_in": 1200,
            "frames_received": 1500,
            "frames_filtered": 300,
            "frames_sent": 1100,
            "frames_dropped_in": 0,
            "frames_dropped_out": 2,
            "checksums_completed": 900,
        },
    }
    console = Console(file=io.StringIO(), width=120)
    console.print(render_status(status))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    row = next(line for line in text.splitlines() if "front" in line)
    for shown in (
        "packet",
        "10.200.0.100",
        "on eth0",
        "1,200 frames in",
        "1,100 out",
        "2 dropped out",
    ):
        assert shown in row
    assert "frames_filtered" not in text  # counted, but not what a user reads
