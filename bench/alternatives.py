"""The Python alternatives a user would pick instead: Raft key-value stores, 3 nodes.

They are installed for the benchmark only, with pip, into a cache directory of
their own (never into ftproxy's environment or dependencies: pyraft pins an old
setuptools), and run with that directory on PYTHONPATH. Where pip cannot get
them, the alternative is reported as not available.

- pyraft 1.0.0: a Raft server speaking a subset of the Redis protocol (SET,
  GET, no INCR); started through ``bench/pyraft_node.py``, which raises its
  listen backlog and sets TCP_NODELAY (both in its favour).
- PySyncObj 0.3.17: a library; ``bench/syncobj_kv.py`` is the RESP store
  rewritten around it.

Clients are driven at the leader (followers of pyraft relay writes over one
shared, unlocked connection per leader, which concurrent clients corrupt).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import HOST, Proc, free_port, free_port_block, wait_until
from bench.resp import ReplyError, call_once
from bench.services import Service

HERE = Path(__file__).resolve().parent
NODES = 3
ELECTION_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Alternative:
    """One alternative: its PyPI package (pinned) and how its cluster starts."""

    name: str
    package: str
    module: str
    description: str
    incr: bool  # whether it implements INCR


PYRAFT = Alternative(
    "pyraft",
    "pyraft==1.0.0",
    "pyraft",
    "pyraft 1.0.0, 3 nodes (Raft; RESP subset, backlog raised, NODELAY)",
    incr=False,
)
PYSYNCOBJ = Alternative(
    "pysyncobj",
    "pysyncobj==0.3.17",
    "pysyncobj",
    "PySyncObj 0.3.17, 3 nodes (Raft library + RESP front, appendEntriesUseBatch=False)",
    incr=True,
)
ALL = (PYRAFT, PYSYNCOBJ)


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return base / "ftproxy-bench" / f"alternatives-{version}"


def install(alternative: Alternative) -> tuple[Path | None, str | None]:
    """Make ``alternative`` importable from its own directory: (directory, None) or
    (None, why it is not available)."""
    target = cache_dir() / alternative.name
    if _importable(target, alternative.module):
        return target, None
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--upgrade",
        "--target",
        str(target),
        alternative.package,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"pip install {alternative.package} failed: {exc}"
    if done.returncode != 0 or not _importable(target, alternative.module):
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"pip install {alternative.package} failed: {last}"
    return target, None


def _importable(target: Path, module: str) -> bool:
    if not target.is_dir():
        return False
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def info(port: int) -> dict[str, Any]:
    """A node's ``INFO``, a JSON object in both alternatives ({} if it does not answer).

    The top-level ``state`` is ``"l"`` on the leader. pyraft lists its peers
    (each with the term it last heard from it); our PySyncObj front counts its
    connected partners.
    """
    try:
        reply = call_once(port, "INFO", timeout=1.0)
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
        value = json.loads(text)
    except (OSError, ReplyError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def is_leader(port: int) -> bool:
    """Whether the node serving RESP on ``port`` says it is the Raft leader."""
    return info(port).get("state") == "l"


def formed(port: int) -> bool:
    """Whether the leader on ``port`` is in touch with every other node.

    A pyraft leader elected before a peer caught up on its term lost
    acknowledged writes in trials, so loads wait for this too.
    """
    state = info(port)
    if state.get("state") != "l":
        return False
    if "peers" in state:
        peers = state["peers"].values()
        return len(peers) == NODES - 1 and all(p.get("term") == state["term"] for p in peers)
    return bool(state.get("connected_partners") == NODES - 1)


def find_leader(ports: list[int], timeout: float = ELECTION_TIMEOUT_S) -> int:
    """The RESP port of the current leader among ``ports``, once there is one."""
    found: list[int] = []

    def elected() -> bool:
        found[:] = [p for p in ports if is_leader(p)]
        return len(found) == 1

    wait_until(elected, timeout, "a Raft leader is elected")
    return found[0]


@dataclass
class Cluster:
    """Three nodes of an alternative; ``service()`` once the leader is known."""

    alternative: Alternative
    ports: list[int]
    nodes: list[Proc]

    def ready(self, timeout: float = ELECTION_TIMEOUT_S) -> Cluster:
        marker = "listening" if self.alternative is PYSYNCOBJ else None
        if marker is not None:
            for node in self.nodes:
                node.wait_for_output(marker, timeout)
        wait_until(
            lambda: formed(find_leader(self.ports, timeout)), timeout, "the Raft cluster forms"
        )
        return self

    def service(self) -> Service:
        """The cluster as a Service: clients at the leader; followers are the backup side."""
        leader = find_leader(self.ports)
        index = self.ports.index(leader)
        return Service(
            self.alternative.name,
            leader,
            primary=[self.nodes[index]],
            backup=[n for i, n in enumerate(self.nodes) if i != index],
            ready_marker=None,
        )

    def node_for(self, port: int) -> Proc:
        return self.nodes[self.ports.index(port)]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start(alternative: Alternative, installed: Path, scratch: Path, tag: str = "") -> Cluster:
    """Start a 3-node cluster of ``alternative`` on loopback (returns before election)."""
    env = {"PYTHONPATH": str(installed), "PYTHONUNBUFFERED": "1"}
    workdir = scratch / f"{alternative.name}{tag}"
    workdir.mkdir(parents=True, exist_ok=True)
    if alternative is PYRAFT:
        base = free_port_block(2 * NODES)
        ports = [base + 2 * i for i in range(NODES)]
        nodes = []
        for i, port in enumerate(ports):
            peers = ",".join(f"{j + 1}/{HOST}:{p}" for j, p in enumerate(ports) if j != i)
            command = [
                sys.executable,
                str(HERE / "pyraft_node.py"),
                "-i",
                str(i + 1),
                "-a",
                f"{HOST}:{port}",
                "-e",
                peers,
                "-loglevel",
                "warning",
            ]
            nodes.append(Proc(f"pyraft{tag}-{i + 1}", command, workdir, env=env, cwd=workdir))
        return Cluster(alternative, ports, nodes)
    ports = [free_port() for _ in range(NODES)]
    raft = [f"{HOST}:{free_port()}" for _ in range(NODES)]
    nodes = []
    for i, port in enumerate(ports):
        partners = [arg for j, r in enumerate(raft) if j != i for arg in ("--partner", r)]
        command = [
            sys.executable,
            str(HERE / "syncobj_kv.py"),
            "--port",
            str(port),
            "--raft",
            raft[i],
            *partners,
        ]
        nodes.append(Proc(f"pysyncobj{tag}-{i + 1}", command, workdir, env=env, cwd=workdir))
    return Cluster(alternative, ports, nodes)
