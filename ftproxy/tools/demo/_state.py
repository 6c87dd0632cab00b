"""What a running demo holds: the view reads it, the run fills it in."""

from __future__ import annotations

from dataclasses import dataclass, field

from ftproxy.tools import etcdlocal
from ftproxy.tools.demo._config import DemoConfig
from ftproxy.tools.demo._load import ConnectionLoad, Events, Load
from ftproxy.tools.demo._procs import Replica


@dataclass
class Demo:
    """Everything the live view shows, filled in as the run goes."""

    config: DemoConfig
    events: Events
    replicas: list[Replica] = field(default_factory=list)
    arbiter: Replica | None = None  # --packet: the arbiter's process in its lab host
    etcd: etcdlocal.EtcdCluster | None = None  # --etcd: the cluster deciding the failover
    load: Load | ConnectionLoad | None = None
    rate: float = 0.0  # replies per second, over the last second
