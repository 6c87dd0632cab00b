"""ARP: answer requests for our address, resolve next hops, hold packets meanwhile.

A resolved entry lives ``ttl_ns`` of virtual time; after that it is still used
(the MAC of a peer rarely changes) but each use sends a refresh request at most
once per ``retry_ns``. An unresolved next hop keeps up to ``max_pending`` IP
packets, asks ``max_tries`` times ``retry_ns`` apart, then drops them and
forgets the entry (the next packet starts over; TCP's own retransmission does
the rest).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ftproxy.netstack import packets
from ftproxy.netstack.timers import Timer, TimerQueue

_SECOND = 1_000_000_000


@dataclass(frozen=True)
class ArpConfig:
    retry_ns: int = _SECOND
    max_tries: int = 3
    ttl_ns: int = 60 * _SECOND
    max_pending: int = 64
    max_entries: int = 1024


class _Entry:
    __slots__ = ("expires_ns", "mac", "pending", "refresh_sent_ns", "timer", "tries")

    def __init__(self) -> None:
        self.mac: bytes | None = None
        self.expires_ns = 0
        self.refresh_sent_ns: int | None = None
        self.pending: deque[bytes] = deque()
        self.tries = 0
        self.timer: Timer | None = None


class ArpTable:
    """The neighbour cache of one interface (one MAC, one IPv4 address)."""

    def __init__(
        self,
        mac: bytes,
        ip: int,
        timers: TimerQueue,
        emit: Callable[[bytes], None],
        count: Callable[[str], None],
        config: ArpConfig,
    ) -> None:
        self.mac = mac
        self.ip = ip
        self._timers = timers
        self._emit = emit
        self._count = count
        self.config = config
        self._entries: dict[int, _Entry] = {}

    # -- queries -------------------------------------------------------------------

    def lookup(self, ip: int) -> bytes | None:
        entry = self._entries.get(ip)
        return entry.mac if entry is not None else None

    def entries(self) -> dict[int, bytes]:
        """Resolved entries, ip -> mac, in the order they were created."""
        return {ip: e.mac for ip, e in self._entries.items() if e.mac is not None}

    # -- output --------------------------------------------------------------------

    def send_ip(self, next_hop: int, ip_packet: bytes, now_ns: int) -> None:
        """Send an IPv4 packet to ``next_hop`` now, or once its MAC is known."""
        entry = self._entries.get(next_hop)
        if entry is not None and entry.mac is not None:
            if now_ns >= entry.expires_ns and (
                entry.refresh_sent_ns is None
                or now_ns - entry.refresh_sent_ns >= self.config.retry_ns
            ):
                entry.refresh_sent_ns = now_ns
                self._request(next_hop)
            self._emit(
                packets.build_ethernet(entry.mac, self.mac, packets.ETHERTYPE_IPV4, ip_packet)
            )
            return
        if entry is None:
            self._make_room()
            entry = _Entry()
            self._entries[next_hop] = entry
            entry.timer = self._timers.new_timer(functools.partial(self._retry, next_hop))
            entry.tries = 1
            self._request(next_hop)
            entry.timer.arm(now_ns + self.config.retry_ns)
        if len(entry.pending) >= self.config.max_pending:
            entry.pending.popleft()
            self._count("arp_pending_dropped")
        entry.pending.append(ip_packet)

    def _request(self, target_ip: int) -> None:
        self._count("arp_requests_sent")
        self._emit(
            packets.build_arp_frame(
                packets.ARP_REQUEST,
                packets.BROADCAST_MAC,
                self.mac,
                self.ip,
                packets.ZERO_MAC,
                target_ip,
            )
        )

    def _retry(self, ip: int, now_ns: int) -> None:
        entry = self._entries.get(ip)
        if entry is None or entry.mac is not None or entry.timer is None:
            return
        if entry.tries >= self.config.max_tries:
            self._count("arp_failed")
            for _ in entry.pending:
                self._count("arp_pending_dropped")
            del self._entries[ip]
            return
        entry.tries += 1
        self._request(ip)
        entry.timer.arm(now_ns + self.config.retry_ns)

    def _make_room(self) -> None:
        if len(self._entries) < self.config.max_entries:
            return
        for ip, entry in self._entries.items():
            if entry.mac is not None:
                del self._entries[ip]
                return
        ip = next(iter(self._entries))
        entry = self._entries.pop(ip)
        if entry.timer is not None:
            entry.timer.cancel()

    # -- input ---------------------------------------------------------------------

    def learn(self, ip: int, mac: bytes, now_ns: int, create: bool) -> None:
        """Record ``ip`` at ``mac`` (RFC 826 merge) and flush what waited for it."""
        if (
            ip == 0
            or ip == self.ip
            or mac in (packets.BROADCAST_MAC, packets.ZERO_MAC)
            or mac[0] & 1
        ):
            return
        entry = self._entries.get(ip)
        if entry is None:
            if not create:
                return
            self._make_room()
            entry = _Entry()
            self._entries[ip] = entry
        entry.mac = mac
        entry.expires_ns = now_ns + self.config.ttl_ns
        entry.refresh_sent_ns = None
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        while entry.pending:
            packet = entry.pending.popleft()
            self._emit(packets.build_ethernet(mac, self.mac, packets.ETHERTYPE_IPV4, packet))

    def receive(self, arp: packets.ArpPacket, now_ns: int) -> None:
        if arp.sender_ip == self.ip and arp.sender_mac != self.mac:
            self._count("arp_address_conflict")
        for_us = arp.target_ip == self.ip
        self.learn(arp.sender_ip, arp.sender_mac, now_ns, create=for_us)
        if arp.op == packets.ARP_REQUEST and for_us and arp.sender_ip != self.ip:
            self._count("arp_replies_sent")
            self._emit(
                packets.build_arp_frame(
                    packets.ARP_REPLY,
                    arp.sender_mac,
                    self.mac,
                    self.ip,
                    arp.sender_mac,
                    arp.sender_ip,
                )
            )
