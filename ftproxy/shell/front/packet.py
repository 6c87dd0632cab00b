"""Packet mode: the supervisor moves raw Ethernet frames for one virtual IP and MAC.

The guest owns a user-space TCP/IP stack (``ftproxy.netstack``), so all the
supervisor does is carry frames between a real interface and the guest: one
AF_PACKET socket bound to the interface, in promiscuous mode because the
virtual MAC is not the NIC's own. Every frame handed to the guest becomes a
logged input, so the front filters hard before queueing: frames for the
virtual MAC, and broadcasts that concern the virtual IP, and nothing else.

At go-live the new primary announces the virtual IP with a gratuitous ARP, so
clients' neighbour entries move to it and their TCP connections, whose state
the guest replayed, carry on.

Loss can be injected here (seeded, so a failing run can be repeated): this
kernel has no ``netem``, and the guest's TCP is meant to recover from it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import random
import socket
import struct
from collections import deque
from typing import Any, Final

import structlog
import trio

from ftproxy.guest import protocol
from ftproxy.netstack.packets import (
    BROADCAST_MAC,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    checksum,
    pseudo_header_sum,
)
from ftproxy.shell.front import format_mac, mac_for_ip, parse_mac
from ftproxy.shell.supervisor import GuestFailure
from ftproxy.shell.sync import Doorbell

log = structlog.get_logger()

__all__ = ["PacketFront", "PacketFrontError", "format_mac", "mac_for_ip", "parse_mac", "wanted"]

ETH_P_ALL: Final = 0x0003
MAX_BATCH: Final = 512
# The largest frame a GSO/GRO interface may hand us (64 KiB IP + Ethernet + VLAN),
# so no frame is ever silently truncated; the buffer size costs nothing measurable.
_RECV_SIZE: Final = 65536 + 64
# At most this many frames per wake-up before giving other tasks a turn.
_DRAIN_LIMIT: Final = 1024
_SOCKET_BUFFER: Final = 4 * 1024 * 1024

# Linux constants the socket module does not export.
_SOL_PACKET: Final = 263
_PACKET_ADD_MEMBERSHIP: Final = 1
_PACKET_MR_PROMISC: Final = 1
_PACKET_IGNORE_OUTGOING: Final = 23
_PACKET_AUXDATA: Final = 8
_CSUM_NOT_READY: Final = 8  # TP_STATUS_CSUMNOTREADY in tpacket_auxdata.tp_status
_AUXDATA_SIZE: Final = socket.CMSG_SPACE(20)  # struct tpacket_auxdata
_SO_SNDBUFFORCE: Final = 32
_SO_RCVBUFFORCE: Final = 33
_SIOCGIFFLAGS: Final = 0x8913
_IFF_UP: Final = 0x1

_U32 = struct.Struct("!I")
_U32N = struct.Struct("=I")
_ARP_ETHER_IPV4 = b"\x00\x01\x08\x00\x06\x04"  # htype 1, ptype IPv4, hlen 6, plen 4


def complete_checksum(frame: bytes) -> bytes:
    """``frame`` with its TCP or UDP checksum computed.

    A frame the host sent through a veth (or any device with checksum offload)
    is seen by a packet socket before the checksum is filled in: the kernel
    leaves that to hardware that a virtual link never has, and says so in the
    frame's auxdata (TP_STATUS_CSUMNOTREADY). The guest's stack checks every
    checksum, so the front finishes the job, as the NIC would have.
    """
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return frame
    header_len = (frame[14] & 0x0F) * 4
    proto = frame[23]
    total_len = int.from_bytes(frame[16:18], "big")
    start, end = 14 + header_len, 14 + total_len
    offset = {6: 16, 17: 6}.get(proto)
    if offset is None or end > len(frame) or end - start < offset + 2:
        return frame
    segment = bytearray(frame[start:end])
    segment[offset : offset + 2] = b"\x00\x00"
    src, dst = _U32.unpack_from(frame, 26)[0], _U32.unpack_from(frame, 30)[0]
    value = checksum(segment, pseudo_header_sum(src, dst, proto, len(segment)))
    if proto == 17 and value == 0:
        value = 0xFFFF  # UDP: zero would mean "no checksum"
    segment[offset : offset + 2] = value.to_bytes(2, "big")
    return frame[:start] + bytes(segment) + frame[end:]


class PacketFrontError(Exception):
    """The packet front cannot run: no such interface, no privilege, bad address."""


def wanted(frame: bytes, mac: bytes, ip_int: int, broadcast_int: int | None) -> bool:
    """Is this frame for the guest that owns ``mac`` and the IPv4 address ``ip_int``?

    Yes when it is addressed to ``mac``, or when it is an Ethernet broadcast
    that concerns the address: an ARP whose target is ``ip_int``, or IPv4 to
    ``ip_int``, 255.255.255.255 or the subnet broadcast ``broadcast_int``.
    Everything else (other hosts' traffic seen in promiscuous mode, other ARP,
    multicast) would only be noise in the log. Runs once per frame: ``struct``
    and slices only.
    """
    if len(frame) < 14:
        return False
    destination = frame[:6]
    if destination == mac:
        return True
    if destination != BROADCAST_MAC:
        return False
    ethertype = frame[12] << 8 | frame[13]
    if ethertype == ETHERTYPE_ARP:
        return (
            len(frame) >= 42
            and frame[14:20] == _ARP_ETHER_IPV4
            and _U32.unpack_from(frame, 38)[0] == ip_int
        )
    if ethertype == ETHERTYPE_IPV4:
        if len(frame) < 34:
            return False
        target = _U32.unpack_from(frame, 30)[0]
        return target in (ip_int, 0xFFFFFFFF, broadcast_int)
    return False


def preload_scapy() -> None:
    """Import the scapy layers the front needs (a few hundred ms), while a pause is harmless."""
    from scapy.layers import l2  # noqa: F401


def _gratuitous_arp(mac: bytes, ip: str) -> bytes:
    """The announcement frame for (ip, mac), built with scapy (imported here: it is slow).

    The request form (op 1, sender and target IP both ``ip``, target MAC
    zero; RFC 5227's "ARP Announcement") rather than a reply: Linux treats a
    request with sender IP == target IP as gratuitous and overrides an existing
    neighbour entry at once, whereas a broadcast reply counts as gratuitous
    only if its target MAC equals its sender MAC and is otherwise ignored
    within the entry's ``locktime`` (1 s), which a fast failover falls inside.
    """
    from scapy.layers.l2 import ARP, Ether

    text_mac = format_mac(mac)
    packet = Ether(dst="ff:ff:ff:ff:ff:ff", src=text_mac, type=ETHERTYPE_ARP) / ARP(
        op=1, hwsrc=text_mac, psrc=ip, hwdst="00:00:00:00:00:00", pdst=ip
    )
    return bytes(packet)


class PacketFront:
    """Raw Ethernet frames for one virtual IP/MAC on one interface, for one guest.

    Every method is called from the supervisor's task. ``ip`` may carry a
    prefix length (``10.200.0.100/24``): the subnet's broadcast address is then
    accepted too.
    """

    max_batch: int = MAX_BATCH

    def __init__(
        self,
        nursery: trio.Nursery,
        doorbell: Doorbell,
        interface: str,
        mac: bytes,
        ip: str,
        *,
        drop_rate: float = 0.0,
        drop_seed: int = 0,
        queue_limit: int = 4096,
    ) -> None:
        if len(mac) != 6 or mac[0] & 1:
            raise PacketFrontError(
                f"virtual MAC {bytes(mac).hex(':')!r} must be 6 bytes and not a multicast address"
            )
        try:
            network = ipaddress.IPv4Interface(ip)
        except ValueError as exc:
            raise PacketFrontError(f"virtual IP {ip!r} is not an IPv4 address: {exc}") from None
        if not 0.0 <= drop_rate <= 1.0:
            raise PacketFrontError(f"drop rate must be within [0, 1], got {drop_rate}")
        self.interface = interface
        self.mac = bytes(mac)
        self.ip = str(network.ip)
        self._ip_int = int(network.ip)
        self._broadcast_int: int | None = (
            int(network.network.broadcast_address) if network.network.prefixlen < 31 else None
        )
        self._doorbell = doorbell
        self._queue: deque[bytes] = deque()
        self._queue_limit = queue_limit
        self._overflowing = False
        self._drop_rate = drop_rate
        # Separate streams, so which inputs are lost does not depend on when outputs happen.
        self._drop_in = random.Random(f"in:{drop_seed}")
        self._drop_out = random.Random(f"out:{drop_seed}")
        self._last_send_error = 0
        self._garp: bytes | None = None
        self._announcement_ready = trio.Event()
        self._closed = False
        self._receiving = trio.CancelScope()
        self._preparing = trio.CancelScope()
        self.input_bytes = 0  # bytes of frames handed to the guest, for log-size ratios
        self.stats: dict[str, int] = {
            "frames_in": 0,  # frames handed to the guest
            "frames_received": 0,  # every frame read from the interface
            "frames_filtered": 0,  # not for the guest: other hosts, noise, outgoing frames
            "frames_dropped_in": 0,  # for the guest, but lost: injected loss or queue full
            "frames_sent": 0,
            "frames_dropped_out": 0,  # injected loss, or the interface's buffer was full
            "checksums_completed": 0,  # offloaded checksums the front filled in
        }
        self._sock = self._open(interface)
        nursery.start_soon(self._receive_loop)
        nursery.start_soon(self._prepare_announcement)
        log.info(
            "packet_front_opened",
            interface=interface,
            mac=format_mac(self.mac),
            ip=str(network),
            drop_rate=drop_rate,
        )

    def _open(self, interface: str) -> socket.socket:
        """The AF_PACKET socket, or a PacketFrontError that says what is wrong."""
        try:
            socket.if_nametoindex(interface)
        except (OSError, ValueError):
            raise PacketFrontError(f"network interface {interface!r} does not exist") from None
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except PermissionError:
            raise PacketFrontError(
                f"opening a raw socket on {interface!r} needs root (CAP_NET_RAW)"
            ) from None
        except OSError as exc:
            raise PacketFrontError(
                f"cannot open a raw socket on {interface!r}: {exc.strerror}"
            ) from None
        try:
            sock.setblocking(False)
            sock.bind((interface, ETH_P_ALL))
            index = socket.if_nametoindex(interface)
            membership = struct.pack("iHH8s", index, _PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(_SOL_PACKET, _PACKET_ADD_MEMBERSHIP, membership)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ENODEV, errno.ENXIO):
                raise PacketFrontError(f"network interface {interface!r} does not exist") from None
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise PacketFrontError(
                    f"raw frames on {interface!r} need root (CAP_NET_RAW, CAP_NET_ADMIN)"
                ) from None
            raise PacketFrontError(
                f"cannot use network interface {interface!r}: {exc.strerror}"
            ) from None
        # Best effort: the kernel then does not show us frames leaving through the
        # interface (other sockets' and its own; a packet socket never sees its own
        # sends) at all (Linux >= 4.20; the receive loop drops them anyway), and
        # bursts fit the buffers.
        with contextlib.suppress(OSError):
            sock.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
        # Auxdata says which frames still lack their checksum (see complete_checksum).
        with contextlib.suppress(OSError):
            sock.setsockopt(_SOL_PACKET, _PACKET_AUXDATA, 1)
        for option in (_SO_RCVBUFFORCE, _SO_SNDBUFFORCE):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        try:
            request = struct.pack("16sH22x", interface.encode(), 0)
            flags = struct.unpack_from("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        except OSError:
            flags = _IFF_UP
        if not flags & _IFF_UP:
            log.warning("packet_interface_down", interface=interface)
        return sock

    # -- handing input to the guest ----------------------------------------

    def ready(self, readable: list[int], writable: list[int]) -> bool:
        """Are frames waiting? (The guest's socket ids mean nothing here.)"""
        return bool(self._queue)

    # The receive task reads the socket and rings the doorbell: nothing to pump.
    input_fd = None

    def pump(self) -> None:
        pass

    def collect(
        self, readable: list[int], writable: list[int], pressured: list[int]
    ) -> tuple[bytes, bytes, list[Any]]:
        """Up to ``max_batch`` queued frames, in arrival order, as EV_FRAME events.

        A wait result's packed stream data is socket mode's; frames go in ``events``.
        """
        events: list[Any] = []
        queue = self._queue
        for _ in range(min(len(queue), self.max_batch)):
            frame = queue.popleft()
            events.append((protocol.EV_FRAME, frame))
            self.input_bytes += len(frame)
        self.stats["frames_in"] += len(events)
        return b"", b"", events

    # -- what only socket mode answers ---------------------------------------

    def inherit(self, held: dict[int, bool], next_accepted: int) -> None:
        """Nothing to take over: the guest's connections live in its own stack, and
        survive a failover."""

    def bind(self, sock_id: int, family: int, kind: int, addr: tuple[Any, ...]) -> tuple[int, Any]:
        raise _answered_by_the_guest(protocol.KIND_BIND)

    def listen(self, sock_id: int, backlog: int) -> int:
        raise _answered_by_the_guest(protocol.KIND_LISTEN)

    async def connect(
        self, sock_id: int, family: int, addr: tuple[Any, ...], timeout_ns: int
    ) -> tuple[int, Any, Any]:
        raise _answered_by_the_guest(protocol.KIND_CONNECT)

    # -- outputs -----------------------------------------------------------

    def apply(self, message: tuple[Any, ...]) -> None:
        """Put one guest output on the network: in packet mode only frames exist."""
        if message[0] == protocol.OP_FRAME:
            self.send_frame(message[2])
        else:
            raise ValueError(
                f"a {protocol.OP_NAMES.get(message[0], message[0])} output in packet mode"
            )

    def send_frame(self, frame: bytes) -> None:
        """Put a frame on the wire now, or lose it: never blocks, never raises.

        A network may drop frames; the guest's TCP retransmits. Holding frames
        back instead would only add latency to a retransmission the guest
        schedules anyway.
        """
        if self._drop_rate and self._drop_out.random() < self._drop_rate:
            self.stats["frames_dropped_out"] += 1
            return
        self._transmit(frame)

    def _transmit(self, frame: bytes) -> None:
        if self._closed:
            self.stats["frames_dropped_out"] += 1
            return
        try:
            self._sock.send(frame)
        except OSError as exc:
            self.stats["frames_dropped_out"] += 1
            code = exc.errno or 0
            if code not in (errno.EAGAIN, errno.ENOBUFS) and code != self._last_send_error:
                # Logged once per kind of failure, not once per frame.
                log.warning(
                    "frame_send_failed",
                    interface=self.interface,
                    error=exc.strerror,
                    size=len(frame),
                )
            self._last_send_error = code
            return
        self._last_send_error = 0
        self.stats["frames_sent"] += 1

    def announce(self) -> None:
        """Send one gratuitous ARP for (ip, mac), so neighbours send to this host now."""
        if self._closed:
            log.debug("announce_skipped_closed", ip=self.ip)
            return
        if self._garp is None:
            self._garp = _gratuitous_arp(self.mac, self.ip)
        self._transmit(self._garp)
        log.info(
            "gratuitous_arp_sent", interface=self.interface, ip=self.ip, mac=format_mac(self.mac)
        )

    async def announce_repeatedly(self, count: int = 3, interval_s: float = 0.2) -> None:
        """Announce ``count`` times, ``interval_s`` apart: one frame may be lost.

        Waits for the frame built off the supervisor's thread: building it here
        could import scapy on the event loop and silence the heartbeats longer
        than the peer timeout, which a backup takes for a dead primary.
        """
        await self._announcement_ready.wait()
        for i in range(count):
            if i:
                await trio.sleep(interval_s)
            self.announce()

    # -- tasks -------------------------------------------------------------

    async def _prepare_announcement(self) -> None:
        """Build the gratuitous ARP in a worker thread, so go-live does not wait for scapy.

        Importing scapy takes a few hundred milliseconds; on the supervisor's
        thread that would stall every task, and at go-live it would delay the
        takeover. ``announce`` builds the frame itself if this has not finished.
        """
        with self._preparing:
            garp = await trio.to_thread.run_sync(_gratuitous_arp, self.mac, self.ip)
            if self._garp is None:
                self._garp = garp
            self._announcement_ready.set()

    async def _receive_loop(self) -> None:
        """Wait until readable, then drain without awaiting: ~5x the frames/s of one await each."""
        sock = self._sock
        queue = self._queue
        stats = self.stats
        mac, ip_int, broadcast_int = self.mac, self._ip_int, self._broadcast_int
        outgoing = socket.PACKET_OUTGOING
        with self._receiving:
            while not self._closed:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    return
                queued = 0
                for _ in range(_DRAIN_LIMIT):
                    try:
                        frame, ancillary, _, address = sock.recvmsg(_RECV_SIZE, _AUXDATA_SIZE)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:  # e.g. ENETDOWN once, when the link goes down
                        log.warning(
                            "frame_receive_failed", interface=self.interface, error=exc.strerror
                        )
                        break
                    stats["frames_received"] += 1
                    if address[2] == outgoing or not wanted(frame, mac, ip_int, broadcast_int):
                        stats["frames_filtered"] += 1
                        continue
                    if self._drop_rate and self._drop_in.random() < self._drop_rate:
                        stats["frames_dropped_in"] += 1
                        continue
                    if ancillary and _U32N.unpack_from(ancillary[0][2])[0] & _CSUM_NOT_READY:
                        frame = complete_checksum(frame)
                        stats["checksums_completed"] += 1
                    if len(queue) >= self._queue_limit:
                        stats["frames_dropped_in"] += 1
                        if not self._overflowing:
                            self._overflowing = True
                            log.warning(
                                "frame_queue_full",
                                interface=self.interface,
                                limit=self._queue_limit,
                            )
                        continue
                    self._overflowing = False
                    queue.append(frame)
                    queued += 1
                if queued:
                    self._doorbell.ring()

    def status(self) -> dict[str, Any]:
        """What ``ftproxy status`` shows of this front."""
        return {
            "mode": "packet",
            "vip": self.ip,
            "mac": format_mac(self.mac),
            "interface": self.interface,
            **self.stats,
        }

    def close_all(self) -> None:
        """Close the socket and stop the receive task (the guest ended)."""
        if self._closed:
            return
        self._closed = True
        self._receiving.cancel()
        self._preparing.cancel()
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        self._queue.clear()
        log.info("packet_front_closed", interface=self.interface, **self.stats)


def _answered_by_the_guest(kind: int) -> GuestFailure:
    """A socket set-up exit in packet mode: the guest's own TCP/IP stack answers those."""
    name = protocol.KIND_NAMES.get(kind, f"kind {kind}")
    return GuestFailure(f"a {name} exit in packet mode: the guest's own stack answers those")
