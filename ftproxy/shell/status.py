"""What /status and /metrics report of a replica: its status board and samples."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from prometheus_client import Histogram

from ftproxy.core.replication import Replica
from ftproxy.shell.arbiter_client import ArbiterClient
from ftproxy.shell.metrics import ReplicaMetrics
from ftproxy.shell.options import ReplicaOptions


class Samples:
    """The last ``size`` measurements of something, for percentiles in /status, and
    for a histogram of all of them in /metrics (in seconds, where they are ms)."""

    def __init__(self, size: int = 4096, histogram: Histogram | None = None) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self.histogram = histogram

    def add(self, value: float) -> None:
        self._values.append(value)
        if self.histogram is not None:
            self.histogram.observe(value / 1000)

    def summary(self) -> dict[str, float | int]:
        if not self._values:
            return {"p50": 0.0, "p99": 0.0, "samples": 0}
        ordered = sorted(self._values)

        def pick(quantile: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(quantile * len(ordered)))], 3)

        return {"p50": pick(0.5), "p99": pick(0.99), "samples": len(ordered)}


@dataclass
class StatusBoard:
    """What /status reports; the replica fills it in as it goes."""

    options: ReplicaOptions
    arbiter: ArbiterClient
    started: float = field(default_factory=time.monotonic)
    replica: Replica[Any] | None = None
    icount: Callable[[], int] = lambda: 0
    seq: Callable[[], int] = lambda: 0
    guest_pid: int | None = None
    peer_state: str = "none"
    peer_address: str = ""
    peer_lost_reason: str = ""
    counters: dict[str, int] = field(
        default_factory=lambda: {
            "exits_total": 0,
            "outputs_total": 0,
            "log_bytes_total": 0,
            "failovers_total": 0,
            "divergences_total": 0,
        }
    )
    role_override: str | None = None
    channel_rtt_ms: Samples = field(default_factory=Samples)
    lag_ms: Samples = field(default_factory=Samples)
    input_bytes: Callable[[], int] = lambda: 0
    front: Callable[[], Mapping[str, Any]] | None = None
    # Re-protection: whether the pair is protected now, the catch-up's progress,
    # the log held (``ftproxy.shell.reprotect``, ``ftproxy.shell.logstore``).
    protection: Callable[[], bool] = lambda: False
    catch_up: Callable[[], Mapping[str, Any] | None] = lambda: None
    log_store: Callable[[], Mapping[str, Any] | None] = lambda: None
    # Service addresses a live replica could not take over (the old primary holds them).
    address_busy: Callable[[], list[str]] = list
    metrics: ReplicaMetrics = field(default_factory=ReplicaMetrics)

    def __post_init__(self) -> None:
        self.channel_rtt_ms.histogram = self.metrics.channel_rtt
        self.lag_ms.histogram = self.metrics.lag
        self.metrics.serve_status(self.snapshot)

    def role(self) -> str:
        if self.role_override:
            return self.role_override
        return self.replica.role.value if self.replica is not None else "starting"

    def protected(self) -> bool:
        """The pair is protected: a caught-up backup holds the whole log. ``protection``
        says it for the role this replica is in (``ftproxy.shell.primary``,
        ``ftproxy.shell.backup``, ``ftproxy.shell.reprotect``). Whether outputs wait for
        it is ``output_rule``, apart: without the rule (a demonstration) the pair is
        formed, yet a failover loses."""
        return self.protection()

    def health(self) -> tuple[bool, str]:
        """/healthz: serving, or ready to take over; else why not."""
        role = self.role()
        if role == "primary" and self.peer_state == "connected":
            return True, "primary: serving, with a backup"
        if role == "live":
            busy = self.address_busy()
            if busy:
                return False, f"live: cannot serve, address busy: {', '.join(busy)}"
            return True, "live: serving alone"
        if role == "backup" and self.peer_state == "connected":
            return True, "backup: replaying, ready to take over"
        return False, f"{role}: neither serving nor ready to take over"

    def failed_over(self, seconds: float) -> None:
        """This replica won the arbiter and serves alone, ``seconds`` after losing its peer."""
        self.counters["failovers_total"] += 1
        self.metrics.failover.observe(seconds)

    def snapshot(self) -> Mapping[str, Any]:
        now = trio.current_time()
        status: dict[str, Any] = {
            "pair": self.options.pair,
            "generation": self.options.generation,
            "guest_pid": self.guest_pid,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "icount": self.icount(),
            "output_rule": self.options.output_rule,
            # Where backups join, and where ``ftproxy switchover`` asks (authenticated).
            "log_listen": _address(self.options.log_listen),
            "arbiter": {"state": self.arbiter.state, "address": self.options.arbiter.describe()},
        }
        if self.replica is not None:
            core = self.replica.status(now)
            status.update(
                role=core["role"],
                # A live replica keeps no peer log, but its guest's exits go on.
                log_seq=max(core["logged_seq"], self.seq()),
                acked_seq=core["acked_seq"],
                replayed_seq=core["replayed_seq"],
                held_outputs=core["held_outputs"],
                lag={
                    "entries": core["lag_entries"],
                    "bytes": core["lag_bytes"],
                    "ms": core["lag_ms"],
                },
                peer={
                    "state": self.peer_state,
                    "silent_ms": core["peer_silent_ms"],
                    "address": self.peer_address,
                    **({"lost_because": self.peer_lost_reason} if self.peer_lost_reason else {}),
                },
            )
        if self.role_override:
            status["role"] = self.role_override
        status["protected"] = self.protected()
        busy = self.address_busy()
        # Serving clients now: a primary with its backup, a live replica that holds
        # its addresses (not one whose old primary still does: --fence none).
        role = status.get("role")
        status["serving"] = (role == "primary" and self.peer_state == "connected") or (
            role == "live" and not busy
        )
        if role == "live":
            status["address_busy"] = busy
        catch_up = self.catch_up()
        if catch_up is not None:
            status["catch_up"] = catch_up
        store = self.log_store()
        if store is not None:
            status["log_store"] = store
        status["channel_rtt_ms"] = self.channel_rtt_ms.summary()
        status["lag_ms"] = self.lag_ms.summary()
        status.update(self.counters)
        status["input_bytes_total"] = self.input_bytes()
        if self.front is not None:
            status["front"] = self.front()
        return status


def _address(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
