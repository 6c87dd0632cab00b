"""Packet mode's settings and the parsing of its addresses (re-exported by ``front``)."""

from __future__ import annotations

import ipaddress
import socket as _socket
from dataclasses import dataclass

from ftproxy.core.records import Network


@dataclass(frozen=True)
class PacketConfig:
    """Packet mode's settings on one replica."""

    interface: str
    # None only on a backup given no --vip: it takes the primary's.
    network: Network | None
    # Loss injected on purpose (tests, demos): each frame in or out is dropped
    # with this probability, from a generator seeded with ``drop_seed``.
    drop_rate: float = 0.0
    drop_seed: int = 0


def mac_for_ip(ip: str) -> bytes:
    """The virtual MAC for ``ip``: locally administered ``02:00`` and the address's bytes."""
    return b"\x02\x00" + ipaddress.IPv4Address(ip).packed


def parse_mac(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` (or with ``-``) as 6 bytes of a unicast MAC."""
    parts = text.strip().replace("-", ":").split(":")
    problem = f"MAC address {text!r}: expected six hex bytes, e.g. 02:00:0a:c8:00:64"
    if len(parts) != 6 or not all(len(part) in (1, 2) for part in parts):
        raise ValueError(problem)
    try:
        mac = bytes(int(part, 16) for part in parts)
    except ValueError:
        raise ValueError(problem) from None
    if mac[0] & 1:
        raise ValueError(f"MAC address {text!r} is multicast; a virtual interface needs unicast")
    return mac


def format_mac(mac: bytes) -> str:
    return mac.hex(":")


def parse_network(vip: str, mac: str | None = None, gateway: str | None = None) -> Network:
    """``--vip IP/PREFIX`` (and optional ``--mac``, ``--gateway``) as a pinned Network."""
    try:
        interface = ipaddress.IPv4Interface(vip)
    except ValueError:
        raise ValueError(
            f"--vip {vip!r}: expected an IPv4 address with a prefix, e.g. 10.200.0.100/24"
        ) from None
    if "/" not in vip:
        raise ValueError(f"--vip {vip!r}: give the prefix length too, e.g. {vip}/24")
    ip = str(interface.ip)
    if gateway is not None and ipaddress.IPv4Address(gateway) not in interface.network:
        raise ValueError(f"--gateway {gateway} is not on {interface.network}")
    return Network(
        mac=parse_mac(mac) if mac else mac_for_ip(ip),
        ip=ip,
        prefix_len=interface.network.prefixlen,
        gateway=gateway,
    )


def check_interface(name: str) -> None:
    """Fail early, with the reason, if packet mode cannot use interface ``name`` here."""
    try:
        _socket.if_nametoindex(name)
    except OSError:
        raise ValueError(
            f"--interface {name}: no such network interface here "
            "(inside the lab, each host's is eth0)"
        ) from None
    try:
        probe = _socket.socket(_socket.AF_PACKET, _socket.SOCK_RAW, 0)
    except PermissionError:
        raise ValueError(
            "--front packet needs root (or CAP_NET_RAW) to send and receive raw Ethernet frames"
        ) from None
    probe.close()
