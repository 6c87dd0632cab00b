"""UDP sockets: bounded receive queues of datagrams, sends that never block."""

from __future__ import annotations

import errno
import os
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftproxy.netstack import packets

if TYPE_CHECKING:
    from ftproxy.netstack.host import EndpointHost


@dataclass(frozen=True)
class UdpConfig:
    receive_buffer: int = 256 * 1024  # bytes of payload queued per socket; more is dropped


class UdpSocket:
    """A bound UDP port. ``sendto`` queues a datagram (routed through ARP as needed)."""

    def __init__(self, stack: EndpointHost, handle: int, port: int) -> None:
        self._stack = stack
        self.handle = handle
        self.port = port
        self.closed = False
        self._queue: deque[tuple[bytes, tuple[str, int]]] = deque()
        self._queued_bytes = 0
        self._cap = stack.udp_config.receive_buffer

    @property
    def local_address(self) -> tuple[str, int]:
        return (packets.int_to_ip(self._stack.ip_int), self.port)

    def sendto(self, data: bytes | bytearray | memoryview, address: tuple[str, int]) -> int:
        """Send one datagram; raises ``OSError`` (EMSGSIZE: bigger than the MTU allows,
        ENETUNREACH: no route, EBADF: closed)."""
        if self.closed:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        ip, port = address
        if not 0 < port <= 0xFFFF:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        payload = bytes(data)
        self._stack.send_udp_datagram(self.port, packets.ip_to_int(ip), port, payload)
        return len(payload)

    def recvfrom(self) -> tuple[bytes, tuple[str, int]] | None:
        """The oldest queued datagram and its sender, or ``None``."""
        if not self._queue:
            return None
        data, addr = self._queue.popleft()
        self._queued_bytes -= len(data)
        return data, addr

    def readable(self) -> bool:
        return bool(self._queue)

    def writable(self) -> bool:
        return True

    @property
    def queued(self) -> int:
        """Datagrams waiting for ``recvfrom``."""
        return len(self._queue)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._queued_bytes = 0
        self._stack.remove_udp(self)

    def _deliver(self, data: bytes, src_ip: int, src_port: int) -> None:
        if self._queued_bytes + len(data) > self._cap:
            self._stack.count("rx_udp_queue_full")
            return
        self._queue.append((data, (packets.int_to_ip(src_ip), src_port)))
        self._queued_bytes += len(data)
        self._stack.count("udp_received")
        self._stack.touch(self)

    def __repr__(self) -> str:
        return f"<UdpSocket #{self.handle} port {self.port} queued {len(self._queue)}>"
