"""Wire formats: Ethernet II, ARP, IPv4, ICMP, UDP and TCP, with ``struct`` only.

Every parser takes ``bytes`` and returns a small frozen record or ``None`` when the
input is malformed (the stack counts and drops it); every builder returns the
bytes of one header plus payload with checksums filled in. Nothing here keeps
state, reads a clock or draws a random number.

Addresses are ints inside the stack (IPv4 as a 32-bit int, MAC as 6 bytes);
``ip_to_int``/``int_to_ip`` convert at the API boundary.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

ETH_HEADER_LEN: Final = 14
ETHERTYPE_IPV4: Final = 0x0800
ETHERTYPE_ARP: Final = 0x0806
BROADCAST_MAC: Final = b"\xff" * 6
ZERO_MAC: Final = b"\x00" * 6

ARP_REQUEST: Final = 1
ARP_REPLY: Final = 2

IPPROTO_ICMP: Final = 1
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
IPV4_HEADER_LEN: Final = 20
IP_FLAG_DF: Final = 0x4000
IP_FLAG_MF: Final = 0x2000
IP_OFFSET_MASK: Final = 0x1FFF
DEFAULT_TTL: Final = 64

ICMP_ECHO_REPLY: Final = 0
ICMP_DEST_UNREACH: Final = 3
ICMP_ECHO_REQUEST: Final = 8
ICMP_PORT_UNREACH: Final = 3

UDP_HEADER_LEN: Final = 8
TCP_HEADER_LEN: Final = 20

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10
TCP_URG: Final = 0x20

TCP_OPT_END: Final = 0
TCP_OPT_NOP: Final = 1
TCP_OPT_MSS: Final = 2

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6sI6sI")
_IPV4 = struct.Struct("!BBHHHBBHII")
_ICMP_ECHO = struct.Struct("!BBHHH")
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIBBHHH")
_PSEUDO = struct.Struct("!IIBBH")
_MSS_OPTION = struct.Struct("!BBH")


# -- addresses ---------------------------------------------------------------------


def ip_to_int(text: str) -> int:
    """``"10.0.0.1"`` -> ``0x0A000001``; raises ``ValueError`` on anything else."""
    parts = text.split(".")
    if len(parts) != 4:
        raise ValueError(f"not an IPv4 address: {text!r}")
    value = 0
    for part in parts:
        if not part.isdigit() or len(part) > 3:
            raise ValueError(f"not an IPv4 address: {text!r}")
        octet = int(part)
        if octet > 255:
            raise ValueError(f"not an IPv4 address: {text!r}")
        value = (value << 8) | octet
    return value


def int_to_ip(value: int) -> str:
    return f"{(value >> 24) & 255}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"


def mac_to_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def prefix_mask(prefix_len: int) -> int:
    if not 0 <= prefix_len <= 32:
        raise ValueError(f"prefix length out of range: {prefix_len}")
    return (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF


# -- checksum ----------------------------------------------------------------------


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit ones' complement sum of ``data`` (padded with a zero byte if odd).

    2**16 is 1 modulo 0xFFFF, so the big-endian integer of the data is congruent to
    the sum of its 16-bit words: one C-speed modulo replaces a Python loop.
    """
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    value = int.from_bytes(data, "big")
    if value == 0:
        return 0
    rest = value % 0xFFFF
    return rest if rest else 0xFFFF


def _fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data`` plus a ones' sum ``initial``."""
    return ~_fold(ones_sum(data) + initial) & 0xFFFF


def pseudo_header_sum(src: int, dst: int, proto: int, length: int) -> int:
    return ones_sum(_PSEUDO.pack(src, dst, 0, proto, length))


# -- Ethernet ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EthernetHeader:
    dst: bytes
    src: bytes
    ethertype: int


def parse_ethernet(frame: bytes) -> EthernetHeader | None:
    if len(frame) < ETH_HEADER_LEN:
        return None
    dst, src, ethertype = _ETH.unpack_from(frame, 0)
    return EthernetHeader(dst, src, ethertype)


def build_ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return _ETH.pack(dst, src, ethertype) + payload


# -- ARP -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArpPacket:
    op: int
    sender_mac: bytes
    sender_ip: int
    target_mac: bytes
    target_ip: int


def parse_arp(payload: bytes) -> ArpPacket | None:
    """An Ethernet/IPv4 ARP packet, or ``None`` for any other hardware/protocol pair."""
    if len(payload) < _ARP.size:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(payload, 0)
    if htype != 1 or ptype != ETHERTYPE_IPV4 or hlen != 6 or plen != 4:
        return None
    return ArpPacket(op, sha, spa, tha, tpa)


def build_arp(
    op: int, sender_mac: bytes, sender_ip: int, target_mac: bytes, target_ip: int
) -> bytes:
    return _ARP.pack(1, ETHERTYPE_IPV4, 6, 4, op, sender_mac, sender_ip, target_mac, target_ip)


def build_arp_frame(
    op: int, eth_dst: bytes, sender_mac: bytes, sender_ip: int, target_mac: bytes, target_ip: int
) -> bytes:
    arp = build_arp(op, sender_mac, sender_ip, target_mac, target_ip)
    return build_ethernet(eth_dst, sender_mac, ETHERTYPE_ARP, arp)


def build_gratuitous_arp(mac: bytes, ip: str | int) -> bytes:
    """A broadcast gratuitous ARP request announcing that ``ip`` is at ``mac``."""
    addr = ip_to_int(ip) if isinstance(ip, str) else ip
    return build_arp_frame(ARP_REQUEST, BROADCAST_MAC, mac, addr, ZERO_MAC, addr)


# -- IPv4 ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ipv4Header:
    header_len: int
    total_len: int
    ident: int
    flags_fragment: int
    ttl: int
    proto: int
    src: int
    dst: int

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_fragment & IP_FLAG_MF) or bool(self.flags_fragment & IP_OFFSET_MASK)


def parse_ipv4(packet: bytes) -> Ipv4Header | None:
    """The header of an IPv4 packet, or ``None`` if it is malformed or its checksum is bad."""
    if len(packet) < IPV4_HEADER_LEN:
        return None
    ver_ihl, _tos, total_len, ident, flags_frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(
        packet, 0
    )
    if ver_ihl >> 4 != 4:
        return None
    header_len = (ver_ihl & 0x0F) * 4
    if header_len < IPV4_HEADER_LEN or total_len < header_len or total_len > len(packet):
        return None
    if ones_sum(memoryview(packet)[:header_len]) != 0xFFFF:
        return None
    return Ipv4Header(header_len, total_len, ident, flags_frag, ttl, proto, src, dst)


def build_ipv4(
    src: int,
    dst: int,
    proto: int,
    payload: bytes,
    ident: int,
    ttl: int = DEFAULT_TTL,
    df: bool = True,
) -> bytes:
    total = IPV4_HEADER_LEN + len(payload)
    flags = IP_FLAG_DF if df else 0
    header = _IPV4.pack(0x45, 0, total, ident & 0xFFFF, flags, ttl, proto, 0, src, dst)
    csum = checksum(header)
    return header[:10] + csum.to_bytes(2, "big") + header[12:] + payload


# -- ICMP ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IcmpEcho:
    type: int
    code: int
    ident: int
    seq: int
    payload: bytes


def parse_icmp_echo(payload: bytes) -> IcmpEcho | None:
    """An ICMP echo request/reply with a valid checksum, else ``None``."""
    if len(payload) < _ICMP_ECHO.size or ones_sum(payload) != 0xFFFF:
        return None
    icmp_type, code, _csum, ident, seq = _ICMP_ECHO.unpack_from(payload, 0)
    return IcmpEcho(icmp_type, code, ident, seq, bytes(payload[_ICMP_ECHO.size :]))


def build_icmp_echo(icmp_type: int, ident: int, seq: int, data: bytes) -> bytes:
    header = _ICMP_ECHO.pack(icmp_type, 0, 0, ident, seq)
    csum = checksum(header + data)
    return header[:2] + csum.to_bytes(2, "big") + header[4:] + data


def build_icmp_unreachable(code: int, original_ip_packet: bytes) -> bytes:
    """Destination unreachable quoting the original IP header and 8 bytes (RFC 792)."""
    ihl = (original_ip_packet[0] & 0x0F) * 4
    quoted = bytes(original_ip_packet[: ihl + 8])
    header = struct.pack("!BBHI", ICMP_DEST_UNREACH, code, 0, 0)
    csum = checksum(header + quoted)
    return header[:2] + csum.to_bytes(2, "big") + header[4:] + quoted


# -- UDP -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    src_port: int
    dst_port: int
    payload: bytes


def parse_udp(segment: bytes, src: int, dst: int) -> UdpDatagram | None:
    """A UDP datagram whose length and checksum (when present) are right, else ``None``."""
    if len(segment) < UDP_HEADER_LEN:
        return None
    sport, dport, length, csum = _UDP.unpack_from(segment, 0)
    if length < UDP_HEADER_LEN or length > len(segment):
        return None
    body = segment[:length]
    if csum != 0:
        total = ones_sum(body) + pseudo_header_sum(src, dst, IPPROTO_UDP, length)
        if _fold(total) != 0xFFFF:
            return None
    return UdpDatagram(sport, dport, bytes(body[UDP_HEADER_LEN:]))


def build_udp(src: int, dst: int, sport: int, dport: int, data: bytes) -> bytes:
    length = UDP_HEADER_LEN + len(data)
    header = _UDP.pack(sport, dport, length, 0)
    csum = checksum(header + data, pseudo_header_sum(src, dst, IPPROTO_UDP, length))
    if csum == 0:
        csum = 0xFFFF
    return header[:6] + csum.to_bytes(2, "big") + data


# -- TCP -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcpSegment:
    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    mss: int | None
    payload: bytes

    @property
    def syn(self) -> bool:
        return bool(self.flags & TCP_SYN)

    @property
    def fin(self) -> bool:
        return bool(self.flags & TCP_FIN)

    @property
    def rst(self) -> bool:
        return bool(self.flags & TCP_RST)

    @property
    def has_ack(self) -> bool:
        return bool(self.flags & TCP_ACK)

    @property
    def seg_len(self) -> int:
        """Sequence space the segment occupies: data plus one each for SYN and FIN."""
        return (
            len(self.payload)
            + (1 if self.flags & TCP_SYN else 0)
            + (1 if self.flags & TCP_FIN else 0)
        )


def _parse_tcp_options(options: bytes) -> int | None:
    """The MSS option's value if present; every other option is skipped."""
    mss: int | None = None
    i = 0
    n = len(options)
    while i < n:
        kind = options[i]
        if kind == TCP_OPT_END:
            break
        if kind == TCP_OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            break
        length = options[i + 1]
        if length < 2 or i + length > n:
            break
        if kind == TCP_OPT_MSS and length == 4:
            mss = int.from_bytes(options[i + 2 : i + 4], "big")
        i += length
    return mss


def parse_tcp(segment: bytes, src: int, dst: int) -> TcpSegment | None:
    """A TCP segment with a valid checksum and data offset, else ``None``."""
    if len(segment) < TCP_HEADER_LEN:
        return None
    total = ones_sum(segment) + pseudo_header_sum(src, dst, IPPROTO_TCP, len(segment))
    if _fold(total) != 0xFFFF:
        return None
    sport, dport, seq, ack, off_byte, flags, window, _csum, _urg = _TCP.unpack_from(segment, 0)
    data_off = (off_byte >> 4) * 4
    if data_off < TCP_HEADER_LEN or data_off > len(segment):
        return None
    mss = (
        _parse_tcp_options(segment[TCP_HEADER_LEN:data_off]) if data_off > TCP_HEADER_LEN else None
    )
    return TcpSegment(sport, dport, seq, ack, flags & 0x3F, window, mss, bytes(segment[data_off:]))


def build_tcp(
    src: int,
    dst: int,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    data: bytes = b"",
    mss: int | None = None,
) -> bytes:
    options = _MSS_OPTION.pack(TCP_OPT_MSS, 4, mss) if mss is not None else b""
    header_len = TCP_HEADER_LEN + len(options)
    header = (
        _TCP.pack(sport, dport, seq, ack, (header_len // 4) << 4, flags, window, 0, 0) + options
    )
    length = header_len + len(data)
    csum = checksum(header + data, pseudo_header_sum(src, dst, IPPROTO_TCP, length))
    return header[:16] + csum.to_bytes(2, "big") + header[18:] + data
