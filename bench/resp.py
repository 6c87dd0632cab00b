"""The benchmark's RESP client: :mod:`ftproxy.tools.resp`, under the names bench/ uses.

The throughput and latency figures come from redis-benchmark, not from here:
this client serves where correctness matters more than speed (which writes were
acknowledged, and are they still there after a failover).
"""

from __future__ import annotations

from ftproxy.tools.resp import Reply, ReplyError, RespClient, call_once, encode_command

encode = encode_command


class Connection(RespClient):
    """One TCP connection to a RESP server on loopback, one command at a time."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        super().__init__(port, timeout=timeout)


__all__ = ["Connection", "Reply", "ReplyError", "call_once", "encode"]
