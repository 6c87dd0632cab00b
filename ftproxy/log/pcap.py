"""Export a log's network conversation as a pcap file that Wireshark can open.

A packet-mode log (its header names the guest's ``network``) holds the Ethernet
frames themselves: the export is exactly those frames, in log order, received
ones (EV_FRAME) at the wall clock of their entry and sent ones (OP_FRAME) at
that of the entry they follow.

A socket-mode log holds what the guest received and sent, not packets, so the
packets are synthesized: every accepted or connected TCP connection gets a
three-way handshake where it first appears, client input (EV_DATA) and guest output
(OP_SEND) become data segments with consistent sequence and acknowledgement
numbers per direction, EV_EOF and OP_SHUTDOWN/OP_CLOSE become FINs and EV_RESET
an RST; EV_DGRAM and OP_SENDTO become UDP datagrams. Each packet carries the
wall clock of the entry it comes from (outputs: the entry they follow).

Addresses come from EV_ACCEPT, from CONNECT and BIND results (attributed to
sockets by ``ftproxy.log.view.map_guest_sockets``). A socket whose addresses the
log does not give gets documentation-range ones (192.0.2.0/24, 2001:db8::/32).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import PcapWriter

from ftproxy.core.records import Entry, Output, Record
from ftproxy.guest import protocol
from ftproxy.log.file import LogContents
from ftproxy.log.view import (
    ROLE_BOUND,
    ROLE_STREAM,
    Reply,
    SocketMap,
    decode_frame,
    decode_replies,
    map_guest_sockets,
)

LINKTYPE_ETHERNET: Final = 1
# The most payload one synthesized segment carries: fits an IP packet's 64 KiB.
MAX_SEGMENT: Final = 60_000
TCP_WINDOW: Final = 65_535
SEQ_MODULO: Final = 1 << 32
# Locally administered unicast MACs, one for the guest's host and one for its peers.
GUEST_MAC: Final = "02:00:00:00:00:01"
PEER_MAC: Final = "02:00:00:00:00:02"
# Stand-in addresses for sockets the log gives none for (RFC 5737, RFC 3849).
PLACEHOLDER_GUEST: Final = {4: "192.0.2.1", 6: "2001:db8::1"}
PLACEHOLDER_PEER: Final = {4: "192.0.2.2", 6: "2001:db8::2"}
PLACEHOLDER_PORT_BASE: Final = 1024

_SHUTDOWN_STOPS_SENDING: Final = (1, 2)  # socket.SHUT_WR, socket.SHUT_RDWR


@dataclass(frozen=True)
class PcapStats:
    """What an export wrote."""

    packets: int
    tcp_streams: int  # packet mode: distinct TCP address and port pairs
    udp_datagrams: int
    # Payload bytes (TCP and UDP) from peers to the guest and back; in packet mode
    # as the frames carry them, retransmissions included.
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class Endpoint:
    """A numeric IP address and a port."""

    host: str
    port: int

    @property
    def version(self) -> int:
        return 6 if ":" in self.host else 4


def endpoint_from(address: Any) -> Endpoint | None:
    """An Endpoint for a socket-module address tuple; None unless it is a numeric IP one.

    An IPv6 zone (``fe80::1%eth0``) is dropped: a packet has no place for it.
    """
    if not isinstance(address, tuple | list) or len(address) not in (2, 4):
        return None
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 65535:
        return None
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    return Endpoint(str(ip), port)


def _placeholder(version: int, role: dict[int, str], sock: int) -> Endpoint:
    return Endpoint(role[version], PLACEHOLDER_PORT_BASE + sock % (65536 - PLACEHOLDER_PORT_BASE))


def _initial_seq(sock: int, side: str) -> int:
    """A fixed-per-stream initial sequence number, so exports are reproducible."""
    return zlib.crc32(f"{sock}:{side}".encode())


@dataclass
class _Direction:
    """One direction of a TCP stream: who sends, and the next sequence number."""

    source: Endpoint
    source_mac: str
    next_seq: int
    fin_sent: bool = False


@dataclass
class _TcpStream:
    """A synthesized TCP connection between the guest and one peer."""

    inbound: _Direction  # peer -> guest
    outbound: _Direction  # guest -> peer
    reset: bool = False

    def sender(self, from_guest: bool) -> tuple[_Direction, _Direction]:
        """(the sending direction, the other one)."""
        if from_guest:
            return self.outbound, self.inbound
        return self.inbound, self.outbound


def _stack(*layers: Any) -> Any:
    """Layers chained into one packet (``a / b / c`` without the copies ``/`` makes)."""
    for upper, lower in itertools.pairwise(layers):
        upper.add_payload(lower)
    return layers[0]


def _ip_layer(source: Endpoint, destination: Endpoint) -> Any:
    if source.version == 6:
        return IPv6(src=source.host, dst=destination.host)
    return IP(src=source.host, dst=destination.host)


class _PcapBuilder:
    """Turns log records into packets, in log order, and writes them."""

    def __init__(self, writer: PcapWriter, sockets: SocketMap, start_ns: int) -> None:
        self._writer = writer
        self._sockets = sockets
        self._streams: dict[int, _TcpStream] = {}
        self._wall_by_seq: dict[int, int] = {}
        self._now_ns = start_ns
        self.packets = 0
        self.udp_datagrams = 0
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def tcp_streams(self) -> int:
        return len(self._streams)

    # -- writing packets ------------------------------------------------

    def _write(self, frame: Any) -> None:
        seconds, nanoseconds = divmod(self._now_ns, 1_000_000_000)
        self._writer.write_packet(bytes(frame), sec=seconds, usec=nanoseconds // 1_000)
        self.packets += 1

    def _segment(self, stream: _TcpStream, from_guest: bool, flags: str, data: bytes = b"") -> None:
        """Write one TCP segment and advance the sender's sequence number."""
        sending, receiving = stream.sender(from_guest)
        tcp = TCP(
            sport=sending.source.port,
            dport=receiving.source.port,
            seq=sending.next_seq,
            ack=receiving.next_seq if "A" in flags else 0,
            flags=flags,
            window=TCP_WINDOW,
        )
        ethernet = Ether(src=sending.source_mac, dst=receiving.source_mac)
        ip = _ip_layer(sending.source, receiving.source)
        self._write(_stack(ethernet, ip, tcp, *([Raw(data)] if data else [])))
        consumed = len(data) + ("S" in flags) + ("F" in flags)
        sending.next_seq = (sending.next_seq + consumed) % SEQ_MODULO

    def _datagram(
        self, source: Endpoint, destination: Endpoint, data: bytes, inbound: bool
    ) -> None:
        source_mac, destination_mac = (PEER_MAC, GUEST_MAC) if inbound else (GUEST_MAC, PEER_MAC)
        ethernet = Ether(src=source_mac, dst=destination_mac)
        udp = UDP(sport=source.port, dport=destination.port)
        self._write(_stack(ethernet, _ip_layer(source, destination), udp, Raw(data)))
        self.udp_datagrams += 1

    # -- TCP streams ----------------------------------------------------

    def _open_stream(
        self, sock: int, guest: Endpoint, peer: Endpoint, guest_connects: bool
    ) -> None:
        """Start a stream with a three-way handshake from whichever side connects."""
        if peer.version != guest.version:
            peer = _placeholder(guest.version, PLACEHOLDER_PEER, sock)
        stream = _TcpStream(
            inbound=_Direction(peer, PEER_MAC, _initial_seq(sock, "peer")),
            outbound=_Direction(guest, GUEST_MAC, _initial_seq(sock, "guest")),
        )
        self._streams[sock] = stream
        self._segment(stream, guest_connects, "S")
        self._segment(stream, not guest_connects, "SA")
        self._segment(stream, guest_connects, "A")

    def _stream(self, sock: int) -> _TcpStream | None:
        """The live stream for ``sock``, opened with stand-in addresses if never seen."""
        stream = self._streams.get(sock)
        if stream is None:
            guest = _placeholder(4, PLACEHOLDER_GUEST, sock)
            peer = _placeholder(4, PLACEHOLDER_PEER, sock)
            self._open_stream(sock, guest, peer, guest_connects=sock < protocol.FIRST_ACCEPTED_SOCK)
            stream = self._streams[sock]
        return None if stream.reset else stream

    def _send_data(self, sock: int, data: bytes, from_guest: bool) -> None:
        stream = self._stream(sock)
        if stream is None or not data:
            return
        for start in range(0, len(data), MAX_SEGMENT):
            self._segment(stream, from_guest, "PA", data[start : start + MAX_SEGMENT])
        if from_guest:
            self.bytes_out += len(data)
        else:
            self.bytes_in += len(data)

    def _finish(self, sock: int, from_guest: bool) -> None:
        stream = self._stream(sock)
        if stream is None:
            return
        sending, _ = stream.sender(from_guest)
        if not sending.fin_sent:
            self._segment(stream, from_guest, "FA")
            sending.fin_sent = True

    def _reset(self, sock: int) -> None:
        stream = self._stream(sock)
        if stream is not None:
            self._segment(stream, False, "RA")
            stream.reset = True

    # -- UDP ------------------------------------------------------------

    def _local_endpoint(self, sock: int, version: int) -> Endpoint:
        guest_socket = self._sockets.find(sock)
        local = None
        if guest_socket is not None and guest_socket.role == ROLE_BOUND:
            local = endpoint_from(guest_socket.local)
        if local is None or local.version != version:
            return _placeholder(version, PLACEHOLDER_GUEST, sock)
        return local

    def _datagram_in(self, sock: int, data: bytes, sender_address: Any) -> None:
        sender = endpoint_from(sender_address)
        if sender is None:
            return
        self._datagram(sender, self._local_endpoint(sock, sender.version), data, inbound=True)
        self.bytes_in += len(data)

    def _datagram_out(self, sock: int, data: bytes, destination_address: Any) -> None:
        destination = endpoint_from(destination_address)
        if destination is None:
            return
        local = self._local_endpoint(sock, destination.version)
        self._datagram(local, destination, data, inbound=False)
        self.bytes_out += len(data)

    # -- records --------------------------------------------------------

    def entry(self, index: int, entry: Entry, reply: Reply) -> None:
        """Packets for one entry whose reply decoded."""
        self._now_ns = reply.wall_ns
        self._wall_by_seq[entry.seq] = reply.wall_ns
        if entry.kind == protocol.KIND_CONNECT:
            self._connected(index, reply.result)
        elif entry.kind == protocol.KIND_WAIT:
            for event in reply.result:
                self._event(tuple(event))

    def _connected(self, index: int, result: Any) -> None:
        sock = self._sockets.sock_of_entry.get(index)
        guest_socket = None if sock is None else self._sockets.find(sock)
        if sock is None or guest_socket is None or guest_socket.role != ROLE_STREAM:
            return
        guest, peer = endpoint_from(result[1]), endpoint_from(result[2])
        if result[0] == 0 and guest is not None and peer is not None:
            self._open_stream(sock, guest, peer, guest_connects=True)

    def _event(self, event: tuple[Any, ...]) -> None:
        code = event[0]
        if code == protocol.EV_ACCEPT:
            _, _listener, conn, peer_address, local_address = event
            peer, guest = endpoint_from(peer_address), endpoint_from(local_address)
            if peer is not None and guest is not None and conn not in self._streams:
                self._open_stream(conn, guest, peer, guest_connects=False)
        elif code == protocol.EV_DATA:
            self._send_data(event[1], event[2], from_guest=False)
        elif code == protocol.EV_EOF:
            self._finish(event[1], from_guest=False)
        elif code == protocol.EV_RESET:
            self._reset(event[1])
        elif code == protocol.EV_DGRAM:
            self._datagram_in(event[1], event[2], event[3])

    def output(self, output: Output) -> None:
        """Packets for one output, at the wall clock of the entry it follows."""
        self._now_ns = self._wall_by_seq.get(output.seq, self._now_ns)
        if output.op == protocol.OP_SEND:
            self._send_data(output.sock, output.data, from_guest=True)
        elif output.op == protocol.OP_SENDTO:
            self._datagram_out(output.sock, output.data, output.extra)
        elif self._ends_guest_sending(output):
            self._finish(output.sock, from_guest=True)

    def _ends_guest_sending(self, output: Output) -> bool:
        """A shutdown for writing, or the close of a TCP stream."""
        if output.op == protocol.OP_SHUTDOWN:
            return output.extra in _SHUTDOWN_STOPS_SENDING
        return output.op == protocol.OP_CLOSE and output.sock in self._streams

    def stats(self) -> PcapStats:
        return PcapStats(
            packets=self.packets,
            tcp_streams=self.tcp_streams,
            udp_datagrams=self.udp_datagrams,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
        )


class _FrameCounts:
    """Totals of the frames a packet-mode export writes, for its PcapStats."""

    def __init__(self) -> None:
        self.packets = 0
        self.udp_datagrams = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._tcp_pairs: set[frozenset[tuple[int, int]]] = set()

    def count(self, frame: bytes, inbound: bool) -> None:
        self.packets += 1
        decoded = decode_frame(frame)
        ip = decoded.ipv4
        if ip is None:
            return
        if decoded.tcp is not None:
            tcp = decoded.tcp
            self._tcp_pairs.add(frozenset({(ip.src, tcp.src_port), (ip.dst, tcp.dst_port)}))
        elif decoded.udp is not None:
            self.udp_datagrams += 1
        if inbound:
            self.bytes_in += len(decoded.payload)
        else:
            self.bytes_out += len(decoded.payload)

    def stats(self) -> PcapStats:
        return PcapStats(
            packets=self.packets,
            tcp_streams=len(self._tcp_pairs),
            udp_datagrams=self.udp_datagrams,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
        )


LoggedFrame = tuple[int | None, bool, bytes]  # wall_ns, inbound, the Ethernet frame


def logged_frames(records: Sequence[Record], replies: dict[int, Reply]) -> list[LoggedFrame]:
    """A packet-mode log's frames in log order, each as (wall_ns, inbound, frame).

    A received frame takes the wall clock of its entry, a sent one that of the
    entry it follows (None when that entry's reply did not decode, or it follows
    none). ``replies`` are the decoded replies by record index (``decode_replies``).
    """
    frames: list[LoggedFrame] = []
    wall_by_seq: dict[int, int] = {}
    for index, record in enumerate(records):
        if isinstance(record, Entry) and index in replies:
            reply = replies[index]
            wall_by_seq[record.seq] = reply.wall_ns
            if record.kind == protocol.KIND_WAIT:
                frames += [
                    (reply.wall_ns, True, e[1]) for e in reply.result if e[0] == protocol.EV_FRAME
                ]
        elif isinstance(record, Output) and record.op == protocol.OP_FRAME:
            frames.append((wall_by_seq.get(record.seq), False, record.data))
    return frames


def _write_frames(
    writer: PcapWriter, contents: LogContents, replies: dict[int, Reply]
) -> PcapStats:
    counts = _FrameCounts()
    now_ns = contents.header.created_ns
    for wall_ns, inbound, frame in logged_frames(contents.records, replies):
        now_ns = now_ns if wall_ns is None else wall_ns
        seconds, nanoseconds = divmod(now_ns, 1_000_000_000)
        writer.write_packet(frame, sec=seconds, usec=nanoseconds // 1_000)
        counts.count(frame, inbound)
    return counts.stats()


def export_pcap(contents: LogContents, path: str | os.PathLike[str]) -> PcapStats:
    """Write the conversation recorded in ``contents`` to ``path`` as a classic
    Ethernet pcap (microsecond timestamps); return what was written.

    Entries whose reply does not decode are skipped.
    """
    replies = decode_replies(contents.records, contents.header.policy.clock_step_ns)
    writer = PcapWriter(os.fspath(path), linktype=LINKTYPE_ETHERNET, endianness="<")
    try:
        writer.write_header(None)  # an empty log still makes a valid, empty capture
        if contents.header.network is not None:
            return _write_frames(writer, contents, replies)
        sockets = map_guest_sockets(contents.records, replies)
        builder = _PcapBuilder(writer, sockets, contents.header.created_ns)
        for index, record in enumerate(contents.records):
            if isinstance(record, Entry) and index in replies:
                builder.entry(index, record, replies[index])
            elif isinstance(record, Output):
                builder.output(record)
    finally:
        writer.close()
    return builder.stats()
