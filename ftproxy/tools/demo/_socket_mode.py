"""The socket demo on loopback: an embedded arbiter, the pair, the load, the failover."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import trio

import arbiter
from ftproxy.tools.demo._config import DEFAULT_MAX_LAG_MS, HOST, MAX_LAG_FACTOR, DemoConfig
from ftproxy.tools.demo._etcd import etcd_decision, start_etcd
from ftproxy.tools.demo._procs import Launch, Ports, free_ports
from ftproxy.tools.demo._rounds import run_rounds
from ftproxy.tools.demo._run import exit_on_signals, failover, start_pair, stop_all
from ftproxy.tools.demo._state import Demo
from ftproxy.tools.demo._verdict import Outcome


async def run(demo: Demo, workdir: Path) -> Outcome:
    """Arbiter, pair, load, kill, failover, read-back; every replica stopped on the way out."""
    events = demo.events
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exit_on_signals)
        try:
            if demo.config.etcd:
                arbiter_at = await start_etcd(demo, workdir)
            else:
                port = await nursery.start(arbiter.serve, HOST, 0, workdir / "arbiter-store", None)
                arbiter_at = f"{HOST}:{port}"
                events.emit("arbiter_started", f"arbiter on {arbiter_at}", port=port)
            service, log_port, primary_admin, backup_admin, backup_log = free_ports(5)
            ports = Ports(service, log_port, primary_admin, backup_admin, arbiter_at, backup_log)
            primary, backup = await start_pair(
                demo, workdir, nursery, _socket_launches(demo.config, ports), ports.service
            )
            if demo.config.rounds > 1:
                verdict = await run_rounds(demo, nursery, workdir, primary, backup, ports)
            else:
                verdict = await failover(demo, nursery, primary, backup, ports.service)
            if demo.etcd is not None:
                verdict = replace(verdict, etcd=await etcd_decision(demo.etcd, backup))
        finally:
            await stop_all(demo)
        nursery.cancel_scope.cancel()
    return verdict


def _socket_launches(config: DemoConfig, ports: Ports) -> list[Launch]:
    """The pair on loopback, the arbiter's address given."""
    arbiter_at, log_at = ports.arbiter, f"{HOST}:{ports.log}"
    primary_args = ["primary", "--log-listen", log_at, "--arbiter", arbiter_at]
    if not config.output_rule:
        primary_args += [
            "--no-output-rule",
            "--ship-delay-ms",
            f"{config.ship_delay_ms:g}",
            # The backup lags by up to a ship delay all the time; with the default bound
            # (100 ms) flow control would pause the guest's input for most of each delay,
            # and a kill in such a pause finds every released reply already shipped.
            "--max-lag-ms",
            f"{MAX_LAG_FACTOR * config.ship_delay_ms + DEFAULT_MAX_LAG_MS:g}",
        ]
    backup_args = ["backup", "--primary", log_at, "--arbiter", arbiter_at]
    if config.rounds > 1:
        backup_args += ["--log-listen", f"{HOST}:{ports.backup_log}"]
    return [
        Launch("primary", primary_args, f"{HOST}:{ports.primary_admin}"),
        Launch("backup", backup_args, f"{HOST}:{ports.backup_admin}"),
    ]
