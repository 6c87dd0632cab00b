"""The admin endpoint of a replica: its status over HTTP, and ``ftproxy status`` to read it.

Server side, ``serve_admin`` answers four paths on a small HTTP/1.1 server (h11
speaks the protocol, trio moves the bytes, one task per connection, keep-alive):

- ``GET /status``: the replica's status mapping as JSON;
- ``GET /metrics``: the same numbers in the Prometheus text format (a replica's come
  from ``ftproxy.shell.metrics``; without a metrics source, ``render_metrics`` of the status);
- ``GET /healthz``: 200 or 503 and a one-line reason, for probes;
- ``GET /``: a short index.

The status comes from a callable the replica passes in, called once per request;
if it raises, that request gets a 500 and the server goes on. Misbehaving clients
(garbage, timeouts, resets) lose their own connection and nothing else, and
strangers cannot take the replica's descriptors or attention: until a
connection has sent one well-formed request it lives under
``ftproxy.shell.admission``'s limits (2 s to send it, at most 64 such connections,
descriptors kept in reserve for the replica's own needs).

Client side, ``fetch_status`` reads a replica's status, ``render_status`` shows it
for people, and ``status_main`` / ``run_status`` are the ``ftproxy status`` command.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from typing import Any, Final

import h11
import structlog
import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ftproxy.shell.admission import Admission, Gate, serve_with_limits
from ftproxy.shell.checks import bind_listeners
from ftproxy.shell.options import ReplicaOptions
from ftproxy.shell.status import StatusBoard

log = structlog.get_logger()

StatusSource = Callable[[], Mapping[str, Any]]
# A replica's /metrics body (ftproxy.shell.metrics); without one, render_metrics(status).
MetricsSource = Callable[[], bytes]
# /healthz: whether the replica serves, or is ready to take over, and why not.
HealthSource = Callable[[], tuple[bool, str]]

METRIC_PREFIX: Final = "ftproxy"
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE: Final = "application/json"
TEXT_CONTENT_TYPE: Final = "text/plain; charset=utf-8"

# String leaves that become info-style gauges: ``ftproxy_role{role="primary"} 1``.
INFO_LEAVES: Final = frozenset(
    {("role",), ("peer", "state"), ("arbiter", "state"), ("catch_up", "state")}
)

MAX_RECV: Final = 64 * 1024
# A client has this long to send a whole request head, waiting on a kept-alive
# connection included; then its connection is closed.
REQUEST_TIMEOUT_S: Final = 10.0
# After our last reply on a connection, how long we read (and drop) what the
# client still sends while waiting for its side to close.
CLOSE_TIMEOUT_S: Final = 1.0
MAX_REPLY_BYTES: Final = 16 * 1024 * 1024
_ERROR_MESSAGE_LIMIT: Final = 200

SERVER_HEADER: Final = f"ftproxy-admin {h11.PRODUCT_ID}"
ALLOWED_METHODS: Final = (b"GET", b"HEAD")

# Exit codes of ``ftproxy status`` (the same values as ``ftproxy.cli``).
EXIT_OK: Final = 0
EXIT_UNAVAILABLE: Final = 3
EXIT_INTERRUPTED: Final = 130

_INDEX: Final = (
    "ftproxy replica admin endpoint\n"
    "\n"
    "GET /status   the replica's status as JSON\n"
    "GET /metrics  the same numbers in the Prometheus text format\n"
    "GET /healthz  200 when serving or ready to take over, 503 otherwise (for probes)\n"
)


# -- Prometheus text format --------------------------------------------------


def render_metrics(status: Mapping[str, Any]) -> str:
    """The status mapping in the Prometheus text exposition format (version 0.0.4).

    Every numeric leaf becomes one gauge named after its path (nested keys joined
    by ``_``, characters a metric name cannot hold replaced by ``_``); bools are
    0/1; a name ending in ``_total`` is a counter. The string leaves in
    ``INFO_LEAVES`` become info-style gauges; other leaves (strings, lists, None)
    are left out. Where two paths give the same name, the first one wins.
    """
    lines: list[str] = []
    seen: set[str] = set()
    for path, value in _leaves(status):
        name = metric_name(path)
        if isinstance(value, int | float):  # bool is an int
            sample = f"{name} {_format_sample_value(value)}"
        elif isinstance(value, str) and path in INFO_LEAVES:
            sample = f'{name}{{{path[-1]}="{escape_label_value(value)}"}} 1'
        else:
            continue
        if name in seen:
            continue
        seen.add(name)
        kind = "counter" if name.endswith("_total") else "gauge"
        lines.append(f"# TYPE {name} {kind}\n{sample}\n")
    return "".join(lines)


def metric_name(path: tuple[str, ...]) -> str:
    """``("lag", "ms")`` -> ``ftproxy_lag_ms``, valid whatever the keys hold."""
    return re.sub(r"[^A-Za-z0-9_]", "_", "_".join((METRIC_PREFIX, *path)))


def escape_label_value(value: str) -> str:
    """A label value as the text format quotes it: backslash, quote and newline escaped."""
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _leaves(
    mapping: Mapping[Any, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in mapping.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            yield from _leaves(value, path)
        else:
            yield path, value


def _format_sample_value(value: int | float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


# -- server --------------------------------------------------------------------


async def serve_admin(
    host: str,
    port: int,
    status: StatusSource,
    *,
    metrics: MetricsSource | None = None,
    health: HealthSource | None = None,
    listeners: list[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoint on ``host:port`` until cancelled.

    ``port`` 0 picks a free port; the bound port is reported through
    ``task_status``, so ``await nursery.start(serve_admin, host, 0, status)``
    returns it once the endpoint accepts connections. ``listeners``: already bound
    for ``host:port`` by the caller.
    """
    if listeners is None:  # else bound already, so that a busy port fails at start
        listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0 and len(listeners) > 1:
        # Each address family got a port of its own; keep one, so the port we
        # report is the whole truth.
        for extra in listeners[1:]:
            extra.socket.close()
        listeners = listeners[:1]
    bound = int(listeners[0].socket.getsockname()[1])
    log.info("admin_server_started", host=host, port=bound)
    task_status.started(bound)

    sources = _Sources(status, metrics, health)

    async def handler(stream: trio.SocketStream, gate: Gate) -> None:
        await _handle_connection(stream, sources, gate)

    await serve_with_limits(listeners, handler, Admission("admin"))


@dataclass(frozen=True)
class _Sources:
    status: StatusSource
    metrics: MetricsSource | None
    health: HealthSource | None


@dataclass(frozen=True)
class _Reply:
    status_code: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


async def _handle_connection(
    stream: trio.SocketStream, sources: _Sources, gate: Gate | None = None
) -> None:
    """One client connection; whatever happens on it stays on it."""
    try:
        async with stream:
            await _serve_connection(h11.Connection(h11.SERVER), stream, sources, gate)
    except trio.BrokenResourceError:
        log.debug("admin_connection_dropped")
    except Exception:
        log.exception("admin_connection_failed")


async def _serve_connection(
    conn: h11.Connection, stream: trio.SocketStream, sources: _Sources, gate: Gate | None
) -> None:
    while True:
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                request = await _receive_request_head(conn, stream)
                # A GET or HEAD has no body, so h11 holds the end of the request
                # already. A request with a body gets its reply and then the
                # connection is closed, rather than reading a body nothing here wants.
                has_body = request is not None and not isinstance(
                    conn.next_event(), h11.EndOfMessage
                )
        except trio.TooSlowError:
            log.debug("admin_connection_timed_out", client_state=conn.their_state.__name__)
            return
        except h11.RemoteProtocolError as exc:
            log.debug("admin_request_rejected", reason=str(exc))
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                reply = _text_reply(exc.error_status_hint, f"bad request: {_shorten(str(exc))}")
                await _send_reply(conn, stream, reply, head=False, close=True)
                await _close_gracefully(stream)
            return
        if request is None:  # the client closed between requests
            return
        if gate is not None:
            gate.proved()
        reply = _route(request.method, request.target, sources)
        log.debug(
            "admin_request_served",
            method=request.method.decode("ascii", "replace"),
            target=request.target.decode("ascii", "replace"),
            status_code=reply.status_code,
        )
        await _send_reply(conn, stream, reply, head=request.method == b"HEAD", close=has_body)
        if conn.our_state is h11.MUST_CLOSE:
            await _close_gracefully(stream)
            return
        conn.start_next_cycle()


async def _receive_request_head(
    conn: h11.Connection, stream: trio.SocketStream
) -> h11.Request | None:
    """The next request's head, or None if the client closed the connection first."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_RECV))
        elif isinstance(event, h11.Request):
            return event
        elif isinstance(event, h11.ConnectionClosed):
            return None
        else:  # h11 lets nothing else through while the client is IDLE
            raise AssertionError(f"unexpected h11 event before a request: {event!r}")


async def _send_reply(
    conn: h11.Connection,
    stream: trio.SocketStream,
    reply: _Reply,
    *,
    head: bool,
    close: bool = False,
) -> None:
    headers = [
        ("Date", formatdate(usegmt=True)),
        ("Server", SERVER_HEADER),
        ("Content-Type", reply.content_type),
        ("Content-Length", str(len(reply.body))),
        ("Cache-Control", "no-store"),
        *reply.headers,
    ]
    if close:
        headers.append(("Connection", "close"))
    reason = HTTPStatus(reply.status_code).phrase
    data = conn.send(h11.Response(status_code=reply.status_code, headers=headers, reason=reason))
    if not head:  # HEAD: the same headers, and h11 expects no body
        data += conn.send(h11.Data(data=reply.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _close_gracefully(stream: trio.SocketStream) -> None:
    """Half-close, and wait a little for the client's side to close too.

    Closing a socket with unread input makes the kernel answer with a reset, which
    can destroy our last reply before the client reads it.
    """
    await stream.send_eof()
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        while await stream.receive_some(MAX_RECV):
            pass


def _route(method: bytes, target: bytes, sources: _Sources) -> _Reply:
    path = target.partition(b"?")[0]
    if path not in (b"/", b"/status", b"/metrics", b"/healthz"):
        shown = _shorten(path.decode("ascii", "replace"))
        return _text_reply(404, f"not found: {shown} (see / for the endpoints)")
    if method not in ALLOWED_METHODS:
        shown = method.decode("ascii", "replace")
        return _text_reply(
            405,
            f"method not allowed: {shown} (use GET or HEAD)",
            headers=(("Allow", "GET, HEAD"),),
        )
    if path == b"/":
        return _Reply(200, TEXT_CONTENT_TYPE, _INDEX.encode())
    try:
        if path == b"/healthz":
            healthy, why = sources.health() if sources.health else (True, "up")
            return _text_reply(200 if healthy else 503, why)
        if path == b"/metrics" and sources.metrics is not None:
            return _Reply(200, METRICS_CONTENT_TYPE, sources.metrics())
        snapshot = sources.status()
        if path == b"/status":
            body = json.dumps(snapshot, indent=2, default=_json_default) + "\n"
            return _Reply(200, JSON_CONTENT_TYPE, body.encode())
        return _Reply(
            200, METRICS_CONTENT_TYPE, render_metrics(snapshot).encode("utf-8", "replace")
        )
    except Exception as exc:
        log.exception("admin_status_failed", path=path.decode("ascii"))
        return _text_reply(500, f"status unavailable: {_one_line(exc)}")


def _json_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    return str(value)


def _text_reply(
    status_code: int, message: str, *, headers: tuple[tuple[str, str], ...] = ()
) -> _Reply:
    return _Reply(status_code, TEXT_CONTENT_TYPE, f"{message}\n".encode(), headers)


def _one_line(exc: BaseException) -> str:
    return _shorten(f"{type(exc).__name__}: {exc}")


def _shorten(text: str) -> str:
    """One line of at most ``_ERROR_MESSAGE_LIMIT`` characters."""
    text = " ".join(text.split())
    if len(text) > _ERROR_MESSAGE_LIMIT:
        text = text[: _ERROR_MESSAGE_LIMIT - 3] + "..."
    return text


# -- client ----------------------------------------------------------------------


class AdminUnavailable(Exception):
    """A replica's admin endpoint did not give a usable answer, and why."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"{address}: {reason}")
        self.address = address
        self.reason = reason


@dataclass(frozen=True)
class AdminResponse:
    """A complete HTTP reply from an admin endpoint."""

    status_code: int
    headers: dict[str, str]
    body: bytes


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) -> ``(host, port)``; ValueError if malformed."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port_text)


async def fetch(address: str, path: str = "/status", *, timeout: float = 5.0) -> AdminResponse:
    """GET ``path`` from the admin endpoint at ``HOST:PORT``, whatever the status code.

    Raises AdminUnavailable if there is no complete HTTP reply within ``timeout``
    seconds, ValueError if ``address`` is not ``HOST:PORT``.
    """
    host, port = parse_address(address)
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                return await _get(stream, _host_header(host, port), path, address)
    except trio.TooSlowError:
        raise AdminUnavailable(address, f"no reply within {timeout:g} s") from None
    except OSError as exc:
        raise AdminUnavailable(address, _connect_failure(exc)) from exc
    except trio.BrokenResourceError as exc:
        raise AdminUnavailable(address, f"connection lost: {exc.__cause__ or exc}") from exc
    except h11.RemoteProtocolError as exc:
        raise AdminUnavailable(address, f"not an HTTP reply: {exc}") from exc


async def fetch_status(address: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """The status mapping a replica serves at ``HOST:PORT``; AdminUnavailable if none."""
    reply = await fetch(address, "/status", timeout=timeout)
    if reply.status_code != 200:
        detail = reply.body.decode("utf-8", "replace").strip().splitlines()
        raise AdminUnavailable(
            address, f"HTTP {reply.status_code}" + (f": {detail[0]}" if detail else "")
        )
    try:
        status = json.loads(reply.body)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise AdminUnavailable(address, f"the status is not JSON ({exc})") from exc
    if not isinstance(status, dict):
        raise AdminUnavailable(
            address, f"the status is a JSON {type(status).__name__}, not an object"
        )
    return status


async def _get(
    stream: trio.SocketStream, host_header: str, path: str, address: str
) -> AdminResponse:
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=path,
        headers=[
            ("Host", host_header),
            ("User-Agent", "ftproxy-status"),
            ("Accept", "*/*"),
            ("Connection", "close"),
        ],
    )
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    response: h11.Response | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_RECV))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REPLY_BYTES:
                raise AdminUnavailable(address, f"reply larger than {MAX_REPLY_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None  # h11 orders the events
            headers = {
                name.decode("ascii"): value.decode("latin-1") for name, value in response.headers
            }
            return AdminResponse(response.status_code, headers, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            raise AdminUnavailable(address, "connection closed before a complete reply")
        # InformationalResponse (1xx): wait for the real one.


def _host_header(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _connect_failure(exc: OSError) -> str:
    """'Connection refused' rather than trio's 'all attempts to connect ... failed'."""
    group = exc.__cause__
    causes = group.exceptions if isinstance(group, BaseExceptionGroup) else (exc,)
    reasons: list[str] = []
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno is not None and cause.errno > 0:
            reason = os.strerror(cause.errno)
        elif isinstance(cause, OSError) and cause.strerror:
            reason = cause.strerror  # resolver errors carry a negative code
        else:
            reason = str(cause)
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons)


# -- for people ------------------------------------------------------------------

_ROLE_STYLES: Final = {"primary": "bold green", "backup": "bold cyan", "live": "bold green"}
_GOOD_STATES: Final = frozenset({"connected", "idle", "ok", "alive", "live", "protected"})
# Keys the panel shows in its title and fixed rows; anything else gets a row of its own.
_SHOWN_KEYS: Final = frozenset(
    {
        "role", "pair", "generation", "guest_pid", "uptime_s", "icount", "log_seq",
        "acked_seq", "replayed_seq", "held_outputs", "output_rule", "requests_total",
        "outputs_total", "log_bytes_total", "exits_total", "input_bytes_total",
        "protected", "failovers_total", "divergences_total",
    }
)  # fmt: skip
_SHOWN_NESTED: Final = {
    "lag": frozenset({"entries", "bytes", "ms"}),
    "peer": frozenset({"state", "silent_ms", "address"}),
    "arbiter": frozenset({"state", "silent_ms", "address"}),
    "channel_rtt_ms": frozenset({"p50", "p99", "samples"}),
    "lag_ms": frozenset({"p50", "p99", "samples"}),
    "catch_up": frozenset(
        {"state", "peer", "generation", "target_seq", "acked_seq", "replayed_seq"}
        | {"entries_sent", "bytes_sent", "elapsed_s", "entries_per_s"}
    ),
    "log_store": frozenset({"path", "entries", "bytes", "error"}),
    "front": frozenset(
        {
            "mode",
            "vip",
            "interface",
            "connections",
            "frames_in",
            "frames_received",
            "frames_filtered",
            "frames_sent",
            "frames_dropped_in",
            "frames_dropped_out",
            "mac",
            "checksums_completed",
        }
    ),
}
_MISSING: Final = object()


def render_status(status: Mapping[str, Any]) -> RenderableType:
    """A compact panel of what ``status`` holds; keys it does not know are listed at the end."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", justify="right", no_wrap=True)
    table.add_column()

    def row(label: str, *parts: Text | None) -> None:
        present = [part for part in parts if part is not None]
        if present:
            table.add_row(Text(label), Text(" · ", style="dim").join(present))

    row(
        "guest",
        _labelled("pid", status, "guest_pid", str),
        _labelled("up", status, "uptime_s", _duration),
        _labelled("icount", status, "icount", _count),
    )
    row(
        "log",
        _labelled("seq", status, "log_seq", _count),
        _labelled("acked", status, "acked_seq", _count),
        _labelled("replayed", status, "replayed_seq", _count),
    )
    row(
        "lag",
        _suffixed(status, ("lag", "entries"), _count, "entries"),
        _value(status, ("lag", "bytes"), _bytes),
        _value(status, ("lag", "ms"), _millis),
    )
    row(
        "lag p50/p99",
        _value(status, ("lag_ms", "p50"), _millis),
        _value(status, ("lag_ms", "p99"), _millis),
    )
    row(
        "log rtt p50/p99",
        _value(status, ("channel_rtt_ms", "p50"), _millis),
        _value(status, ("channel_rtt_ms", "p99"), _millis),
    )
    row(
        "front",
        _value(status, ("front", "mode"), str),
        _value(status, ("front", "vip"), str),
        _labelled("on", status, ("front", "interface"), str),
        _suffixed(status, ("front", "connections"), _count, "connections"),
        _suffixed(status, ("front", "frames_in"), _count, "frames in"),
        _suffixed(status, ("front", "frames_sent"), _count, "out"),
        _suffixed(status, ("front", "frames_dropped_in"), _count, "dropped in"),
        _suffixed(status, ("front", "frames_dropped_out"), _count, "dropped out"),
    )
    row("outputs", _suffixed(status, ("held_outputs",), _count, "held"), _output_rule(status))
    row("protected", _protected(status))
    row(
        "catch-up",
        _state(_field(status, "catch_up", "state")),
        _value(status, ("catch_up", "peer"), str),
        _labelled("replayed", status, ("catch_up", "replayed_seq"), _count),
        _labelled("acked", status, ("catch_up", "acked_seq"), _count),
        _suffixed(status, ("catch_up", "entries_sent"), _count, "sent"),
        _value(status, ("catch_up", "bytes_sent"), _bytes),
        _suffixed(status, ("catch_up", "entries_per_s"), _count, "entries/s"),
        _labelled("in", status, ("catch_up", "elapsed_s"), _duration),
    )
    row(
        "log store",
        _value(status, ("log_store", "path"), str),
        _suffixed(status, ("log_store", "entries"), _count, "entries"),
        _value(status, ("log_store", "bytes"), _bytes),
        _store_error(status),
    )
    for name in ("peer", "arbiter"):
        row(
            name,
            _state(_field(status, name, "state")),
            _labelled("silent", status, (name, "silent_ms"), _millis),
            _value(status, (name, "address"), str),
        )
    row(
        "totals",
        _suffixed(status, ("requests_total",), _count, "requests"),
        _suffixed(status, ("exits_total",), _count, "exits"),
        _suffixed(status, ("outputs_total",), _count, "outputs"),
        _suffixed(status, ("input_bytes_total",), _bytes, "client input"),
        _suffixed(status, ("log_bytes_total",), _bytes, "logged"),
        _suffixed(status, ("failovers_total",), _count, "failovers"),
        _suffixed(status, ("divergences_total",), _count, "divergences"),
    )
    for key, value in status.items():  # what the rows above leave out
        shown_inside = _SHOWN_NESTED.get(key)
        if shown_inside is not None and isinstance(value, Mapping):
            for inner, inner_value in value.items():
                if inner not in shown_inside:
                    table.add_row(Text(f"{key}.{inner}"), Text(_plain(inner_value)))
        elif key not in _SHOWN_KEYS:
            table.add_row(Text(str(key)), Text(_plain(value)))

    role = _plain(status.get("role", "role unknown"))
    if status.get("address_busy"):  # live, but an old primary holds the address
        role = f"{role}, address busy"
    title = Text.assemble(
        (_plain(status.get("pair", "ftproxy")), "bold"),
        "  ",
        (role, _ROLE_STYLES.get(role, "bold yellow")),
        (f"  generation {_plain(status['generation'])}" if "generation" in status else "", "dim"),
    )
    if not table.rows:
        return Panel(
            Text("(empty status)", style="dim"), title=title, title_align="left", expand=False
        )
    return Panel(table, title=title, title_align="left", expand=False)


def _protected(status: Mapping[str, Any]) -> Text | None:
    value = status.get("protected", _MISSING)
    if value is _MISSING:
        return None
    if value is True:
        return Text("yes: a backup holds the whole log", style="green")
    return Text("no: a fault now would lose the service", style="bold red")


def _store_error(status: Mapping[str, Any]) -> Text | None:
    error = _field(status, "log_store", "error")
    return None if error is _MISSING or error is None else Text(_plain(error), style="bold red")


def _field(status: Mapping[str, Any], *path: str) -> Any:
    value: Any = status
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _value(
    status: Mapping[str, Any], path: tuple[str, ...], fmt: Callable[[Any], str]
) -> Text | None:
    value = _field(status, *path)
    return None if value is _MISSING else Text(_safe(fmt, value))


def _labelled(
    label: str, status: Mapping[str, Any], path: str | tuple[str, ...], fmt: Callable[[Any], str]
) -> Text | None:
    value = _field(status, *((path,) if isinstance(path, str) else path))
    return None if value is _MISSING else Text.assemble((f"{label} ", "dim"), _safe(fmt, value))


def _suffixed(
    status: Mapping[str, Any], path: tuple[str, ...], fmt: Callable[[Any], str], suffix: str
) -> Text | None:
    value = _field(status, *path)
    return None if value is _MISSING else Text.assemble(_safe(fmt, value), (f" {suffix}", "dim"))


def _output_rule(status: Mapping[str, Any]) -> Text | None:
    value = status.get("output_rule", _MISSING)
    if value is _MISSING:
        return None
    if value is True:
        return Text("output rule on", style="green")
    if value is False:
        return Text("output rule OFF (unsafe)", style="bold red")
    return Text(f"output rule {_plain(value)}", style="yellow")


def _state(value: Any) -> Text | None:
    if value is _MISSING:
        return None
    good = isinstance(value, str) and value in _GOOD_STATES
    return Text(_plain(value), style="green" if good else "bold yellow")


def _safe(fmt: Callable[[Any], str], value: Any) -> str:
    """``fmt(value)``, or the value as it is when it is not of the kind ``fmt`` expects."""
    try:
        return fmt(value)
    except (TypeError, ValueError, OverflowError):
        return _plain(value)


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):  # keys JSON cannot hold, a reference cycle
        return repr(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(value)
    return float(value)


def _count(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{_number(value):,.1f}"


def _millis(value: Any) -> str:
    return f"{_number(value):.1f} ms"


def _bytes(value: Any) -> str:
    size = _number(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _duration(value: Any) -> str:
    seconds = _number(value)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


# -- ftproxy status --------------------------------------------------------------


def build_status_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``ftproxy status`` to ``parser`` (a subcommand's, or a fresh one)."""
    parser.add_argument(
        "address", metavar="HOST:PORT", type=_address_argument, help="a replica's admin endpoint"
    )
    parser.add_argument("--json", action="store_true", help="print the raw status as JSON")
    parser.add_argument(
        "--watch",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS until Ctrl-C (with --json: one JSON line each time)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the replica (default 5)",
    )
    return parser


def run_status(args: argparse.Namespace, *, console: Console | None = None) -> int:
    """Run ``ftproxy status`` with parsed arguments; returns the exit code."""
    console = console or Console()
    try:
        if args.watch is None:
            status = trio.run(partial(fetch_status, args.address, timeout=args.timeout))
            if args.json:
                console.file.write(json.dumps(status, indent=2, default=str) + "\n")
            else:
                console.print(render_status(status))
            return EXIT_OK
        trio.run(
            partial(
                watch_status,
                args.address,
                args.watch,
                console=console,
                timeout=args.timeout,
                as_json=args.json,
            )
        )
        return EXIT_OK
    except AdminUnavailable as exc:
        print(f"ftproxy status: cannot read {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        # Ctrl-C is how a watch ends; anywhere else it is an interruption.
        return EXIT_OK if args.watch is not None else EXIT_INTERRUPTED


def status_main(argv: list[str] | None = None) -> int:
    """``ftproxy status HOST:PORT [--json] [--watch SECONDS]`` as a program of its own."""
    parser = argparse.ArgumentParser(
        prog="ftproxy status", description="Show a replica's status from its admin endpoint."
    )
    build_status_parser(parser)
    return run_status(parser.parse_args(argv))


async def watch_status(
    address: str,
    interval: float,
    *,
    console: Console,
    timeout: float = 5.0,
    as_json: bool = False,
    refreshes: int | None = None,
) -> None:
    """Show the status every ``interval`` seconds, ``refreshes`` times or until cancelled.

    The first read must succeed (else AdminUnavailable). After that, a replica that
    stops answering is shown as such under its last status and watching goes on,
    so a failover can be watched from either side. With ``as_json``, each refresh
    is one line of JSON on the console's file, and failures go to stderr.
    """
    status = await fetch_status(address, timeout=timeout)
    error: AdminUnavailable | None = None
    with contextlib.ExitStack() as stack:
        live = None
        if not as_json:
            live = stack.enter_context(
                Live(
                    console=console,
                    auto_refresh=False,
                    redirect_stdout=False,
                    redirect_stderr=False,
                )
            )
        for shown in itertools.count(1):
            if live is not None:
                live.update(_watch_frame(status, error, interval), refresh=True)
            elif error is not None:
                print(f"ftproxy status: cannot read {error}", file=sys.stderr, flush=True)
            else:
                console.file.write(json.dumps(status, default=str) + "\n")
                console.file.flush()
            if refreshes is not None and shown >= refreshes:
                return
            await trio.sleep(interval)
            try:
                status, error = await fetch_status(address, timeout=timeout), None
            except AdminUnavailable as exc:
                error = exc


def _watch_frame(
    status: Mapping[str, Any], error: AdminUnavailable | None, interval: float
) -> RenderableType:
    now = time.strftime("%H:%M:%S")
    if error is None:
        footer = Text(f"updated {now} · every {interval:g} s · Ctrl-C to stop", style="dim")
    else:
        footer = Text(f"{now} cannot read {error} (last status shown above)", style="bold red")
    return Group(render_status(status), footer)


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is Ctrl-C, alone or as the only thing in (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_interrupted(inner) for inner in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


def _address_argument(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


@contextlib.asynccontextmanager
async def admin_endpoint(options: ReplicaOptions, board: StatusBoard) -> AsyncIterator[None]:
    """Serve /status, /metrics and /healthz for the life of the block, when asked to.

    The port is bound before the block starts: busy, it is a StartupError.
    """
    if options.admin is None:
        yield
        return
    listeners = await bind_listeners("--admin", options.admin)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(
                serve_admin,
                options.admin[0],
                options.admin[1],
                board.snapshot,
                metrics=board.metrics.render,
                health=board.health,
                listeners=listeners,
            )
        )
        log.info("admin_listening", address=f"{options.admin[0]}:{port}")
        yield
        nursery.cancel_scope.cancel()
