"""``--rounds N``: kill -9s in a row, a fresh backup joining and catching up after each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from ftproxy.tools.demo._config import HOST, REPROTECT_TIMEOUT_S
from ftproxy.tools.demo._load import Load, LoadStats
from ftproxy.tools.demo._procs import Launch, Ports, Replica, free_ports, start_replica
from ftproxy.tools.demo._run import kill_primary, wait_first_ack, wait_for
from ftproxy.tools.demo._state import Demo
from ftproxy.tools.demo._verdict import Round, Verdict, seconds, verify


async def run_rounds(
    demo: Demo,
    nursery: trio.Nursery,
    workdir: Path,
    primary: Replica,
    backup: Replica,
    ports: Ports,
) -> Verdict:
    """``--rounds N``: load; N times: kill -9 of the primary, the backup goes live, a
    fresh backup joins it and catches up, the pair is protected again; read-back."""
    config, events = demo.config, demo.events
    load = demo.load = Load(ports.service, config.clients, events)
    nursery.start_soon(load.run)
    await wait_first_ack(load, config)
    events.emit("load_started", f"load running: {config.clients} clients, INCR + SET")
    await trio.sleep(config.warmup_s)  # a point of the run to fail at, not synchronisation
    live_log, generation = ports.backup_log, 1
    rounds: list[Round] = []
    for number in range(1, config.rounds + 1):
        events.emit("round_started", f"round {number} of {config.rounds}", round=number)
        await kill_primary(primary, events, load.stats.acked)
        killed_at = load.stats.kill_at = trio.current_time()
        # This round's old replies: those still coming from the killed primary.
        load.stats.first_new_reply = load.stats.last_old_reply = None
        await wait_for(backup, lambda s: s.get("role") == "live", config.start_timeout_s)
        events.emit("backup_live", f"{backup.name} is live, alone", replica=backup.name)
        joiner_log, joiner_admin = free_ports(2)
        joiner = await start_replica(
            Launch(
                f"backup {number + 1}",
                [
                    "backup",
                    "--primary",
                    f"{HOST}:{live_log}",
                    "--log-listen",
                    f"{HOST}:{joiner_log}",
                    "--arbiter",
                    ports.arbiter,
                    "--data-dir",
                    str(workdir / f"data-{number + 1}"),
                ],
                f"{HOST}:{joiner_admin}",
            ),
            ports.service,
            workdir,
            ("--insecure",),
            config.guest,
        )
        demo.replicas.append(joiner)
        nursery.start_soon(joiner.watch_stdout)
        nursery.start_soon(joiner.poll_status)
        events.emit("backup_joining", f"{joiner.name} joins {backup.name}, catching up")
        generation += 1
        status = await wait_for(backup, _protected_under(generation), REPROTECT_TIMEOUT_S)
        catch_up = status.get("catch_up") or {}
        done = Round(
            number=number,
            killed=primary.name,
            live=backup.name,
            failover_s=_round_failover(load.stats, killed_at),
            reprotect_s=trio.current_time() - killed_at,
            catch_up_s=catch_up.get("elapsed_s"),
            catch_up_entries=int(catch_up.get("entries_sent", 0)),
            generation=generation,
        )
        rounds.append(done)
        events.emit(
            "protected_again",
            f"protected again: generation {generation}, {seconds(done.reprotect_s)} after the kill",
            generation=generation,
        )
        primary, backup, live_log = backup, joiner, joiner_log
        await trio.sleep(config.after_s)  # load on the healed pair, not synchronisation
    load.stop()
    events.emit(
        "load_stopped", f"load stopped: {load.stats.acked} acknowledged writes; reading back"
    )
    verdict = await verify(ports.service, load.stats, config)
    duration = trio.current_time() - events.started_at
    failovers = [r.failover_s for r in rounds if r.failover_s is not None]
    worst = max(failovers) if len(failovers) == len(rounds) else None
    return replace(verdict, duration_s=duration, rounds=tuple(rounds), failover_s=worst)


def _protected_under(generation: int) -> Callable[[dict[str, Any]], bool]:
    def protected(status: dict[str, Any]) -> bool:
        return status.get("protected") is True and status.get("generation") == generation

    return protected


def _round_failover(stats: LoadStats, killed_at: float) -> float | None:
    """The clients' view: the old primary's last reply (at the latest, the kill) to the
    new one's first."""
    if stats.first_new_reply is None:
        return None
    return stats.first_new_reply - (stats.last_old_reply or killed_at)
