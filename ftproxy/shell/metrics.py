"""A replica's Prometheus metrics: every family declared once, here.

Two kinds, both by Prometheus's conventions (HELP and TYPE for every family,
base units, counters ending in ``_total``; ``promtool check metrics`` passes):

- **status families** read a value from the replica's status snapshot (the
  mapping ``GET /status`` serves) each time ``/metrics`` is scraped. Adding
  one is one line in ``STATUS_FAMILIES``: ``gauge(NAME, HELP, field(PATH))``
  or ``counter(...)``; the value function may return None to leave the family
  out of this scrape (a value the replica does not have yet);
- **histograms** (latencies) are observed as things happen, through
  ``ReplicaMetrics``: the log channel's round trip, the backup's lag, the
  failover time.

prometheus_client writes the text format; each replica has a registry of its
own (``ReplicaMetrics.registry``), never the process-wide default.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from prometheus_client import CollectorRegistry, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ftproxy import __version__

StatusSource = Callable[[], Mapping[str, Any]]
Value = Callable[[Mapping[str, Any]], float | None]

# Latency buckets, in seconds: the channel round trip is sub-millisecond on a
# LAN; lag is bounded by --max-lag-ms (100 ms by default); a failover takes
# ~20 ms after a kill and ~0.6 s after a silence (the 500 ms peer timeout).
RTT_BUCKETS: Final = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FAILOVER_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class StatusFamily:
    """One metric family whose value comes from the status snapshot."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    value: Value


def gauge(name: str, help: str, value: Value) -> StatusFamily:
    return StatusFamily(name, "gauge", help, value)


def counter(name: str, help: str, value: Value) -> StatusFamily:
    if not name.endswith("_total"):
        raise ValueError(f"a counter's name ends in _total: {name}")
    return StatusFamily(name, "counter", help, value)


def field(*path: str, scale: float = 1.0, absent: float | None = None) -> Value:
    """The number at ``path`` in the status (times ``scale``); ``absent`` (None: no
    sample) if it is not there."""

    def read(status: Mapping[str, Any]) -> float | None:
        value: Any = status
        for key in path:
            if not isinstance(value, Mapping) or key not in value:
                return absent
            value = value[key]
        if isinstance(value, bool):
            return float(value)
        if isinstance(value, int | float):
            return value * scale
        return None

    return read


def _protected(status: Mapping[str, Any]) -> float:
    # The pair is protected (``protected`` in /status, on every role), and this replica's
    # outputs are the ones that wait: a backup's own count for nothing.
    return float(bool(status.get("protected")) and status.get("role") != "backup")


def _log_store_failed(status: Mapping[str, Any]) -> float | None:
    store = status.get("log_store")
    if not isinstance(store, Mapping):
        return None
    return float(store.get("error") is not None)


MS: Final = 0.001

STATUS_FAMILIES: Final[Sequence[StatusFamily]] = (
    gauge(
        "ftproxy_protected",
        "On the replica that serves (0 on a backup): 1 while a caught-up backup is attached, "
        "outputs wait for its acknowledgements and the log is whole on disk",
        _protected,
    ),
    counter(
        "ftproxy_divergences_total",
        "Replay divergences found by this replica",
        field("divergences_total"),
    ),
    counter(
        "ftproxy_failovers_total",
        "Times this replica went on alone after winning the arbiter",
        field("failovers_total"),
    ),
    gauge(
        "ftproxy_serving",
        "1 while this replica serves clients: a primary with its backup, or a live replica "
        "that holds its addresses (0 while an old primary still holds them)",
        field("serving"),
    ),
    gauge("ftproxy_generation", "The pair's generation at the arbiter", field("generation")),
    gauge("ftproxy_uptime_seconds", "Seconds since this replica started", field("uptime_s")),
    gauge("ftproxy_icount", "The guest's instruction counter", field("icount")),
    gauge("ftproxy_output_rule", "1 when outputs wait for the backup's acks", field("output_rule")),
    gauge("ftproxy_log_seq", "Sequence number of the last log entry", field("log_seq")),
    gauge("ftproxy_acked_seq", "Last log entry the backup acknowledged", field("acked_seq")),
    gauge("ftproxy_replayed_seq", "Last log entry the backup replayed", field("replayed_seq")),
    gauge("ftproxy_held_outputs", "Outputs waiting for the backup's ack", field("held_outputs")),
    gauge(
        "ftproxy_lag_entries", "Log entries the backup has not replayed", field("lag", "entries")
    ),
    gauge("ftproxy_lag_bytes", "Log bytes the backup has not replayed", field("lag", "bytes")),
    gauge(
        "ftproxy_lag_seconds", "How far the backup's replay is behind", field("lag", "ms", scale=MS)
    ),
    gauge(
        "ftproxy_peer_silent_seconds",
        "Seconds since the peer was last heard",
        field("peer", "silent_ms", scale=MS),
    ),
    counter("ftproxy_exits_total", "Guest exits answered", field("exits_total")),
    counter(
        "ftproxy_outputs_total", "Guest outputs (data, close, datagram)", field("outputs_total")
    ),
    counter("ftproxy_log_bytes_total", "Bytes of log entries written", field("log_bytes_total")),
    counter(
        "ftproxy_input_bytes_total", "Bytes clients sent to the service", field("input_bytes_total")
    ),
    # Re-protection (``ftproxy.shell.reprotect``): the latest joiner's catch-up, 0 before any.
    gauge(
        "ftproxy_catch_up_target_seq",
        "The live replica's last log entry when the latest joiner came",
        field("catch_up", "target_seq", absent=0),
    ),
    gauge(
        "ftproxy_catch_up_acked_seq",
        "Last log entry the latest joiner acknowledged",
        field("catch_up", "acked_seq", absent=0),
    ),
    gauge(
        "ftproxy_catch_up_replayed_seq",
        "Last log entry the latest joiner replayed",
        field("catch_up", "replayed_seq", absent=0),
    ),
    gauge(
        "ftproxy_catch_up_entries_sent",
        "Log entries streamed to the latest joiner",
        field("catch_up", "entries_sent", absent=0),
    ),
    gauge(
        "ftproxy_catch_up_bytes_sent",
        "Log bytes streamed to the latest joiner",
        field("catch_up", "bytes_sent", absent=0),
    ),
    gauge(
        "ftproxy_catch_up_elapsed_seconds",
        "How long the latest joiner's catch-up took (or has taken so far)",
        field("catch_up", "elapsed_s", absent=0),
    ),
    gauge(
        "ftproxy_log_store_entries",
        "Log entries this replica holds (since boot)",
        field("log_store", "entries"),
    ),
    gauge("ftproxy_log_store_bytes", "Log bytes this replica holds", field("log_store", "bytes")),
    gauge(
        "ftproxy_log_store_failed",
        "1 once writing the log to the data dir failed (a full disk): the log is not whole",
        _log_store_failed,
    ),
)

# String fields that become a labelled gauge: ``ftproxy_role{role="primary"} 1``.
STATE_FAMILIES: Final = (
    ("ftproxy_role", "The replica's role", ("role",), "role"),
    ("ftproxy_peer_state", "The log channel's peer", ("peer", "state"), "state"),
    (
        "ftproxy_arbiter_state",
        "This replica's business with the arbiter",
        ("arbiter", "state"),
        "state",
    ),
    (
        "ftproxy_catch_up_state",
        "The latest joiner's catch-up: catching_up, protected, lost or dropped",
        ("catch_up", "state"),
        "state",
    ),
)


class _StatusCollector(Collector):
    def __init__(self, status: StatusSource) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        for family in STATUS_FAMILIES:
            value = family.value(status)
            if value is None:
                continue
            if family.kind == "counter":
                yield CounterMetricFamily(family.name, family.help, value=value)
            else:
                yield GaugeMetricFamily(family.name, family.help, value=value)
        for name, help, path, label in STATE_FAMILIES:
            state: Any = status
            for key in path:
                state = state.get(key) if isinstance(state, Mapping) else None
            if isinstance(state, str):
                metric = GaugeMetricFamily(name, help, labels=[label])
                metric.add_metric([state], 1)
                yield metric


class ReplicaMetrics:
    """The registry behind a replica's ``/metrics``, and the histograms it observes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.channel_rtt = Histogram(
            "ftproxy_channel_rtt_seconds",
            "Log channel round trip: a batch of entries sent to its acknowledgement",
            buckets=RTT_BUCKETS,
            registry=self.registry,
        )
        self.lag = Histogram(
            "ftproxy_lag_observed_seconds",
            "The backup's replay lag, observed at each acknowledgement",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.failover = Histogram(
            "ftproxy_failover_seconds",
            "From losing the peer to serving alone (arbiter won)",
            buckets=FAILOVER_BUCKETS,
            registry=self.registry,
        )
        build = Info(
            "ftproxy_build", "ftproxy's version and the Python it runs on", registry=self.registry
        )
        build.info({"version": __version__, "python": platform.python_version()})

    def serve_status(self, status: StatusSource) -> None:
        """Export the status families, read from ``status`` at each scrape."""
        self.registry.register(_StatusCollector(status))

    def render(self) -> bytes:
        """The registry in the Prometheus text format, version 0.0.4."""
        return generate_latest(self.registry)
