"""The rich live view and the verdict's panel."""

from __future__ import annotations

from typing import Any

import trio
from rich.console import Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ftproxy.tools import lab as netlab
from ftproxy.tools.demo._config import ETCD_MEMBERS, LAB_PREFIX, REFRESH_S, SERVICE_PORT
from ftproxy.tools.demo._load import ConnectionLoad, RateMeter
from ftproxy.tools.demo._procs import Replica
from ftproxy.tools.demo._state import Demo
from ftproxy.tools.demo._verdict import Outcome, Verdict

# --- The live view and the panel ----------------------------------------------------------


def _replica_row(replica: Replica) -> list[RenderableType]:
    """One line of the replica table, from the last status fetched."""
    status = replica.status
    if replica.exit_expected:
        return [replica.name, Text(replica.fate, style="red")]
    if status is None:
        return [replica.name, Text(replica.unreachable or "starting", style="dim")]
    lag = status.get("lag") or {}
    role = str(status.get("role", "?"))
    peer = status.get("peer") or {}
    style = {"live": "bold green", "primary": "green", "backup": "cyan"}.get(role, "yellow")
    return [
        replica.name,
        Text(role, style=style),
        str(status.get("generation", "")),
        f"{status.get('exits_total', 0):,}",
        f"{status.get('log_seq', 0):,}",
        f"{status.get('acked_seq', 0):,}",
        f"{lag.get('entries', 0):,} / {lag.get('ms', 0):.0f} ms",
        f"{status.get('held_outputs', 0):,}",
        str(peer.get("state", "")),
        _protection_cell(status),
    ]


def _protection_cell(status: dict[str, Any]) -> Text:
    """Protected, catching up (how far), or alone."""
    if status.get("protected") is True:
        return Text("protected", style="green")
    catch_up = status.get("catch_up") or {}
    if catch_up.get("state") == "catching_up":
        return Text(
            f"catch-up {catch_up.get('replayed_seq', 0):,}/{status.get('log_seq', 0):,}",
            style="yellow",
        )
    if status.get("role") == "live":
        return Text("alone", style="bold red")
    return Text("")


def render_view(demo: Demo) -> RenderableType:
    """The live view: both replicas, the load, the last events."""
    table = Table(expand=True, box=None, pad_edge=False)
    columns = (
        "replica", "role", "gen", "exits", "log seq", "acked seq", "lag", "held", "peer",
        "protection",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("replica", "role") else "right")
    for replica in demo.replicas:
        table.add_row(*_replica_row(replica))
    load = demo.load
    if load is None:
        load_line = Text("load: not started", style="dim")
    elif isinstance(load, ConnectionLoad):
        load_line = Text.assemble(
            ("load ", "bold"),
            f"1 connection {load.client_address or '(connecting)'} → {netlab.VIP}:{SERVICE_PORT}  ",
            (f"{demo.rate:,.0f} req/s", "bold"),
            f"  acked writes {load.stats.acked:,}  wrong replies {load.wrong_count}  ",
            (
                ("connection open", "green")
                if load.error is None
                else (f"connection broken: {load.error}", "bold red")
            ),
        )
    else:
        load_line = Text.assemble(
            ("load ", "bold"),
            f"{demo.config.clients} clients  ",
            (f"{demo.rate:,.0f} req/s", "bold"),
            f"  acked writes {load.stats.acked:,}  reconnects {load.stats.reconnects}",
        )
    events = Text("\n").join(
        Text.assemble((f"{at:6.2f}s ", "dim"), message) for at, message in demo.events.shown
    )
    if demo.config.packet:
        title = Text.assemble(
            "ftproxy demo --packet: kv.py on ",
            (f"{netlab.VIP}:{SERVICE_PORT}", "bold"),
            f", primary + backup in lab {LAB_PREFIX}, ",
            Text("output rule ON", style="green"),
        )
    else:
        rule = (
            Text("output rule ON", style="green")
            if demo.config.output_rule
            else Text(f"output rule OFF (ship delay {demo.config.ship_delay_ms:g} ms)", style="red")
        )
        through = f", arbiter etcd ({ETCD_MEMBERS} members)" if demo.config.etcd else ""
        title = Text.assemble(f"ftproxy demo: kv.py, primary + backup{through}, ", rule)
    return Panel(
        Group(table, Text(""), load_line, Text(""), events), title=title, border_style="blue"
    )


def render_verdict(verdict: Outcome) -> RenderableType:
    """The verdict panel: the numbers, then what they mean."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right" if isinstance(verdict, Verdict) else "left")
    for name, value in verdict.rows():
        table.add_row(name, value)
    parts: list[RenderableType] = [table, Text("")]
    if verdict.passed:
        parts.append(Text("✔ " + verdict.summary(), style="bold green"))
    else:
        parts.append(Text("✘ " + verdict.summary(), style="bold red"))
    notes = verdict.notes()
    parts += notes
    unsafe = isinstance(verdict, Verdict) and not verdict.output_rule
    style = "green" if verdict.passed else ("yellow" if unsafe else "red")
    return Panel(Group(*parts), title=f"verdict: {verdict.title}", border_style=style, expand=False)


async def refresh(live: Live, demo: Demo) -> None:
    """Redraw the live view about five times a second (here, not in rich's thread)."""
    meter = RateMeter()
    while True:
        if demo.load is not None:
            demo.rate = 0.0 if demo.load.stopped else meter.sample(demo.load.stats.replies)
        live.update(render_view(demo), refresh=True)
        await trio.sleep(REFRESH_S)
