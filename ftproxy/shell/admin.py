"""The admin endpoint of a replica: its status over HTTP.

Server side, ``serve_admin`` answers four paths on a small HTTP/1.1 server (h11
speaks the protocol, trio moves the bytes, one task per connection, keep-alive):

- ``GET /status``: the replica's status mapping as JSON;
- ``GET /metrics``: the same numbers in the Prometheus text format (the body comes
  from a metrics source: a replica's is ``ftproxy.shell.metrics``);
- ``GET /healthz``: 200 or 503 and a one-line reason, for probes;
- ``GET /``: a short index.

The status comes from a callable the replica passes in, called once per request;
if it raises, that request gets a 500 and the server goes on. Misbehaving clients
(garbage, timeouts, resets) lose their own connection and nothing else, and
strangers cannot take the replica's descriptors or attention: until a
connection has sent one well-formed request it lives under
``ftproxy.shell.admission``'s limits (2 s to send it, at most 64 such connections,
descriptors kept in reserve for the replica's own needs).

``admin_endpoint`` serves a replica's status board for the life of a block. The
client side, ``ftproxy status``, is ``ftproxy.tools.status``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from typing import Any, Final

import h11
import structlog
import trio

from ftproxy.shell.admission import Admission, Gate, serve_with_limits
from ftproxy.shell.checks import bind_listeners
from ftproxy.shell.options import ReplicaOptions
from ftproxy.shell.status import StatusBoard

log = structlog.get_logger()

StatusSource = Callable[[], Mapping[str, Any]]
# A replica's /metrics body (ftproxy.shell.metrics.ReplicaMetrics.render).
MetricsSource = Callable[[], bytes]
# /healthz: whether the replica serves, or is ready to take over, and why not.
HealthSource = Callable[[], tuple[bool, str]]

METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE: Final = "application/json"
TEXT_CONTENT_TYPE: Final = "text/plain; charset=utf-8"

MAX_RECV: Final = 64 * 1024
# A client has this long to send a whole request head, waiting on a kept-alive
# connection included; then its connection is closed.
REQUEST_TIMEOUT_S: Final = 10.0
# After our last reply on a connection, how long we read (and drop) what the
# client still sends while waiting for its side to close.
CLOSE_TIMEOUT_S: Final = 1.0
_ERROR_MESSAGE_LIMIT: Final = 200

SERVER_HEADER: Final = f"ftproxy-admin {h11.PRODUCT_ID}"
ALLOWED_METHODS: Final = (b"GET", b"HEAD")


_INDEX: Final = (
    "ftproxy replica admin endpoint\n"
    "\n"
    "GET /status   the replica's status as JSON\n"
    "GET /metrics  the same numbers in the Prometheus text format\n"
    "GET /healthz  200 when serving or ready to take over, 503 otherwise (for probes)\n"
)


# -- server --------------------------------------------------------------------


async def serve_admin(
    host: str,
    port: int,
    status: StatusSource,
    *,
    metrics: MetricsSource,
    health: HealthSource | None = None,
    listeners: list[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoint on ``host:port`` until cancelled.

    ``port`` 0 picks a free port; the bound port is reported through
    ``task_status``, so ``await nursery.start(partial(serve_admin, host, 0, status, metrics=...))``
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
    metrics: MetricsSource
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
        if path == b"/metrics":
            return _Reply(200, METRICS_CONTENT_TYPE, sources.metrics())
        body = json.dumps(sources.status(), indent=2, default=_json_default) + "\n"
        return _Reply(200, JSON_CONTENT_TYPE, body.encode())
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
