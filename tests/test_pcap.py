"""export_pcap on synthetic logs, read back with scapy: packets, streams, bytes, numbers."""

from __future__ import annotations

import errno
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet
from scapy.utils import rdpcap

from ftproxy.core.records import FORMAT_VERSION, End, Entry, Header, Network, Output, Policy, Record
from ftproxy.guest import protocol as p
from ftproxy.log.file import LogContents, LogWriter, read_log
from ftproxy.log.pcap import MAX_SEGMENT, PcapStats, export_pcap
from ftproxy.netstack import packets as pk

WALL_START_NS = 1_714_564_801_000_000_000
WALL_STEP_NS = 2_500_000
CONN = p.FIRST_ACCEPTED_SOCK
SERVER = ("127.0.0.1", 6380)
CLIENT = ("127.0.0.1", 53120)
SEQ_MODULO = 1 << 32
Key = tuple[str, int, str, int]  # source host, source port, destination host, destination port


class LogBuilder:
    """Records for a synthetic log: entries numbered from 1, outputs after the last one."""

    def __init__(self, network: Network | None = None) -> None:
        self.records: list[Record] = []
        self.seq = 0
        self.network = network
        self.clock = p.GuestClock(1000)

    def wall_ns(self, seq: int) -> int:
        return WALL_START_NS + seq * WALL_STEP_NS

    def entry(self, kind: int, result: Any, *, reply: bytes | None = None) -> int:
        self.seq += 1
        icount = self.seq * 10
        if reply is None:
            deltas = self.clock.deltas_to(icount, self.seq * 1000, self.wall_ns(self.seq))
            reply = p.encode_reply(*deltas, result)
        self.records.append(Entry(self.seq, icount, kind, 0, reply))
        return self.seq

    def wait(self, *events: tuple[Any, ...]) -> int:
        return self.entry(p.KIND_WAIT, p.wait_result(events))

    def output(self, op: int, sock: int, data: bytes = b"", extra: Any = None) -> None:
        self.records.append(Output(self.seq, op, sock, data, extra))

    def accept(self, conn: int, peer: Any = CLIENT, local: Any = SERVER) -> int:
        return self.wait((p.EV_ACCEPT, 1000, conn, peer, local))

    def write(self, path: Path) -> LogContents:
        header = Header(
            FORMAT_VERSION,
            ["svc"],
            {},
            "/",
            "3.11",
            Policy(200, 1000),
            WALL_START_NS,
            self.network,
        )
        writer = LogWriter(path, header)
        for record in [*self.records, End("guest_exited", 0)]:
            writer.append(record)
        writer.close()
        return read_log(path)


def export(log: LogBuilder, directory: Path) -> tuple[PcapStats, list[Packet]]:
    stats = export_pcap(log.write(directory / "svc.log"), directory / "svc.pcap")
    return stats, list(rdpcap(str(directory / "svc.pcap")))


def ip_of(packet: Packet) -> Any:
    return packet[IPv6] if IPv6 in packet else packet[IP]


def key_of(packet: Packet) -> Key:
    layer = packet[TCP] if TCP in packet else packet[UDP]
    return (ip_of(packet).src, layer.sport, ip_of(packet).dst, layer.dport)


def tcp_directions(packets: list[Packet]) -> dict[Key, list[Packet]]:
    """TCP packets by direction, in capture order."""
    flows: dict[Key, list[Packet]] = defaultdict(list)
    for packet in packets:
        if TCP in packet:
            flows[key_of(packet)].append(packet)
    return flows


def reassemble(flow: list[Packet]) -> bytes:
    """One direction's payload, checking that sequence numbers run without gap or overlap."""
    assert "S" in flow[0][TCP].flags
    expected = (flow[0][TCP].seq + 1) % SEQ_MODULO
    data = bytearray()
    for packet in flow[1:]:
        tcp = packet[TCP]
        assert tcp.seq == expected, f"gap or overlap at {tcp.seq}, expected {expected}"
        payload = bytes(tcp.payload)
        data += payload
        expected = (expected + len(payload) + ("F" in tcp.flags)) % SEQ_MODULO
    return bytes(data)


def flags_of(flow: list[Packet]) -> list[str]:
    return [str(packet[TCP].flags) for packet in flow]


def usec(packet: Packet) -> int:
    return int(packet.time * 1_000_000)


def reverse(key: Key) -> Key:
    return (key[2], key[3], key[0], key[1])


def test_accepted_connection_has_handshake_data_and_fins(tmp_path: Path) -> None:
    log = LogBuilder()
    accepted_at = log.accept(CONN)
    log.wait((p.EV_DATA, CONN, b"*1\r\n$4\r\nPING\r\n"))
    log.output(p.OP_SEND, CONN, b"+PONG\r\n")
    log.wait((p.EV_DATA, CONN, b"*1\r\n$4\r\nQUIT\r\n"), (p.EV_EOF, CONN))
    replied_at = log.seq
    log.output(p.OP_SEND, CONN, b"+OK\r\n")
    log.output(p.OP_CLOSE, CONN)
    stats, packets = export(log, tmp_path)

    client_key = (*CLIENT, *SERVER)
    flows = tcp_directions(packets)
    assert set(flows) == {client_key, reverse(client_key)}
    inbound, outbound = flows[client_key], flows[reverse(client_key)]
    assert [str(packet[TCP].flags) for packet in packets[:3]] == ["S", "SA", "A"]
    assert key_of(packets[0]) == client_key
    assert packets[1][TCP].ack == packets[0][TCP].seq + 1
    assert packets[2][TCP].ack == packets[1][TCP].seq + 1
    assert reassemble(inbound) == b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nQUIT\r\n"
    assert reassemble(outbound) == b"+PONG\r\n+OK\r\n"
    assert flags_of(inbound)[-1] == "FA"  # the client's EOF, after its data
    assert flags_of(outbound)[-1] == "FA"  # the guest's close
    assert usec(packets[0]) == log.wall_ns(accepted_at) // 1000
    assert usec(outbound[-2]) == log.wall_ns(replied_at) // 1000  # "+OK" follows that entry
    assert stats == PcapStats(
        packets=len(packets), tcp_streams=1, udp_datagrams=0, bytes_in=28, bytes_out=12
    )


def test_checksums_are_valid(tmp_path: Path) -> None:
    log = LogBuilder()
    log.entry(p.KIND_BIND, (0, ("0.0.0.0", 5353)))
    log.accept(CONN)
    log.wait((p.EV_DATA, CONN, b"ping"), (p.EV_DGRAM, 1001, b"dg", ("10.0.0.7", 40000)))
    log.accept(CONN + 1, peer=("::1", 50000, 0, 0), local=("::1", 7000, 0, 0))
    log.output(p.OP_SEND, CONN + 1, b"pong")
    _, packets = export(log, tmp_path)
    assert len(packets) == 3 + 1 + 1 + 3 + 1
    for packet in packets:
        recomputed = packet.copy()
        for layer in (IP, TCP, UDP):
            if layer in recomputed and hasattr(recomputed[layer], "chksum"):
                del recomputed[layer].chksum
        assert bytes(recomputed) == bytes(packet)


def test_acks_follow_the_other_direction(tmp_path: Path) -> None:
    log = LogBuilder()
    log.accept(CONN)
    log.wait((p.EV_DATA, CONN, b"abc"))
    log.output(p.OP_SEND, CONN, b"defgh")
    log.wait((p.EV_DATA, CONN, b"ij"))
    _, packets = export(log, tmp_path)
    data_packets = [packet for packet in packets if bytes(packet[TCP].payload)]
    client_isn, server_isn = packets[0][TCP].seq, packets[1][TCP].seq
    assert [packet[TCP].ack for packet in data_packets] == [
        server_isn + 1,
        client_isn + 1 + 3,
        server_isn + 1 + 5,
    ]


def test_guest_connection_starts_with_guest_syn_and_ends_with_reset(tmp_path: Path) -> None:
    log = LogBuilder()
    log.entry(p.KIND_CONNECT, (errno.ECONNREFUSED, None, None))
    log.entry(p.KIND_CONNECT, (0, ("10.0.0.5", 41000), ("10.0.0.9", 80)))
    log.output(p.OP_SEND, 1001, b"GET / HTTP/1.0\r\n\r\n")
    log.output(p.OP_SHUTDOWN, 1001, b"", 1)
    log.wait((p.EV_DATA, 1001, b"HTTP/1.0 200 OK\r\n"), (p.EV_RESET, 1001, errno.ECONNRESET))
    log.output(p.OP_CLOSE, 1001)  # after the reset: nothing more on the wire
    stats, packets = export(log, tmp_path)

    guest_key = ("10.0.0.5", 41000, "10.0.0.9", 80)
    flows = tcp_directions(packets)
    assert key_of(packets[0]) == guest_key and str(packets[0][TCP].flags) == "S"
    assert reassemble(flows[guest_key]) == b"GET / HTTP/1.0\r\n\r\n"
    assert flags_of(flows[guest_key])[-1] == "FA"
    assert reassemble(flows[reverse(guest_key)][:-1]) == b"HTTP/1.0 200 OK\r\n"
    reset = packets[-1]
    assert key_of(reset) == reverse(guest_key) and "R" in reset[TCP].flags
    assert reset[TCP].seq == flows[reverse(guest_key)][-2][TCP].seq + len(b"HTTP/1.0 200 OK\r\n")
    assert stats.tcp_streams == 1 and stats.packets == 7


def test_shutdown_then_close_sends_one_fin(tmp_path: Path) -> None:
    log = LogBuilder()
    log.accept(CONN)
    log.output(p.OP_SHUTDOWN, CONN, b"", 0)  # SHUT_RD: nothing on the wire
    log.output(p.OP_SEND, CONN, b"bye")
    log.output(p.OP_SHUTDOWN, CONN, b"", 2)
    log.output(p.OP_CLOSE, CONN)
    _, packets = export(log, tmp_path)
    outbound = tcp_directions(packets)[(*SERVER, *CLIENT)]
    assert flags_of(outbound) == ["SA", "PA", "FA"]


def test_udp_datagrams_in_and_out(tmp_path: Path) -> None:
    log = LogBuilder()
    log.entry(p.KIND_BIND, (0, ("0.0.0.0", 5353)))
    log.wait((p.EV_DGRAM, 1000, b"\x00\x01query", ("10.0.0.7", 40000)))
    log.output(p.OP_SENDTO, 1000, b"answer", ("10.0.0.7", 40000))
    stats, packets = export(log, tmp_path)
    assert [key_of(packet) for packet in packets] == [
        ("10.0.0.7", 40000, "0.0.0.0", 5353),
        ("0.0.0.0", 5353, "10.0.0.7", 40000),
    ]
    assert [bytes(packet[UDP].payload) for packet in packets] == [b"\x00\x01query", b"answer"]
    assert stats == PcapStats(packets=2, tcp_streams=0, udp_datagrams=2, bytes_in=7, bytes_out=6)


def test_ipv6_connection_and_datagram(tmp_path: Path) -> None:
    log = LogBuilder()
    log.entry(p.KIND_BIND, (0, ("::", 7000, 0, 0)))  # the listener, 1000
    log.entry(p.KIND_LISTEN, 0)
    log.entry(p.KIND_BIND, (0, ("::1", 5353, 0, 0)))  # a UDP socket, 1001
    log.accept(CONN, peer=("::1", 50000, 0, 0), local=("fe80::1%lo", 7000, 0, 1))
    log.wait((p.EV_DATA, CONN, b"hello"), (p.EV_DGRAM, 1001, b"dg", ("::1", 40000, 0, 0)))
    log.output(p.OP_SEND, CONN, b"world")
    _, packets = export(log, tmp_path)
    assert all(IPv6 in packet and IP not in packet for packet in packets)
    flows = tcp_directions(packets)
    assert reassemble(flows[("::1", 50000, "fe80::1", 7000)]) == b"hello"
    assert reassemble(flows[("fe80::1", 7000, "::1", 50000)]) == b"world"
    datagram = next(packet for packet in packets if UDP in packet)
    assert key_of(datagram) == ("::1", 40000, "::1", 5353)


def test_large_data_is_split_into_segments(tmp_path: Path) -> None:
    big_in = bytes(range(256)) * 600  # 153600 bytes
    big_out = b"x" * (MAX_SEGMENT + 1)
    log = LogBuilder()
    log.accept(CONN)
    pieces = range(0, len(big_in), MAX_SEGMENT)  # at most RECV_CHUNK each, as the front does
    log.wait(*((p.EV_DATA, CONN, big_in[at : at + MAX_SEGMENT]) for at in pieces))
    log.output(p.OP_SEND, CONN, big_out)
    _, packets = export(log, tmp_path)
    flows = tcp_directions(packets)
    inbound, outbound = flows[(*CLIENT, *SERVER)], flows[(*SERVER, *CLIENT)]
    assert all(len(packet[TCP].payload) <= MAX_SEGMENT for packet in packets)
    assert len(inbound) == 2 + 3 and len(outbound) == 1 + 2
    assert reassemble(inbound) == big_in
    assert reassemble(outbound) == big_out


def test_undecodable_entries_are_skipped(tmp_path: Path) -> None:
    log = LogBuilder()
    log.accept(CONN)
    log.entry(p.KIND_WAIT, None, reply=b"\xffgarbage")
    log.wait((p.EV_DATA, CONN, b"ok"))
    _, packets = export(log, tmp_path)
    assert reassemble(tcp_directions(packets)[(*CLIENT, *SERVER)]) == b"ok"


def test_empty_log_gives_an_empty_capture(tmp_path: Path) -> None:
    stats, packets = export(LogBuilder(), tmp_path)
    assert packets == [] and stats.packets == 0
    assert (tmp_path / "svc.pcap").read_bytes()[:4] == b"\xd4\xc3\xb2\xa1"  # classic, LE, usec


def test_streams_without_setup_get_placeholder_addresses(tmp_path: Path) -> None:
    log = LogBuilder()
    log.wait((p.EV_DATA, CONN, b"orphan"))
    stats, packets = export(log, tmp_path)
    assert str(packets[0][TCP].flags) == "S" and packets[0][IP].src == "192.0.2.2"
    assert reassemble(tcp_directions(packets)[key_of(packets[0])]) == b"orphan"
    assert stats.tcp_streams == 1


Step = tuple[int, bool, bytes]  # connection index, from the guest, data

chunk = st.one_of(
    st.binary(min_size=1, max_size=40),
    st.integers(MAX_SEGMENT - 2, MAX_SEGMENT + 2).map(lambda size: b"z" * size),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    connections=st.integers(1, 3),
    steps=st.lists(st.tuples(st.integers(0, 2), st.booleans(), chunk), max_size=25),
)
def test_streams_reassemble_to_the_chunks(
    tmp_path_factory: pytest.TempPathFactory, connections: int, steps: list[Step]
) -> None:
    log = LogBuilder()
    clients = [("192.168.1.10", 50000 + index) for index in range(connections)]
    log.wait(*((p.EV_ACCEPT, 1000, CONN + i, client, SERVER) for i, client in enumerate(clients)))
    sent: dict[tuple[int, bool], bytes] = defaultdict(bytes)
    for index, from_guest, data in steps:
        conn = CONN + index % connections
        if from_guest:
            log.output(p.OP_SEND, conn, data)
        else:
            log.wait((p.EV_DATA, conn, data))
        sent[(index % connections, from_guest)] += data
    log.wait(*((p.EV_EOF, CONN + i) for i in range(connections)))

    stats, packets = export(log, tmp_path_factory.mktemp("prop"))
    flows = tcp_directions(packets)
    assert len(flows) == 2 * connections
    for index, client in enumerate(clients):
        client_key = (*client, *SERVER)
        assert reassemble(flows[client_key]) == sent[(index, False)]
        assert reassemble(flows[reverse(client_key)]) == sent[(index, True)]
        assert flags_of(flows[client_key])[-1] == "FA"
    assert stats.bytes_in == sum(len(d) for (_, out), d in sent.items() if not out)
    assert stats.bytes_out == sum(len(d) for (_, out), d in sent.items() if out)


# -- packet mode: the logged Ethernet frames themselves ---------------------------

GUEST_MAC = b"\x02\x00\x0a\xc8\x00\x64"
CLIENT_MAC = b"\x02\x00\x0a\xc8\x00\x0a"
GUEST_IP = pk.ip_to_int("10.200.0.100")
CLIENT_IP = pk.ip_to_int("10.200.0.10")
NETWORK = Network(GUEST_MAC, "10.200.0.100", 24)
PCAP_HEADER = struct.Struct("<IHHiIII")
PCAP_RECORD = struct.Struct("<IIII")


def ip_frame(proto: int, payload: bytes, inbound: bool) -> bytes:
    src, dst = (CLIENT_IP, GUEST_IP) if inbound else (GUEST_IP, CLIENT_IP)
    macs = (GUEST_MAC, CLIENT_MAC) if inbound else (CLIENT_MAC, GUEST_MAC)
    packet = pk.build_ipv4(src, dst, proto, payload, ident=1)
    return pk.build_ethernet(*macs, pk.ETHERTYPE_IPV4, packet)


def tcp_frame(flags: int, seq: int, ack: int, data: bytes = b"", *, inbound: bool) -> bytes:
    src, dst = (CLIENT_IP, GUEST_IP) if inbound else (GUEST_IP, CLIENT_IP)
    ports = (41234, 6380) if inbound else (6380, 41234)
    segment = pk.build_tcp(src, dst, *ports, seq, ack, flags, 65535, data)
    return ip_frame(pk.IPPROTO_TCP, segment, inbound)


def udp_frame(data: bytes, *, inbound: bool) -> bytes:
    src, dst = (CLIENT_IP, GUEST_IP) if inbound else (GUEST_IP, CLIENT_IP)
    ports = (40000, 9999) if inbound else (9999, 40000)
    return ip_frame(pk.IPPROTO_UDP, pk.build_udp(src, dst, *ports, data), inbound)


def echo_frame(icmp_type: int, *, inbound: bool) -> bytes:
    return ip_frame(pk.IPPROTO_ICMP, pk.build_icmp_echo(icmp_type, 7, 1, b"abcd"), inbound)


ARP_REQUEST = pk.build_arp_frame(
    pk.ARP_REQUEST, pk.BROADCAST_MAC, CLIENT_MAC, CLIENT_IP, pk.ZERO_MAC, GUEST_IP
)
ARP_REPLY = pk.build_arp_frame(pk.ARP_REPLY, CLIENT_MAC, GUEST_MAC, GUEST_IP, CLIENT_MAC, CLIENT_IP)
SYN, ACK, PSH = pk.TCP_SYN, pk.TCP_ACK, pk.TCP_PSH


def read_pcap(path: Path) -> tuple[int, list[tuple[int, bytes]]]:
    """A classic little-endian pcap's link type and its (timestamp in usec, frame) records."""
    data = path.read_bytes()
    magic, _major, _minor, _zone, _sigfigs, _snaplen, linktype = PCAP_HEADER.unpack_from(data)
    assert magic == 0xA1B2C3D4
    records = []
    offset = PCAP_HEADER.size
    while offset < len(data):
        seconds, micros, captured, length = PCAP_RECORD.unpack_from(data, offset)
        offset += PCAP_RECORD.size
        assert captured == length
        records.append((seconds * 1_000_000 + micros, data[offset : offset + captured]))
        offset += captured
    return linktype, records


def test_packet_mode_exports_exactly_the_logged_frames(tmp_path: Path) -> None:
    announce = pk.build_gratuitous_arp(GUEST_MAC, GUEST_IP)
    log = LogBuilder(NETWORK)
    log.output(p.OP_FRAME, 0, announce)  # before any entry: at the log's creation
    log.entry(p.KIND_BOOT, (b"\x01" * 32, 99, 200, 1000, "vm", NETWORK.boot_value()))
    arp_at = log.wait((p.EV_FRAME, ARP_REQUEST))
    log.output(p.OP_FRAME, 0, ARP_REPLY)
    syn_at = log.wait((p.EV_FRAME, tcp_frame(SYN, 100, 0, inbound=True)))
    log.output(p.OP_FRAME, 0, tcp_frame(SYN | ACK, 500, 101, inbound=False))
    data_at = log.wait(
        (p.EV_FRAME, tcp_frame(ACK, 101, 501, inbound=True)),
        (p.EV_SIGNAL, 2),
        (p.EV_FRAME, tcp_frame(PSH | ACK, 101, 501, b"PING\r\n", inbound=True)),
    )
    log.output(p.OP_FRAME, 0, tcp_frame(PSH | ACK, 501, 107, b"+PONG\r\n", inbound=False))
    udp_at = log.wait((p.EV_FRAME, udp_frame(b"hello!", inbound=True)))
    log.output(p.OP_FRAME, 0, udp_frame(b"1:hello!", inbound=False))
    ping_at = log.wait((p.EV_FRAME, echo_frame(pk.ICMP_ECHO_REQUEST, inbound=True)))
    log.output(p.OP_FRAME, 0, echo_frame(pk.ICMP_ECHO_REPLY, inbound=False))
    stats = export_pcap(log.write(tmp_path / "svc.log"), tmp_path / "svc.pcap")

    linktype, records = read_pcap(tmp_path / "svc.pcap")
    assert linktype == 1  # Ethernet
    expected = [
        (WALL_START_NS, announce),
        (log.wall_ns(arp_at), ARP_REQUEST),
        (log.wall_ns(arp_at), ARP_REPLY),
        (log.wall_ns(syn_at), tcp_frame(SYN, 100, 0, inbound=True)),
        (log.wall_ns(syn_at), tcp_frame(SYN | ACK, 500, 101, inbound=False)),
        (log.wall_ns(data_at), tcp_frame(ACK, 101, 501, inbound=True)),
        (log.wall_ns(data_at), tcp_frame(PSH | ACK, 101, 501, b"PING\r\n", inbound=True)),
        (log.wall_ns(data_at), tcp_frame(PSH | ACK, 501, 107, b"+PONG\r\n", inbound=False)),
        (log.wall_ns(udp_at), udp_frame(b"hello!", inbound=True)),
        (log.wall_ns(udp_at), udp_frame(b"1:hello!", inbound=False)),
        (log.wall_ns(ping_at), echo_frame(pk.ICMP_ECHO_REQUEST, inbound=True)),
        (log.wall_ns(ping_at), echo_frame(pk.ICMP_ECHO_REPLY, inbound=False)),
    ]
    assert [frame for _, frame in records] == [frame for _, frame in expected]
    assert [usec for usec, _ in records] == [wall_ns // 1000 for wall_ns, _ in expected]
    assert stats == PcapStats(
        packets=12, tcp_streams=1, udp_datagrams=2, bytes_in=6 + 6, bytes_out=7 + 8
    )
    # Wireshark's view, through scapy: the same conversation, layer by layer.
    packets = list(rdpcap(str(tmp_path / "svc.pcap")))
    assert [str(packet[TCP].flags) for packet in packets if TCP in packet] == [
        "S",
        "SA",
        "A",
        "PA",
        "PA",
    ]
    assert [bytes(packet[UDP].payload) for packet in packets if UDP in packet] == [
        b"hello!",
        b"1:hello!",
    ]


def test_packet_mode_skips_undecodable_entries_and_ignores_socket_records(
    tmp_path: Path,
) -> None:
    log = LogBuilder(NETWORK)
    first = log.wait((p.EV_FRAME, ARP_REQUEST))
    log.entry(p.KIND_WAIT, None, reply=b"\xffgarbage")
    log.output(p.OP_FRAME, 0, ARP_REPLY)  # after an entry that does not decode
    log.output(p.OP_SEND, CONN, b"not a frame")
    stats = export_pcap(log.write(tmp_path / "svc.log"), tmp_path / "svc.pcap")
    _, records = read_pcap(tmp_path / "svc.pcap")
    assert records == [
        (log.wall_ns(first) // 1000, ARP_REQUEST),
        (log.wall_ns(first) // 1000, ARP_REPLY),  # the last time known
    ]
    assert stats == PcapStats(packets=2, tcp_streams=0, udp_datagrams=0, bytes_in=0, bytes_out=0)


def test_empty_packet_mode_log_gives_an_empty_capture(tmp_path: Path) -> None:
    stats, packets = export(LogBuilder(NETWORK), tmp_path)
    assert packets == [] and stats.packets == 0
    assert read_pcap(tmp_path / "svc.pcap") == (1, [])
