"""What one run measures: the loads, the operations, how long, how many failovers."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bench.load import Load, Op

LOADS = (
    Load("c=1", clients=1, pipeline=1),
    Load("c=50", clients=50, pipeline=1),
    Load("c=1 P=16", clients=1, pipeline=16),
)
OPS = (
    Op("set", 16),
    Op("get", 16),
    Op("set", 4096),
    Op("get", 4096),
    Op("incr", None),
)

# The configurations, in the order they are measured and shown.
BARE = "bare"
RECORD = "record"
NO_RULE = "no-output-rule"
RULE = "output-rule"
RULE_HEALED = "output-rule-healed"  # the pair after a failover and a re-protection
RULE_SILENT = "output-rule-sigstop"  # a failover series only
RULE_ETCD = "output-rule-etcd"  # a failover series only: etcd, not the built-in arbiter, decides
FTPROXY_CONFIGS = (BARE, RECORD, NO_RULE, RULE, RULE_HEALED)
LABELS = {
    BARE: "bare kv.py",
    RECORD: "ftproxy record",
    NO_RULE: "replicated, --no-output-rule",
    RULE: "replicated, output rule",
    RULE_HEALED: "replicated, output rule, re-protected after a kill -9 of the first primary",
    RULE_SILENT: "replicated, output rule, primary SIGSTOPped",
    RULE_ETCD: "replicated, output rule, etcd (3 members) as the arbiter",
    "pyraft": "pyraft, 3 nodes",
    "pysyncobj": "PySyncObj, 3 nodes",
}
SHORT = {
    BARE: "bare",
    RECORD: "record",
    NO_RULE: "no-rule",
    RULE: "rule",
    RULE_HEALED: "rule, healed",
    RULE_SILENT: "rule, SIGSTOP",
    RULE_ETCD: "rule, etcd arbiter",
    "pyraft": "pyraft",
    "pysyncobj": "pysyncobj",
}


@dataclass(frozen=True)
class Plan:
    """How much of everything: ``full()`` takes a few minutes, ``quick()`` under one."""

    quick: bool
    cell_seconds: float  # aimed-for length of one measured load
    rounds: int  # every cell is measured this many times; the median round is kept
    probe_requests: int  # a warm-up run per cell, whose rate sizes the measured run
    max_requests: int
    failovers: int  # SIGKILLs of ftproxy's primary, with and without the output rule
    silent_failovers: int  # SIGSTOPs of the primary: detection by heartbeat timeout
    alternative_failovers: int  # leader kills per alternative (each costs ~5-10 s)
    # The 1-client critical-path breakdown (record, no-rule, rule) and the floors.
    breakdown_requests: int = 2000  # per round and configuration
    breakdown_rounds: int = 3
    breakdown_warmup: int = 300
    floor_trips: int = 20_000  # round trips per floor (pipe, pipe pinned, TCP)
    alternatives: bool = True
    loads: tuple[Load, ...] = LOADS
    ops: tuple[Op, ...] = OPS
    lag_poll_s: float = 0.1
    seed: int = 1

    @classmethod
    def full(cls) -> Plan:
        return cls(
            quick=False,
            cell_seconds=0.6,
            rounds=3,
            probe_requests=200,
            max_requests=200_000,
            failovers=20,
            silent_failovers=10,
            alternative_failovers=3,
        )

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(
            quick=True,
            cell_seconds=0.15,
            rounds=1,
            probe_requests=60,
            max_requests=20_000,
            failovers=3,
            silent_failovers=1,
            alternative_failovers=0,
            breakdown_requests=300,
            breakdown_rounds=1,
            breakdown_warmup=50,
            floor_trips=5000,
        )

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["loads"] = [asdict(load) for load in self.loads]
        out["ops"] = [{"test": op.test, "size": op.size, "label": op.label} for op in self.ops]
        return out
