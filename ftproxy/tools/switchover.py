"""``ftproxy switchover ADMIN``: ask a primary to hand its service to its backup.

The admin endpoint is read-only: ADMIN's ``GET /status`` says where the
primary's log channel listens, and the request goes there, over the
authenticated log channel (the pair's secret, as a backup's), as a
``Switchover`` message instead of a ``Join``. The primary answers with the
outcome once the backup serves (or why not), and the command prints it in one
line; its exit code says which (``ftproxy.shell.exits``).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import trio

from ftproxy.core.channel import (
    BACKUP,
    Channel,
    ConnectionClosed,
    RemoteProtocolError,
    Switchover,
    SwitchoverOutcome,
)
from ftproxy.shell.exits import (
    EXIT_OK,
    EXIT_SWITCHOVER_REFUSED,
    EXIT_SWITCHOVER_UNFINISHED,
    EXIT_UNAUTHENTICATED,
    EXIT_UNREACHABLE,
)
from ftproxy.shell.link import HANDSHAKE_TIMEOUT_S, LinkRefused, LogLink, _handshake
from ftproxy.tools.status import AdminUnavailable, fetch_status, parse_address

DEFAULT_TIMEOUT_S = 30.0


class SwitchoverFailed(Exception):
    """The request did not get an outcome: the message says why, ``code`` is the exit code."""

    def __init__(self, reason: str, code: int) -> None:
        super().__init__(reason)
        self.code = code


def log_channel_address(admin: str, status: dict[str, Any]) -> tuple[str, int]:
    """Where the replica behind ``admin`` takes backups (and switchover requests)."""
    role = status.get("role")
    if role in ("backup", "joining"):
        raise SwitchoverFailed(
            f"{admin} is a backup ({role}); give the primary's --admin address",
            EXIT_SWITCHOVER_REFUSED,
        )
    listen = status.get("log_listen")
    if not isinstance(listen, str):
        raise SwitchoverFailed(
            f"{admin}'s /status names no log channel address (role {role}): it takes no "
            "backup, so it has none to hand over to",
            EXIT_SWITCHOVER_REFUSED,
        )
    host, port = parse_address(listen)
    if ipaddress.ip_address(host).is_unspecified:
        host = parse_address(admin)[0]  # it listens on every address: ask where ADMIN is
    return host, port


async def request_switchover(
    address: tuple[str, int], secret: bytes | None, timeout: float
) -> SwitchoverOutcome:
    """Open the log channel to ``address`` as a control client and ask; the outcome."""
    shown = f"{address[0]}:{address[1]}"
    try:
        stream = await trio.open_tcp_stream(*address)
    except OSError as exc:
        raise SwitchoverFailed(
            f"cannot reach the log channel at {shown}: {exc.strerror or exc}", EXIT_UNREACHABLE
        ) from None
    link = LogLink(stream, Channel(BACKUP, secret), shown)
    try:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                await _handshake(link)
        except (RemoteProtocolError, LinkRefused) as exc:
            raise SwitchoverFailed(
                f"{shown} did not authenticate us: {exc}", EXIT_UNAUTHENTICATED
            ) from None
        except trio.TooSlowError:
            raise SwitchoverFailed(
                f"{shown} did not finish the opening within {HANDSHAKE_TIMEOUT_S:g} s",
                EXIT_UNREACHABLE,
            ) from None
        try:
            await link.send(Switchover())
            with trio.fail_after(timeout):
                event = await link.next_event()
        except trio.TooSlowError:
            raise SwitchoverFailed(
                f"no outcome from {shown} within {timeout:g} s: the switchover may still "
                "finish; see both replicas' /status",
                EXIT_SWITCHOVER_UNFINISHED,
            ) from None
        except (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise SwitchoverFailed(
                f"{shown} ended the conversation: {exc}", EXIT_SWITCHOVER_UNFINISHED
            ) from None
    finally:
        await link.aclose()
    if isinstance(event, ConnectionClosed):
        raise SwitchoverFailed(
            f"{shown} closed the connection without an outcome (an older ftproxy?)",
            EXIT_SWITCHOVER_UNFINISHED,
        )
    if not isinstance(event, SwitchoverOutcome):
        raise SwitchoverFailed(
            f"{shown} answered {type(event).__name__}, not an outcome", EXIT_SWITCHOVER_UNFINISHED
        )
    return event


async def switchover(admin: str, secret: bytes | None, timeout: float) -> tuple[int, str]:
    """The whole command: (exit code, the line to print)."""
    try:
        try:
            status = await fetch_status(admin)
        except AdminUnavailable as exc:
            raise SwitchoverFailed(
                f"cannot read {admin}'s status: {exc.reason}", EXIT_UNREACHABLE
            ) from None
        outcome = await request_switchover(log_channel_address(admin, status), secret, timeout)
    except SwitchoverFailed as exc:
        return exc.code, f"switchover failed: {exc}"
    if outcome.done:
        return EXIT_OK, f"switched over: {outcome.reason}"
    if outcome.refused:
        return EXIT_SWITCHOVER_REFUSED, f"switchover refused, nothing changed: {outcome.reason}"
    return EXIT_SWITCHOVER_UNFINISHED, f"switchover not done: {outcome.reason}"
