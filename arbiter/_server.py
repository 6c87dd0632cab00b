"""The arbiter's trio server: one task per connection around the sans-I/O protocol.

A connection that sends garbage, fails authentication or stalls is logged and
closed; every other connection, and the server, carry on. Until a client has
proved the secret it lives under ``ftproxy.shell.admission``'s limits (a short time
to finish the opening, a cap on such connections, descriptors kept in
reserve), so a flood of strangers cannot keep a replica from its decision. Only a store that
cannot be written stops the server (a decision that may or may not be on disk
must be read back from it before anything else is decided).
"""

from __future__ import annotations

import contextlib
import os
from functools import partial
from typing import Final, NoReturn

import structlog
import trio
from structlog.typing import FilteringBoundLogger

from arbiter._protocol import (
    MAX_REASON_LENGTH,
    Authenticated,
    Connection,
    ConnectionClosed,
    Decision,
    Error,
    Query,
    RemoteProtocolError,
    Side,
    State,
    TestAndSet,
    Undecided,
)
from arbiter._store import Store
from ftproxy.shell.admission import Admission, Gate, RejectionLog, serve_with_limits
from ftproxy.shell.pump import pump_event

__all__ = ["IDLE_TIMEOUT", "serve"]

IDLE_TIMEOUT: Final = 60.0
"""Seconds an authenticated connection may stay silent between requests before it is closed."""

_RECEIVE_SIZE: Final = 65536

logger = structlog.get_logger()


async def serve(
    listen_host: str,
    listen_port: int,
    data_dir: str | os.PathLike[str],
    secret: bytes | None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve test-and-set on ``listen_host:listen_port`` until cancelled.

    ``secret=None`` serves in insecure mode (clients must be insecure too).
    With ``nursery.start(serve, ...)``, the start returns the bound port once
    the store is loaded and the server listens (so port 0 works); a store that
    cannot be opened raises :class:`~arbiter._store.StoreError` from the start.
    Each listening address is logged as ``arbiter_listening``.
    """
    with Store.open(data_dir) as store:
        listeners = await trio.open_tcp_listeners(listen_port, host=listen_host)
        for listener in listeners:
            host, port = listener.socket.getsockname()[:2]
            logger.info(
                "arbiter_listening",
                host=host,
                port=port,
                data_dir=os.fspath(data_dir),
                decisions=len(store),
                secure=secret is not None,
            )
        rejected = RejectionLog("peer_rejected", port="arbiter", level="error")
        admission = Admission("arbiter", rejections=rejected)
        handler = partial(_handle_connection, store=store, secret=secret, rejected=rejected)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_with_limits, listeners, handler, admission)
            task_status.started(listeners[0].socket.getsockname()[1])
    raise AssertionError("serve_listeners returned")  # pragma: no cover


async def _handle_connection(
    stream: trio.abc.Stream,
    gate: Gate,
    *,
    store: Store,
    secret: bytes | None,
    rejected: RejectionLog,
    peer: str | None = None,
) -> None:
    """One client's conversation on any ``trio.abc.Stream`` (``peer``: its name)."""
    if peer is None:
        peer = "unknown"
        if isinstance(stream, trio.SocketStream):
            with contextlib.suppress(OSError):  # already gone
                peer = _format_address(stream.socket.getpeername())
    log = logger.bind(peer=peer)
    conn = Connection(Side.SERVER, secret)
    async with stream:
        try:
            await _converse(stream, conn, store, log, gate)
        except RemoteProtocolError as exc:
            rejected(peer, str(exc))
            if conn.state is State.ERROR:
                await _send_quietly(stream, conn.send(Error(str(exc)[:MAX_REASON_LENGTH])))
        except trio.TooSlowError:
            log.warning("peer_timed_out", state=conn.state.name, timeout=IDLE_TIMEOUT)
            await _send_quietly(stream, conn.send(Error("idle for too long")))
        except (trio.BrokenResourceError, OSError) as exc:
            log.warning("connection_lost", state=conn.state.name, reason=str(exc))


async def _converse(
    stream: trio.abc.Stream,
    conn: Connection,
    store: Store,
    log: FilteringBoundLogger,
    gate: Gate,
) -> None:
    state = conn.state

    async def receive() -> bytes:
        # The state the peer leaves the conversation in, should this read be its end.
        nonlocal state
        state = conn.state
        with trio.fail_after(IDLE_TIMEOUT):
            return bytes(await stream.receive_some(_RECEIVE_SIZE))

    while True:
        event = await pump_event(conn, receive, stream.send_all)
        if isinstance(event, Authenticated):
            gate.proved()
            log.debug("peer_authenticated", secure=event.secure)
        elif isinstance(event, TestAndSet):
            reply = _decide(store, event, log)
            await stream.send_all(conn.send(reply))
        elif isinstance(event, Query):
            winner = store.get(event.key)
            answer = Undecided(event.key) if winner is None else Decision(event.key, winner, False)
            await stream.send_all(conn.send(answer))
        elif isinstance(event, ConnectionClosed):
            # Between requests a close is the normal end; anywhere else the peer gave up.
            report = log.debug if state is State.IDLE else log.info
            report("peer_disconnected", state=state.name)
            return
        else:  # pragma: no cover - a server never receives replies (the protocol refuses them)
            raise AssertionError(f"unexpected event {event!r}")


def _decide(store: Store, request: TestAndSet, log: FilteringBoundLogger) -> Decision:
    # Runs in the event loop on purpose: decisions are rare and one fsync is
    # cheap, and running it inline makes each test-and-set atomic with respect
    # to every other connection without a lock.
    key, candidate = request.key, request.candidate
    decided_before = store.get(key) is not None
    try:
        winner, won = store.decide(key, candidate)
    except Exception:
        log.critical("store_failed", key=key, candidate=candidate, exc_info=True)
        raise
    if not decided_before:
        log.info("key_decided", key=key, winner=winner)
    else:
        log.debug("decision_repeated", key=key, winner=winner, candidate=candidate, won=won)
    return Decision(key, winner, won)


async def _send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    """Best-effort last words before closing; the peer may already be gone."""
    with (
        trio.move_on_after(1.0),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        await stream.send_all(data)


def _format_address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)
