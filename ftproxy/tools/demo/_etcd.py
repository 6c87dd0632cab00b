"""``--etcd``: a three-member etcd cluster decides the failover; one member dies mid-run."""

from __future__ import annotations

import socket
from pathlib import Path

import trio

import arbiter
from ftproxy.tools import etcdlocal
from ftproxy.tools.demo._config import DECISION_KEY, ETCD_MEMBERS, VERIFY_TIMEOUT_S, DemoError
from ftproxy.tools.demo._procs import Replica
from ftproxy.tools.demo._state import Demo
from ftproxy.tools.demo._verdict import EtcdDecision


async def start_etcd(demo: Demo, workdir: Path) -> str:
    """Start the demo's etcd cluster (in a thread: it blocks); return its address."""
    try:
        cluster = await trio.to_thread.run_sync(
            etcdlocal.start_cluster, workdir / "etcd", ETCD_MEMBERS
        )
    except (etcdlocal.EtcdMissing, etcdlocal.EtcdFailed) as exc:
        raise DemoError(str(exc)) from None
    demo.etcd = cluster
    demo.events.emit(
        "arbiter_started",
        f"etcd cluster of {ETCD_MEMBERS} members on {cluster.endpoints}",
        kind="etcd",
        address=cluster.address,
        pids=[m.popen.pid for m in cluster.members if m.popen is not None],
    )
    return cluster.address


async def kill_etcd_member(demo: Demo) -> None:
    """Kill -9 one etcd member: the quorum (two of three) goes on deciding."""
    assert demo.etcd is not None
    member = demo.etcd.members[0]
    pid = member.popen.pid if member.popen is not None else None
    await trio.to_thread.run_sync(member.kill)
    demo.events.emit(
        "etcd_member_killed",
        f"kill -9 of etcd member {member.name} ({member.endpoint}, pid {pid}): "
        f"{ETCD_MEMBERS - 1} of {ETCD_MEMBERS} left, still a quorum",
        member=member.name,
        pid=pid,
    )


async def etcd_decision(cluster: etcdlocal.EtcdCluster, backup: Replica) -> EtcdDecision:
    """Read the decision back from etcd, as any client would."""
    asker = arbiter.connect(cluster.address, None)
    try:
        with trio.fail_after(VERIFY_TIMEOUT_S):
            answer = await asker.query(DECISION_KEY)
    except (trio.TooSlowError, arbiter.ArbiterUnavailable, arbiter.ArbiterRefused) as exc:
        raise DemoError(f"etcd did not say who won {DECISION_KEY}: {exc}") from None
    return EtcdDecision(
        address=cluster.address,
        members=len(cluster.members),
        members_killed=sum(not m.running() for m in cluster.members),
        key=arbiter.ETCD_KEY_PREFIX + DECISION_KEY,
        winner=answer.winner if isinstance(answer, arbiter.Decision) else None,
        backup=f"backup@{socket.gethostname()}:{backup.process.pid}",
    )
