"""The demo's settings and fixed numbers: exit codes, timeouts, the lab's ports, errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import ftproxy
from ftproxy.tools import lab as netlab

HOST: Final = "127.0.0.1"
KV_SCRIPT: Final = Path(ftproxy.__file__).resolve().parent.parent / "examples" / "kv.py"
READY_MARKER: Final = "kv listening on"

EXIT_OK: Final = 0
EXIT_LOST: Final = 1
EXIT_USAGE: Final = 2
EXIT_FAILED: Final = 3
# --no-output-rule lost acknowledged writes: what it demonstrates, yet a verdict
# of lost writes, so not 0; and not EXIT_LOST, which means the rule failed.
EXIT_LOST_UNSAFE: Final = 4
EXIT_INTERRUPTED: Final = 130

REFRESH_S: Final = 0.2  # the live view and the admin polls, ~5 per second
ADMIN_TIMEOUT_S: Final = 0.5
VERIFY_TIMEOUT_S: Final = 10.0
VERIFY_BATCH: Final = 512  # GETs pipelined per round trip when reading back
STOP_TIMEOUT_S: Final = 5.0
STDERR_TAIL_LINES: Final = 3
EVENTS_SHOWN: Final = 8
RECEIVE_SIZE: Final = 65536
DEFAULT_MAX_LAG_MS: Final = 100.0  # ``ftproxy primary --max-lag-ms``'s default
MAX_LAG_FACTOR: Final = 5
# The primary sends no heartbeat while it holds a batch back, and the backup presumes
# it dead after 500 ms of silence (``--peer-timeout-ms``): stay well below.
MAX_SHIP_DELAY_MS: Final = 400.0

# --packet: the lab, and where everything listens inside it.
LAB_PREFIX: Final = "ftdemo"  # not the user's ``ftproxy lab`` (prefix ftlab)
NEEDS_ROOT: Final = (
    "--packet needs root (it builds network namespaces and raw sockets): "
    "run `sudo ftproxy demo --packet`"
)
VIP_PREFIX_LEN: Final = netlab.SUBNET.prefixlen
SERVICE_PORT: Final = 6380
LOG_PORT: Final = 7000
ARBITER_PORT: Final = 7100
ADMIN_PORT: Final = 7200
# A request through the failover waits for the client's TCP retransmissions, which
# back off (0.2 s, 0.4 s, 0.8 s...): a partition is only noticed after the peer
# timeout, so give a reply far longer than the socket demo does before calling the
# connection broken.
PACKET_REQUEST_TIMEOUT_S: Final = 10.0
REPROTECT_TIMEOUT_S: Final = 120.0  # a fresh backup catching up on the whole history
STALL_REPORTED_S: Final = 0.05  # a silence after the kill worth an event in the view
CLONE_NEWNET: Final = 0x40000000


class DemoError(Exception):
    """Something kept the demo from running to its verdict; the message is one line."""


class Interrupted(Exception):
    """The demo was asked to stop (SIGTERM or SIGHUP)."""


# --- The run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings, from the command line."""

    warmup_s: float
    after_s: float
    clients: int
    output_rule: bool
    ship_delay_ms: float
    start_timeout_s: float
    json: bool
    packet: bool = False
    partition: bool = False  # --packet only: cut the primary off instead of killing it
    etcd: bool = False  # the socket demo, decided by a three-member etcd cluster
    rounds: int = 1  # kill -9s in a row, each followed by a fresh backup joining
    guest: Path = KV_SCRIPT  # the replicated service (a test swaps in a broken one)


ETCD_MEMBERS: Final = 3
DECISION_KEY: Final = "ftproxy/generation/1"  # the demo pair's first generation
