"""``ftproxy status``: read a replica's admin endpoint and show it for people.

``fetch_status`` reads a replica's status (an h11 client), ``render_status`` shows it
(a rich panel), and ``status_main`` / ``run_status`` are the command. The server side
is ``ftproxy.shell.admin``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import h11
import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ftproxy.core.exceptions import exception_leaves

MAX_RECV: Final = 64 * 1024
MAX_REPLY_BYTES: Final = 16 * 1024 * 1024

# Exit codes of ``ftproxy status`` (the same values as ``ftproxy.cli``).
EXIT_OK: Final = 0
EXIT_UNAVAILABLE: Final = 3
EXIT_INTERRUPTED: Final = 130


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
    return all(isinstance(leaf, KeyboardInterrupt) for leaf in exception_leaves(exc))


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
