"""The stack: one interface (MAC, IPv4 address/prefix, optional gateway), sans I/O.

Frames go in with ``receive_frame(frame, now_ns)``, frames to transmit come out
of ``take_frames()`` in order, timers fire in ``on_time(now_ns)`` and
``next_deadline()`` says when that is next needed. Randomness (initial sequence
numbers, ephemeral ports) comes only from the caller's ``random32``. The stack
never reads a clock, opens a socket or starts a thread, and every container is
ordered by the calls made, so the same calls give byte-identical frames: a
replica replaying the logged frames into its own stack ends in the same state.

Readiness for a selector: every endpoint whose readiness may have changed is
remembered, in order, until ``take_changed()``; ``epoch`` counts such changes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Final

from ftproxy.netstack import packets
from ftproxy.netstack.arp import ArpConfig, ArpTable
from ftproxy.netstack.tcp import TcpConfig, TcpConnection, TcpListener, TcpState
from ftproxy.netstack.timers import Timer, TimerQueue
from ftproxy.netstack.udp import UdpConfig, UdpSocket

Endpoint = TcpConnection | TcpListener | UdpSocket

_M32: Final = 0xFFFFFFFF


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class NetStack:
    """A deterministic user-space ARP/IPv4/ICMP/UDP/TCP stack for one address."""

    def __init__(
        self,
        mac: bytes,
        ip: str,
        prefix_len: int = 24,
        gateway: str | None = None,
        *,
        random32: Callable[[], int],
        mtu: int = 1500,
        tcp: TcpConfig | None = None,
        arp: ArpConfig | None = None,
        udp: UdpConfig | None = None,
        icmp_port_unreachable: bool = True,
    ) -> None:
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError("mac must be 6 bytes of a unicast address")
        if not 68 <= mtu <= 9000:
            raise ValueError("mtu out of range (68..9000)")
        self.mac = bytes(mac)
        self.ip = ip
        self.ip_int = packets.ip_to_int(ip)
        self.prefix_len = prefix_len
        self.netmask = packets.prefix_mask(prefix_len)
        self.network = self.ip_int & self.netmask
        self.broadcast = self.network | (~self.netmask & _M32)
        self.gateway_int = packets.ip_to_int(gateway) if gateway is not None else None
        if self.gateway_int is not None and not self._on_link(self.gateway_int):
            raise ValueError("the gateway must be on the interface's subnet")
        self.mtu = mtu
        self.tcp_config = tcp if tcp is not None else TcpConfig()
        self.udp_config = udp if udp is not None else UdpConfig()
        self.icmp_port_unreachable = icmp_port_unreachable
        self._random32 = random32
        self._now = 0
        self._timers = TimerQueue()
        self._out: list[bytes] = []
        self.stats: dict[str, int] = {}
        self._arp = ArpTable(
            self.mac,
            self.ip_int,
            self._timers,
            self._out.append,
            self.count,
            arp if arp is not None else ArpConfig(),
        )
        self._ip_ident = 0
        self._next_handle = 1
        self._listeners: dict[int, TcpListener] = {}
        self._conns: dict[tuple[int, int, int], TcpConnection] = {}
        self._udp: dict[int, UdpSocket] = {}
        self._changed: dict[int, Endpoint] = {}
        self.epoch = 0

    # -- the driver's interface ------------------------------------------------------

    @property
    def now_ns(self) -> int:
        """The latest time given to ``receive_frame``/``on_time`` (never goes back)."""
        return self._now

    def receive_frame(self, frame: bytes, now_ns: int) -> None:
        """Process one received Ethernet frame."""
        self._advance(now_ns)
        self.count("rx_frames")
        eth = packets.parse_ethernet(frame)
        if eth is None:
            self.count("rx_runt")
            return
        if eth.dst != self.mac and eth.dst != packets.BROADCAST_MAC:
            self.count("rx_not_for_us")
            return
        payload = frame[packets.ETH_HEADER_LEN :]
        if eth.ethertype == packets.ETHERTYPE_ARP:
            arp = packets.parse_arp(payload)
            if arp is None:
                self.count("rx_bad_arp")
                return
            self._arp.receive(arp, self._now)
        elif eth.ethertype == packets.ETHERTYPE_IPV4:
            self._receive_ipv4(payload)
        else:
            self.count("rx_unknown_ethertype")

    def take_frames(self) -> list[bytes]:
        """Frames to transmit, oldest first; the list is handed over and cleared."""
        if not self._out:
            return []
        frames = self._out[:]
        self._out.clear()
        return frames

    def next_deadline(self) -> int | None:
        """Virtual ns at which ``on_time`` has something to do, or ``None``."""
        return self._timers.next_deadline()

    def on_time(self, now_ns: int) -> None:
        """Advance the clock to ``now_ns`` and fire every due timer."""
        self._advance(now_ns)
        self._timers.run(self._now)

    def take_changed(self) -> list[Endpoint]:
        """Endpoints whose readiness may have changed since the last call, in order."""
        changed = list(self._changed.values())
        self._changed.clear()
        return changed

    def gratuitous_arp(self) -> None:
        """Queue a gratuitous ARP announcing our address (for a takeover)."""
        self._out.append(packets.build_gratuitous_arp(self.mac, self.ip_int))

    def arp_entries(self) -> dict[str, str]:
        return {
            packets.int_to_ip(ip): packets.mac_to_str(mac)
            for ip, mac in self._arp.entries().items()
        }

    @property
    def connections(self) -> list[TcpConnection]:
        """Live TCP connections (TIME-WAIT included), oldest first."""
        return list(self._conns.values())

    # -- the application's interface ---------------------------------------------------

    def tcp_listen(self, port: int, backlog: int = 128) -> TcpListener:
        """Listen on ``port`` (0: an ephemeral port)."""
        if port == 0:
            port = self._ephemeral(lambda p: p not in self._listeners and not self._port_busy(p))
        self._check_port(port)
        if port in self._listeners:
            raise _os_error(errno.EADDRINUSE)
        listener = TcpListener(self, self._new_handle(), port, backlog)
        self._listeners[port] = listener
        return listener

    def tcp_connect(self, ip: str, port: int, local_port: int = 0) -> TcpConnection:
        """Start an active open to ``(ip, port)``; the connection starts in SYN_SENT."""
        remote = packets.ip_to_int(ip)
        self._check_port(port)
        self._check_destination(remote)
        if local_port == 0:
            local_port = self._ephemeral(
                lambda p: p not in self._listeners and (remote, port, p) not in self._conns
            )
        else:
            self._check_port(local_port)
            if (remote, port, local_port) in self._conns:
                raise _os_error(errno.EADDRINUSE)
        conn = TcpConnection(
            self, self._new_handle(), remote, port, local_port, self._random32() & _M32, None
        )
        self._conns[conn.key] = conn
        conn._start_handshake(self._now)
        return conn

    def free_port(self) -> int:
        """An ephemeral port that no listener, connection or UDP socket uses."""
        return self._ephemeral(
            lambda p: p not in self._listeners and p not in self._udp and not self._port_busy(p)
        )

    def udp_bind(self, port: int = 0) -> UdpSocket:
        """A UDP socket bound to ``port`` (0: an ephemeral port)."""
        if port == 0:
            port = self._ephemeral(lambda p: p not in self._udp)
        self._check_port(port)
        if port in self._udp:
            raise _os_error(errno.EADDRINUSE)
        sock = UdpSocket(self, self._new_handle(), port)
        self._udp[port] = sock
        return sock

    # -- what the endpoints may ask of the stack (netstack.host.EndpointHost) -----------

    def new_timer(self, callback: Callable[[int], None]) -> Timer:
        return self._timers.new_timer(callback)

    def _advance(self, now_ns: int) -> None:
        if now_ns > self._now:
            self._now = now_ns

    def count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def touch(self, endpoint: Endpoint) -> None:
        self._changed[endpoint.handle] = endpoint
        self.epoch += 1

    def _new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _check_port(self, port: int) -> None:
        if not 0 < port <= 0xFFFF:
            raise _os_error(errno.EINVAL)

    def _port_busy(self, port: int) -> bool:
        return any(key[2] == port for key in self._conns)

    def _ephemeral(self, free: Callable[[int], bool]) -> int:
        lo, hi = self.tcp_config.ephemeral_ports
        size = hi - lo + 1
        start = self._random32() % size
        for i in range(size):
            port = lo + (start + i) % size
            if free(port):
                return port
        raise _os_error(errno.EADDRNOTAVAIL)

    def _on_link(self, ip: int) -> bool:
        return ip & self.netmask == self.network

    def _check_destination(self, ip: int) -> None:
        if ip == self.ip_int or ip >> 24 == 127:
            raise _os_error(errno.EADDRNOTAVAIL)  # no loopback in this stack
        if ip == 0 or ip >> 28 >= 0xE:
            raise _os_error(errno.ENETUNREACH)
        if not self._on_link(ip) and self.gateway_int is None:
            raise _os_error(errno.ENETUNREACH)

    def _ip_send(self, dst: int, proto: int, payload: bytes) -> None:
        packet = packets.build_ipv4(self.ip_int, dst, proto, payload, self._ip_ident)
        self._ip_ident = (self._ip_ident + 1) & 0xFFFF
        self.count("tx_ip_packets")
        if dst in (0xFFFFFFFF, self.broadcast):
            self._out.append(
                packets.build_ethernet(
                    packets.BROADCAST_MAC, self.mac, packets.ETHERTYPE_IPV4, packet
                )
            )
            return
        if self._on_link(dst):
            next_hop = dst
        elif self.gateway_int is not None:
            next_hop = self.gateway_int
        else:
            self.count("tx_no_route")
            return
        self._arp.send_ip(next_hop, packet, self._now)

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
        segment = packets.build_tcp(
            self.ip_int,
            conn.remote_ip,
            conn.local_port,
            conn.remote_port,
            seq,
            ack,
            flags,
            window,
            data,
            mss,
        )
        self.count("tcp_segments_sent")
        self._ip_send(conn.remote_ip, packets.IPPROTO_TCP, segment)

    def send_reset_reply(self, src_ip: int, seg: packets.TcpSegment) -> None:
        """RFC 793's reset for a segment that belongs to no connection."""
        if seg.rst:
            return
        if seg.has_ack:
            seq, ack, flags = seg.ack, 0, packets.TCP_RST
        else:
            seq, ack, flags = 0, (seg.seq + seg.seg_len) & _M32, packets.TCP_RST | packets.TCP_ACK
        segment = packets.build_tcp(
            self.ip_int, src_ip, seg.dst_port, seg.src_port, seq, ack, flags, 0
        )
        self.count("tcp_rst_sent")
        self._ip_send(src_ip, packets.IPPROTO_TCP, segment)

    def remove_connection(self, conn: TcpConnection) -> None:
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]

    def remove_listener(self, listener: TcpListener) -> None:
        if self._listeners.get(listener.port) is listener:
            del self._listeners[listener.port]

    def remove_udp(self, sock: UdpSocket) -> None:
        if self._udp.get(sock.port) is sock:
            del self._udp[sock.port]

    def send_udp_datagram(self, sport: int, dst: int, dport: int, data: bytes) -> None:
        if len(data) + packets.UDP_HEADER_LEN + packets.IPV4_HEADER_LEN > self.mtu:
            raise _os_error(errno.EMSGSIZE)
        if dst not in (0xFFFFFFFF, self.broadcast):
            self._check_destination(dst)
        self.count("udp_sent")
        self._ip_send(
            dst, packets.IPPROTO_UDP, packets.build_udp(self.ip_int, dst, sport, dport, data)
        )

    # -- receive path ------------------------------------------------------------------

    def _receive_ipv4(self, packet: bytes) -> None:
        ip = packets.parse_ipv4(packet)
        if ip is None:
            self.count("rx_bad_ip")
            return
        to_us = ip.dst == self.ip_int
        if not to_us and ip.dst not in (0xFFFFFFFF, self.broadcast):
            self.count("rx_ip_not_for_us")
            return
        if ip.is_fragment:
            self.count("rx_ip_fragments")
            return
        body = packet[ip.header_len : ip.total_len]
        if ip.proto == packets.IPPROTO_TCP:
            if to_us:
                self._receive_tcp(ip, body)
            else:
                self.count("rx_tcp_broadcast")
        elif ip.proto == packets.IPPROTO_UDP:
            self._receive_udp(ip, body, packet[: ip.total_len], to_us)
        elif ip.proto == packets.IPPROTO_ICMP:
            if to_us:
                self._receive_icmp(ip, body)
        else:
            self.count("rx_unknown_protocol")

    def _receive_icmp(self, ip: packets.Ipv4Header, body: bytes) -> None:
        echo = packets.parse_icmp_echo(body)
        if echo is None:
            self.count("rx_bad_icmp")
            return
        if echo.type == packets.ICMP_ECHO_REQUEST and echo.code == 0:
            self.count("icmp_echo_replies")
            reply = packets.build_icmp_echo(
                packets.ICMP_ECHO_REPLY, echo.ident, echo.seq, echo.payload
            )
            self._ip_send(ip.src, packets.IPPROTO_ICMP, reply)
        else:
            self.count("rx_icmp_other")

    def _receive_udp(self, ip: packets.Ipv4Header, body: bytes, packet: bytes, to_us: bool) -> None:
        dgram = packets.parse_udp(body, ip.src, ip.dst)
        if dgram is None:
            self.count("rx_bad_udp")
            return
        sock = self._udp.get(dgram.dst_port)
        if sock is None:
            self.count("rx_udp_no_port")
            if to_us and self.icmp_port_unreachable:
                self._ip_send(
                    ip.src,
                    packets.IPPROTO_ICMP,
                    packets.build_icmp_unreachable(packets.ICMP_PORT_UNREACH, packet),
                )
            return
        sock._deliver(dgram.payload, ip.src, dgram.src_port)

    def _receive_tcp(self, ip: packets.Ipv4Header, body: bytes) -> None:
        seg = packets.parse_tcp(body, ip.src, ip.dst)
        if seg is None:
            self.count("rx_bad_tcp")
            return
        self.count("tcp_segments_received")
        if seg.src_port == 0 or seg.dst_port == 0 or ip.src >> 28 >= 0xE or ip.src == 0:
            self.count("rx_tcp_bad_address")
            return
        key = (ip.src, seg.src_port, seg.dst_port)
        conn = self._conns.get(key)
        if conn is not None and conn.state is TcpState.TIME_WAIT and seg.syn and not seg.has_ack:
            # A new incarnation may reuse the pair once its SYN is beyond the old stream.
            listener = self._listeners.get(seg.dst_port)
            newer = ((seg.seq - conn.irs - conn.rcv_nxt) & _M32) - 1 < 0x7FFFFFFF
            if listener is not None and newer:
                conn._finish()
                conn = None
        if conn is not None:
            conn._on_segment(seg)
            return
        listener = self._listeners.get(seg.dst_port)
        if listener is not None and seg.syn and not seg.has_ack and not seg.rst:
            if not listener._can_accept_syn():
                self.count("tcp_syn_dropped")
                return
            conn = TcpConnection(
                self,
                self._new_handle(),
                ip.src,
                seg.src_port,
                seg.dst_port,
                self._random32() & _M32,
                listener,
            )
            self._conns[key] = conn
            listener._add_pending(conn)
            conn._accept_syn(seg, self._now)
            return
        if listener is not None and seg.rst:
            return
        self.count("rx_tcp_no_connection")
        self.send_reset_reply(ip.src, seg)
