"""What a primary or a backup is started with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import arbiter
from ftproxy.core.records import Policy
from ftproxy.core.replication import Timing
from ftproxy.guest import protocol
from ftproxy.shell.fence import FenceMode
from ftproxy.shell.front import PacketConfig
from ftproxy.shell.front.socket import AddressMap
from ftproxy.shell.hooks import DEFAULT_TIMEOUT_S as DEFAULT_HOOK_TIMEOUT_S


@dataclass
class ReplicaOptions:
    """Everything a primary or a backup is started with."""

    argv: list[str]
    arbiter: arbiter.Arbiter  # built-in or etcd: arbiter.connect() of the --arbiter address
    secret: bytes | None
    timing: Timing = field(default_factory=Timing)
    address_map: AddressMap = field(default_factory=dict)
    admin: tuple[str, int] | None = None
    pair: str = "ftproxy"
    generation: int = 1
    policy: Policy = field(
        default_factory=lambda: Policy(protocol.DEFAULT_EXIT_EVERY, protocol.DEFAULT_CLOCK_STEP_NS)
    )
    extra_env: dict[str, str] = field(default_factory=dict)
    output_rule: bool = True
    # Only without the output rule: hold each log batch this long before
    # shipping it, so that the demo shows what the rule protects every time.
    ship_delay_s: float = 0.0
    # Packet mode (None: socket mode). A backup's comes from the primary's header.
    packet: PacketConfig | None = None
    # Where a backup runs its guest (None: its own working directory), never the
    # primary's: on one host the two would share the program's files.
    workdir: str | None = None
    # A primary's: files and directories the guest reads, pinned by digest.
    pins: list[str] = field(default_factory=list)
    # --on-role-change: run at every role change (ftproxy.shell.hooks), bounded in time.
    on_role_change: list[str] | None = None
    hook_timeout_s: float = DEFAULT_HOOK_TIMEOUT_S
    # What a backup that won does to an old primary on this host still holding the
    # service address: "kill" (SIGKILL it, then bind) or "none" (report it busy).
    fence: FenceMode = "kill"
    # Where this replica keeps the log it holds (None: in memory only).
    data_dir: Path | None = None
    # Where this replica takes the next backup once it is live (a primary's is
    # its --log-listen); the arbiter records it with each win, for ``ftproxy run``.
    log_listen: tuple[str, int] | None = None
    # What SIGTERM means to a serving replica: "stop" (the guest gets it, as a logged signal:
    # the service stops on both replicas) or "leave" (hand the service to the backup).
    on_sigterm: str = "stop"
