"""What an endpoint (TCP connection, listener, UDP socket) may ask of its stack.

The endpoints are typed against this protocol, not against ``NetStack``, so the
stack's internals stay its own and this list is the whole contract between them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ftproxy.netstack import packets
    from ftproxy.netstack.stack import Endpoint
    from ftproxy.netstack.tcp import TcpConfig, TcpConnection, TcpListener
    from ftproxy.netstack.timers import Timer
    from ftproxy.netstack.udp import UdpConfig, UdpSocket


class EndpointHost(Protocol):
    """The stack, as its endpoints see it."""

    ip_int: int
    mtu: int
    tcp_config: TcpConfig
    udp_config: UdpConfig

    @property
    def now_ns(self) -> int: ...

    def new_timer(self, callback: Callable[[int], None]) -> Timer:
        """A timer on the stack's virtual clock; ``callback(now_ns)`` when it fires."""
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the statistic ``name``."""
        ...

    def touch(self, endpoint: Endpoint) -> None:
        """Note that ``endpoint``'s readiness may have changed."""
        ...

    def send_tcp_segment(
        self,
        conn: TcpConnection,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        data: bytes,
        mss: int | None,
    ) -> None:
        """Queue one segment of ``conn`` for transmission."""
        ...

    def send_reset_reply(self, src_ip: int, seg: packets.TcpSegment) -> None:
        """Answer a segment that belongs to no connection with RFC 793's reset."""
        ...

    def remove_connection(self, conn: TcpConnection) -> None:
        """Take a finished connection out of the demultiplexing table."""
        ...

    def remove_listener(self, listener: TcpListener) -> None:
        """Free a closed listener's port."""
        ...

    def remove_udp(self, sock: UdpSocket) -> None:
        """Free a closed UDP socket's port."""
        ...

    def send_udp_datagram(self, sport: int, dst: int, dport: int, data: bytes) -> None:
        """Queue one datagram for transmission."""
        ...
