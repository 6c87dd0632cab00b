"""The steps both modes share: start the pair, kill the primary, wait for the backup to go live."""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from ftproxy.tools import lab as netlab
from ftproxy.tools.demo._config import HOST, REFRESH_S, DemoConfig, DemoError, Interrupted
from ftproxy.tools.demo._etcd import kill_etcd_member
from ftproxy.tools.demo._load import ConnectionLoad, Events, Load
from ftproxy.tools.demo._procs import Launch, Replica, start_replica
from ftproxy.tools.demo._state import Demo
from ftproxy.tools.demo._verdict import Verdict, verify


async def stop_all(demo: Demo) -> None:
    """Stop every process the demo started, whatever is being raised meanwhile."""
    with trio.CancelScope(shield=True):
        for replica in [*demo.replicas, *([demo.arbiter] if demo.arbiter else [])]:
            await replica.stop()
        if demo.etcd is not None:
            await trio.to_thread.run_sync(demo.etcd.stop)


async def start_pair(
    demo: Demo,
    workdir: Path,
    nursery: trio.Nursery,
    launches: Sequence[Launch],
    service_port: int,
    auth: Sequence[str] = ("--insecure",),
) -> tuple[Replica, Replica]:
    """Start primary and backup; return once both guests listen (the backup's replaying)."""
    config = demo.config
    for launch in launches:
        replica = await start_replica(launch, service_port, workdir, auth, config.guest)
        demo.replicas.append(replica)
        nursery.start_soon(replica.watch_stdout)
    primary, backup = demo.replicas
    with trio.move_on_after(config.start_timeout_s) as waited:
        await primary.ready.wait()
        await backup.ready.wait()
    if waited.cancelled_caught:
        late = primary if not primary.ready.is_set() else backup
        raise DemoError(
            f"the {late.name}'s guest did not start listening within "
            f"{config.start_timeout_s:g} s{await late.stderr_tail()}"
        )
    for replica in demo.replicas:
        nursery.start_soon(replica.poll_status)
    service = f"{netlab.VIP if config.packet else HOST}:{service_port}"
    demo.events.emit(
        "pair_ready",
        f"primary and backup ready, kv.py on {service}",
        service=service,
        pids={r.name: [r.process.pid, *r.guest_pids] for r in (primary, backup)},
        workdir=str(workdir),
    )
    return primary, backup


async def kill_primary(primary: Replica, events: Events, acked: int) -> None:
    events.emit(
        "killing_primary",
        f"kill -9 of the primary (pid {primary.process.pid}) and its guest",
        pid=primary.process.pid,
        acked=acked,
    )
    await primary.kill()


async def failover(
    demo: Demo, nursery: trio.Nursery, primary: Replica, backup: Replica, service: int
) -> Verdict:
    """Load, warm-up, kill -9 of the primary, load through the failover, read-back."""
    config, events = demo.config, demo.events
    load = demo.load = Load(service, config.clients, events)
    nursery.start_soon(load.run)
    await wait_first_ack(load, config)
    events.emit("load_started", f"load running: {config.clients} clients, INCR + SET")
    if demo.etcd is not None:  # mid-run, before the failover that etcd must decide
        await trio.sleep(config.warmup_s / 2)
        await kill_etcd_member(demo)
        await trio.sleep(config.warmup_s / 2)
    else:
        await trio.sleep(config.warmup_s)  # a point of the run to fail at, not synchronisation
    await kill_primary(primary, events, load.stats.acked)
    load.stats.kill_at = trio.current_time()
    nursery.start_soon(announce_go_live, backup, events)
    await trio.sleep(config.after_s)
    load.stop()
    events.emit(
        "load_stopped", f"load stopped: {load.stats.acked} acknowledged writes; reading back"
    )
    verdict = await verify(service, load.stats, config)
    return replace(verdict, duration_s=trio.current_time() - events.started_at)


async def wait_for(
    replica: Replica, condition: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    """The replica's status, once ``condition`` holds for it (as polled for the view)."""
    with trio.move_on_after(timeout):
        while replica.status is None or not condition(replica.status):
            await trio.sleep(REFRESH_S / 4)
        return replica.status
    raise DemoError(
        f"the {replica.name} did not get there within {timeout:g} s{await replica.stderr_tail()}"
    )


async def wait_first_ack(load: Load | ConnectionLoad, config: DemoConfig) -> None:
    with trio.move_on_after(config.start_timeout_s) as waited:
        await load.wait_first_ack()
    if waited.cancelled_caught:
        raise DemoError(f"no write was acknowledged within {config.start_timeout_s:g} s")


async def announce_go_live(backup: Replica, events: Events) -> None:
    """Report the backup's roles as its admin endpoint shows them, until it is live."""
    seen = ""
    while seen != "live":
        role = str((backup.status or {}).get("role", ""))
        if role and role != seen and role != "backup":
            events.emit("backup_role", f"backup is {role}", role=role)
        seen = role or seen
        await trio.sleep(REFRESH_S / 2)


async def exit_on_signals() -> None:
    """SIGTERM and SIGHUP stop the demo the way Ctrl-C does: through the clean-up."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            raise Interrupted(signal.Signals(signum).name)
