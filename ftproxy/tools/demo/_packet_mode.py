"""``--packet``: the pair in its lab with ``--front packet``, one connection through it all."""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import trio

from ftproxy.tools import lab as netlab
from ftproxy.tools.demo._config import (
    ADMIN_PORT,
    ARBITER_PORT,
    LAB_PREFIX,
    LOG_PORT,
    PACKET_REQUEST_TIMEOUT_S,
    REFRESH_S,
    SERVICE_PORT,
    VIP_PREFIX_LEN,
    DemoError,
)
from ftproxy.tools.demo._load import ConnectionLoad
from ftproxy.tools.demo._procs import Launch, Replica, in_netns, start_process
from ftproxy.tools.demo._run import (
    announce_go_live,
    exit_on_signals,
    kill_primary,
    start_pair,
    stop_all,
    wait_first_ack,
)
from ftproxy.tools.demo._state import Demo
from ftproxy.tools.demo._verdict import Outcome, PacketVerdict, verify_connection
from ftproxy.tools.procs import FTPROXY_COMMAND


async def run_packet(demo: Demo, workdir: Path) -> Outcome:
    """``--packet``, inside the lab: arbiter, pair in packet mode, one connection, kill
    (or partition), failover, read-back on the same connection. The lab is up and this
    thread is in the client host's network namespace (see :func:`_packet_lab`)."""
    lab = netlab.Lab(LAB_PREFIX)
    secret = _write_secret(workdir / "secret")
    auth = ["--secret-file", str(secret)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exit_on_signals)
        try:
            await _start_lab_arbiter(demo, workdir, nursery, lab, auth)
            primary, backup = await start_pair(
                demo, workdir, nursery, _packet_launches(lab), SERVICE_PORT, auth
            )
            verdict = await _packet_failover(demo, nursery, lab, primary, backup)
        finally:
            await stop_all(demo)
        nursery.cancel_scope.cancel()
    return verdict


def _packet_launches(lab: netlab.Lab) -> list[Launch]:
    """The pair in the lab's primary and backup hosts, packet front, serving the VIP."""
    primary_ip, backup_ip = lab.address("primary"), lab.address("backup")
    arbiter_at = f"{lab.address('arbiter')}:{ARBITER_PORT}"
    log_at = f"{primary_ip}:{LOG_PORT}"
    front = ["--front", "packet", "--interface", netlab.HOST_IFACE]
    primary_args = ["primary", "--log-listen", log_at, "--arbiter", arbiter_at, *front]
    primary_args += ["--vip", f"{netlab.VIP}/{VIP_PREFIX_LEN}"]
    backup_args = ["backup", "--primary", log_at, "--arbiter", arbiter_at, *front]
    return [
        Launch("primary", primary_args, f"{primary_ip}:{ADMIN_PORT}", lab.namespace("primary")),
        Launch("backup", backup_args, f"{backup_ip}:{ADMIN_PORT}", lab.namespace("backup")),
    ]


def _write_secret(path: Path) -> Path:
    """32 random bytes, base64, in a file only root may read: what ``auth`` expects."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(base64.b64encode(os.urandom(32)) + b"\n")
    return path


async def _start_lab_arbiter(
    demo: Demo, workdir: Path, nursery: trio.Nursery, lab: netlab.Lab, auth: Sequence[str]
) -> None:
    """``ftproxy arbiter`` in the lab's arbiter host; return once it listens."""
    address = f"{lab.address('arbiter')}:{ARBITER_PORT}"
    command = [
        *FTPROXY_COMMAND,
        "arbiter",
        "--listen",
        address,
        "--data-dir",
        str(workdir / "arbiter-store"),
        *auth,
    ]
    process = demo.arbiter = await start_process(
        "arbiter", in_netns(lab.namespace("arbiter"), command), "", workdir
    )
    nursery.start_soon(process.watch_stdout)
    with trio.move_on_after(demo.config.start_timeout_s) as waited:
        while b'"arbiter_listening"' not in await _read_bytes(process.stderr_path):
            await trio.sleep(REFRESH_S / 4)
    if waited.cancelled_caught:
        raise DemoError(
            f"the arbiter did not listen on {address} within "
            f"{demo.config.start_timeout_s:g} s{await process.stderr_tail()}"
        )
    demo.events.emit(
        "arbiter_started",
        f"arbiter on {address} (host arbiter, pid {process.process.pid})",
        address=address,
    )


async def _read_bytes(path: Path) -> bytes:
    try:
        return await trio.Path(path).read_bytes()
    except OSError:
        return b""


async def _packet_failover(
    demo: Demo, nursery: trio.Nursery, lab: netlab.Lab, primary: Replica, backup: Replica
) -> PacketVerdict:
    """One connection, warm-up, kill -9 (or partition) of the primary, the same
    connection through the failover, read-back on it."""
    config, events = demo.config, demo.events
    load = demo.load = ConnectionLoad(netlab.VIP, SERVICE_PORT, events, PACKET_REQUEST_TIMEOUT_S)
    await load.connect(config.start_timeout_s)
    events.emit(
        "connected",
        f"one connection from the client host: {load.client_address} → {netlab.VIP}:{SERVICE_PORT}",
        client=load.client_address,
    )
    nursery.start_soon(load.run)
    await wait_first_ack(load, config)
    events.emit("load_started", "load running on that connection: INCR, SET, GET in turn")
    await trio.sleep(config.warmup_s)  # a point of the run to fail at, not synchronisation
    if load.error is not None:
        raise DemoError(f"the connection broke before the failover: {load.error}")
    primary.exit_expected = True  # killed or partitioned: it may end, the demo goes on
    if config.partition:
        primary.fate = "partitioned"
        events.emit(
            "partitioning_primary",
            "partition: the primary host is cut off at the switch",
            acked=load.stats.acked,
        )
        await trio.to_thread.run_sync(lab.partition, "primary")
    else:
        await kill_primary(primary, events, load.stats.acked)
    load.stats.kill_at = trio.current_time()
    nursery.start_soon(announce_go_live, backup, events)
    await trio.sleep(config.after_s)
    await load.stop()
    events.emit(
        "load_stopped",
        f"load stopped: {load.stats.acked} acknowledged writes; reading back on "
        + ("the same connection" if load.error is None else "a new one"),
    )
    verdict = await verify_connection(load, "partition" if config.partition else "kill")
    return replace(verdict, duration_s=trio.current_time() - events.started_at)
