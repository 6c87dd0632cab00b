"""The log listing (describe_log) and totals (log_summary) on synthetic logs."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from ftproxy.core.records import FORMAT_VERSION, End, Entry, Header, Network, Output, Policy, Record
from ftproxy.guest import protocol as p
from ftproxy.log.file import LogContents, LogWriter, read_log
from ftproxy.log.view import (
    decode_frame,
    describe_frame,
    describe_log,
    format_duration,
    log_summary,
    preview_bytes,
)
from ftproxy.netstack import packets as pk

CLEAN_EXIT = End("guest_exited", 0)
CREATED_NS = 1_714_564_800_123_456_789  # 2024-05-01T12:00:00.123456789Z
WALL_START_NS = 1_714_564_801_000_000_000
MONO_STEP_NS = 1_200_000
FIRST_CONN = p.FIRST_ACCEPTED_SOCK
HEADER_LINES = 8  # the summary lines before the column heading (socket mode)


class LogBuilder:
    """Records for a synthetic log: entries numbered from 1, outputs after the last one."""

    def __init__(self, network: Network | None = None) -> None:
        self.records: list[Record] = []
        self.seq = 0
        self.network = network
        self.clock = p.GuestClock(1000)

    def entry(self, kind: int, result: Any, *, reply: bytes | None = None) -> int:
        self.seq += 1
        icount = self.seq * 100 + 7
        if reply is None:
            wall_ns = WALL_START_NS + self.seq * 1_000
            mono_ns = self.seq * MONO_STEP_NS
            reply = p.encode_reply(*self.clock.deltas_to(icount, mono_ns, wall_ns), result)
        self.records.append(Entry(self.seq, icount, kind, 0, reply))
        return self.seq

    def wait(self, *events: tuple[Any, ...]) -> int:
        return self.entry(p.KIND_WAIT, p.wait_result(events))

    def output(self, op: int, sock: int, data: bytes = b"", extra: Any = None) -> None:
        self.records.append(Output(self.seq, op, sock, data, extra))

    def write(self, path: Path, *, end: End | None = CLEAN_EXIT) -> LogContents:
        header = Header(
            version=FORMAT_VERSION,
            argv=["python", "kv.py", "--port", "6380"],
            env={"LANG": "C"},
            cwd="/srv/kv",
            python="3.11.9",
            policy=Policy(exit_every=200, clock_step_ns=1000),
            created_ns=CREATED_NS,
            network=self.network,
        )
        writer = LogWriter(path, header)
        for record in [*self.records, *([end] if end else [])]:
            writer.append(record)
        writer.close()
        return read_log(path)


def record_lines(contents: LogContents, **kwargs: Any) -> list[str]:
    """The listing's lines after the header summary and the column heading."""
    lines = list(describe_log(contents, **kwargs))
    header_lines = HEADER_LINES + (contents.header.network is not None)
    assert lines[header_lines].split() == ["seq", "icount", "kind", "size", "summary"]
    return lines[header_lines + 1 :]


def server_session() -> LogBuilder:
    """A kv-like session: boot, listen, one client sends PING and gets PONG, closes."""
    log = LogBuilder()
    log.entry(p.KIND_BOOT, (b"\x01" * 32, 1234, 200, 1000, "replica"))
    log.entry(p.KIND_BIND, (0, ("127.0.0.1", 6380)))
    log.entry(p.KIND_LISTEN, 0)
    log.wait(
        (p.EV_ACCEPT, 1000, FIRST_CONN, ("127.0.0.1", 53120), ("127.0.0.1", 6380)),
        (p.EV_DATA, FIRST_CONN, b"*1\r\n$4\r\nPING\r\n"),
    )
    log.output(p.OP_SEND, FIRST_CONN, b"+PONG\r\n")
    log.wait((p.EV_EOF, FIRST_CONN), (p.EV_SIGNAL, int(signal.SIGINT)))
    log.output(p.OP_CLOSE, FIRST_CONN)
    return log


def test_header_summary_names_the_recording(tmp_path: Path) -> None:
    contents = server_session().write(tmp_path / "kv.log")
    header = list(describe_log(contents))[:HEADER_LINES]
    text = "\n".join(header)
    assert f"format version {FORMAT_VERSION}" in header[0]
    assert "python kv.py --port 6380" in text
    assert "/srv/kv" in text
    assert "3.11.9" in text
    assert "exit_every=200" in text and "clock_step=1000ns" in text
    assert "2024-05-01T12:00:00.123456Z" in text
    assert "5 entries, 2 outputs" in text
    assert "ended: guest_exited returncode=0" in text


def test_one_line_per_record_with_seq_icount_kind_size(tmp_path: Path) -> None:
    log = server_session()
    contents = log.write(tmp_path / "kv.log")
    lines = record_lines(contents)
    assert len(lines) == len(contents.records)
    for line, record in zip(lines, contents.records, strict=True):
        if isinstance(record, Entry):
            seq, icount, kind, size = line.split()[:4]
            assert int(seq) == record.seq
            assert int(icount) == record.icount
            assert kind == p.KIND_NAMES[record.kind]
            assert int(size) == len(record.reply)
        elif isinstance(record, Output):
            assert line.startswith("      out after seq ")
            assert f"seq {record.seq}:" in line
        else:
            assert line == "end: guest_exited returncode=0"


def test_entry_summaries(tmp_path: Path) -> None:
    lines = record_lines(server_session().write(tmp_path / "kv.log"))
    assert lines[0].endswith("boot pid=1234 exit_every=200 step=1000ns host=replica")
    assert lines[1].endswith("bind #1000 -> 127.0.0.1:6380")
    assert lines[2].endswith("listen #1000 ok")
    # Data comes first: the guest takes a wait's data chunks before its other events.
    assert lines[3].endswith(
        f'wait +1.2ms: data #{FIRST_CONN} 14B "*1\\r\\n$4\\r\\nPING\\r\\n"; '
        f"accept #{FIRST_CONN} 127.0.0.1:53120 on #1000"
    )
    assert lines[4] == f'      out after seq 4: send #{FIRST_CONN} 7B "+PONG\\r\\n"'
    assert lines[5].endswith(f"wait +1.2ms: eof #{FIRST_CONN}; signal SIGINT")
    assert lines[6] == f"      out after seq 5: close #{FIRST_CONN}"


def test_entry_columns_are_aligned(tmp_path: Path) -> None:
    log = server_session()
    for _ in range(12):  # two-digit seqs and wider icounts
        log.wait()
    lines = record_lines(log.write(tmp_path / "kv.log"))
    entry_lines = [line for line in lines if "out after" not in line and "end:" not in line]
    assert len(entry_lines) == 17
    # Each entry line names its kind twice: in the kind column and to start its summary.
    kind_and_summary_columns = {
        tuple(m.start() for m in re.finditer(r"\b(?:boot|bind|listen|wait)\b", line))
        for line in entry_lines
    }
    assert len(kind_and_summary_columns) == 1
    assert len(next(iter(kind_and_summary_columns))) == 2
    assert entry_lines[-1].endswith("wait +1.2ms: no events")


def test_preview_escapes_and_truncates(tmp_path: Path) -> None:
    log = LogBuilder()
    log.wait((p.EV_DATA, FIRST_CONN, b'a"\\\x00\xff\tbcdefgh'))
    lines = record_lines(log.write(tmp_path / "x.log"), data_preview=6)
    assert lines[0].endswith(f'data #{FIRST_CONN} 13B "a\\"\\\\\\x00\\xff\\t"...')
    assert preview_bytes(b"ok\r\n", 32) == '"ok\\r\\n"'
    sizes_only = record_lines(log.write(tmp_path / "y.log"), data_preview=0)
    assert sizes_only[0].endswith(f"data #{FIRST_CONN} 13B")


def test_client_and_datagram_sockets_are_attributed(tmp_path: Path) -> None:
    log = LogBuilder()
    log.entry(p.KIND_CONNECT, (errno.ECONNREFUSED, None, None))  # socket 1000, fails
    log.entry(p.KIND_CONNECT, (0, ("10.0.0.5", 41000), ("10.0.0.9", 80)))  # socket 1001
    log.entry(p.KIND_BIND, (0, ("0.0.0.0", 5353)))  # socket 1002, UDP
    log.entry(p.KIND_BIND, (errno.EADDRINUSE, None))
    log.output(p.OP_SEND, 1001, b"GET / HTTP/1.0\r\n\r\n")
    log.wait((p.EV_DGRAM, 1002, b"\x00\x01query", ("10.0.0.7", 40000)))
    log.output(p.OP_SENDTO, 1002, b"answer", ("10.0.0.7", 40000))
    log.output(p.OP_SHUTDOWN, 1001, b"", 1)
    log.wait((p.EV_RESET, 1001, errno.ECONNRESET), (p.EV_SENT, 1001, 18))
    lines = record_lines(log.write(tmp_path / "client.log"))
    assert lines[0].endswith("connect #? ECONNREFUSED")
    assert lines[1].endswith("connect #1001 -> 10.0.0.9:80 from 10.0.0.5:41000")
    assert lines[2].endswith("bind #1002 -> 0.0.0.0:5353")
    assert lines[3].endswith("bind #? EADDRINUSE")
    assert lines[4].endswith('send #1001 18B "GET / HTTP/1.0\\r\\n\\r\\n"')
    assert lines[5].endswith('dgram #1002 7B from 10.0.0.7:40000 "\\x00\\x01query"')
    assert lines[6].endswith('sendto #1002 6B to 10.0.0.7:40000 "answer"')
    assert lines[7].endswith("shutdown #1001 SHUT_WR")
    assert lines[8].endswith("reset #1001 ECONNRESET; sent #1001 total=18B")


def test_bind_then_connect_is_one_socket(tmp_path: Path) -> None:
    log = LogBuilder()
    log.entry(p.KIND_BIND, (0, ("::", 7000, 0, 0)))
    log.entry(p.KIND_CONNECT, (0, ("::1", 7000, 0, 0), ("::1", 9000, 0, 0)))
    log.output(p.OP_SEND, 1000, b"hi")
    lines = record_lines(log.write(tmp_path / "v6.log"))
    assert lines[0].endswith("bind #1000 -> [::]:7000")
    assert lines[1].endswith("connect #1000 -> [::1]:9000 from [::1]:7000")


@pytest.mark.parametrize(
    "reply",
    [
        b"\xffgarbage",
        b"",
        p.encode_body("not a reply"),
        p.encode_body((1, (b"", b"", [(p.EV_DATA, FIRST_CONN)]))),  # data missing
        p.encode_body((1, (b"", b"", [(99, FIRST_CONN)]))),  # an unknown event
        p.encode_body((1, (p.DATA_INDEX.pack(FIRST_CONN, 5), b"abc", None))),  # short blob
        p.encode_body((1, (b"\0" * 3, b"", None))),  # a partial index entry
        p.encode_body((1, (b"", b"", None), "2")),  # a wall shift that is no int
        p.encode_body((1, 2, [(p.EV_DATA, FIRST_CONN, b"x")])),  # format version 1's
    ],
)
def test_undecodable_reply_is_shown_not_raised(tmp_path: Path, reply: bytes) -> None:
    log = LogBuilder()
    log.wait((p.EV_DATA, FIRST_CONN, b"before"))
    log.entry(p.KIND_WAIT, None, reply=reply)
    log.wait((p.EV_DATA, FIRST_CONN, b"after"))
    contents = log.write(tmp_path / "bad.log")
    lines = record_lines(contents)
    assert len(lines) == len(contents.records)
    assert "<undecodable reply: " in lines[1] and lines[1].endswith(">")
    assert lines[1].split()[:4] == ["2", "207", "wait", str(len(reply))]
    assert '"after"' in lines[2]
    assert log_summary(contents)["undecodable_replies"] == 1


def test_truncated_log_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "cut.log"
    server_session().write(path, end=None)
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.truncate(size - 3)  # inside the last record (the close output)
    contents = read_log(path)
    listing = list(describe_log(contents))
    assert any("no end record: truncated at byte" in line for line in listing[:HEADER_LINES])
    assert len(listing) == HEADER_LINES + 1 + len(contents.records)
    summary = log_summary(contents)
    assert summary["truncated"] is True and summary["ended"] is False


def test_log_without_end_says_so(tmp_path: Path) -> None:
    contents = server_session().write(tmp_path / "open.log", end=None)
    header = list(describe_log(contents))[:HEADER_LINES]
    assert any("no end record" in line and "truncated" not in line for line in header)


def test_log_summary_counts(tmp_path: Path) -> None:
    log = server_session()
    log.wait((p.EV_DGRAM, 1001, b"12345", ("127.0.0.1", 9)))
    log.output(p.OP_SENDTO, 1001, b"abc", ("127.0.0.1", 9))
    path = tmp_path / "kv.log"
    contents = log.write(path)
    summary = log_summary(contents)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["entries"] == 6 and summary["outputs"] == 3
    assert summary["entries_by_kind"] == {"boot": 1, "bind": 1, "listen": 1, "wait": 3}
    assert summary["events_by_type"] == {
        "accept": 1,
        "data": 1,
        "eof": 1,
        "signal": 1,
        "dgram": 1,
    }
    assert summary["outputs_by_op"] == {"send": 1, "close": 1, "sendto": 1}
    assert summary["bytes_in"] == 14 + 5
    assert summary["bytes_out"] == 7 + 3
    assert summary["log_bytes"] == os.path.getsize(path)
    assert summary["ended"] is True and summary["returncode"] == 0
    assert summary["undecodable_replies"] == 0


def test_format_duration_units() -> None:
    assert format_duration(850) == "850ns"
    assert format_duration(12_300) == "12.3us"
    assert format_duration(1_200_000) == "1.2ms"
    assert format_duration(3_400_000_000) == "3.40s"


def test_sockets_set_up_in_creation_order_get_ids_in_that_order(tmp_path: Path) -> None:
    log = LogBuilder()
    log.entry(p.KIND_CONNECT, (0, ("10.0.0.5", 41000), ("10.0.0.9", 80)))
    log.entry(p.KIND_CONNECT, (0, ("10.0.0.5", 41001), ("10.0.0.9", 81)))
    log.entry(p.KIND_BIND, (0, ("0.0.0.0", 0)))  # an UDP socket, used below
    log.entry(p.KIND_BIND, (0, ("0.0.0.0", 8080)))
    log.entry(p.KIND_LISTEN, 0)
    log.output(p.OP_SENDTO, 1002, b"x", ("10.0.0.1", 53))
    log.output(p.OP_SEND, 1001, b"second first")
    log.wait((p.EV_ACCEPT, 1003, FIRST_CONN, ("10.0.0.2", 5000), ("10.0.0.5", 8080)))
    log.output(p.OP_SEND, 1000, b"first last")
    lines = record_lines(log.write(tmp_path / "order.log"))
    assert lines[0].endswith("connect #1000 -> 10.0.0.9:80 from 10.0.0.5:41000")
    assert lines[1].endswith("connect #1001 -> 10.0.0.9:81 from 10.0.0.5:41001")
    assert lines[2].endswith("bind #1002 -> 0.0.0.0:0")
    assert lines[3].endswith("bind #1003 -> 0.0.0.0:8080")
    assert lines[4].endswith("listen #1003 ok")


def test_many_connections_are_attributed_quickly(tmp_path: Path) -> None:
    log = LogBuilder()
    count = 3000
    for number in range(count):
        log.entry(p.KIND_CONNECT, (0, ("10.0.0.5", 20000 + number), ("10.0.0.9", 80)))
        log.output(p.OP_SEND, 1000 + number, b"x")
        log.output(p.OP_CLOSE, 1000 + number)
    lines = record_lines(log.write(tmp_path / "many.log"), data_preview=0)
    connects = [line for line in lines if "connect" in line]
    assert connects[-1].endswith(f"connect #{1000 + count - 1} -> 10.0.0.9:80 from 10.0.0.5:22999")


# -- packet mode ----------------------------------------------------------------

GUEST_MAC = b"\x02\x00\x0a\xc8\x00\x64"
CLIENT_MAC = b"\x02\x00\x0a\xc8\x00\x0a"
GUEST_IP = "10.200.0.100"
CLIENT_IP = "10.200.0.10"
NETWORK = Network(GUEST_MAC, GUEST_IP, 24)
CLIENT_ISN = 1_000_000
GUEST_ISN = 3_000_000_000
SYN, ACK, PSH, FIN = pk.TCP_SYN, pk.TCP_ACK, pk.TCP_PSH, pk.TCP_FIN


def ip_frame(proto: int, payload: bytes, *, inbound: bool) -> bytes:
    """An IPv4 frame between the client and the guest, ``inbound`` to the guest."""
    src, dst = (CLIENT_IP, GUEST_IP) if inbound else (GUEST_IP, CLIENT_IP)
    packet = pk.build_ipv4(pk.ip_to_int(src), pk.ip_to_int(dst), proto, payload, ident=1)
    macs = (GUEST_MAC, CLIENT_MAC) if inbound else (CLIENT_MAC, GUEST_MAC)
    return pk.build_ethernet(*macs, pk.ETHERTYPE_IPV4, packet)


def addresses(inbound: bool) -> tuple[int, int]:
    src, dst = (CLIENT_IP, GUEST_IP) if inbound else (GUEST_IP, CLIENT_IP)
    return pk.ip_to_int(src), pk.ip_to_int(dst)


def tcp_frame(
    flags: int, seq: int, ack: int, data: bytes = b"", *, inbound: bool, mss: int | None = None
) -> bytes:
    ports = (41234, 6380) if inbound else (6380, 41234)
    segment = pk.build_tcp(*addresses(inbound), *ports, seq, ack, flags, 65535, data, mss=mss)
    return ip_frame(pk.IPPROTO_TCP, segment, inbound=inbound)


def udp_frame(data: bytes, *, inbound: bool) -> bytes:
    ports = (40000, 9999) if inbound else (9999, 40000)
    datagram = pk.build_udp(*addresses(inbound), *ports, data)
    return ip_frame(pk.IPPROTO_UDP, datagram, inbound=inbound)


def echo_frame(icmp_type: int, data: bytes, *, inbound: bool) -> bytes:
    return ip_frame(pk.IPPROTO_ICMP, pk.build_icmp_echo(icmp_type, 7, 1, data), inbound=inbound)


ARP_REQUEST = pk.build_arp_frame(
    pk.ARP_REQUEST,
    pk.BROADCAST_MAC,
    CLIENT_MAC,
    pk.ip_to_int(CLIENT_IP),
    pk.ZERO_MAC,
    pk.ip_to_int(GUEST_IP),
)
ARP_REPLY = pk.build_arp_frame(
    pk.ARP_REPLY, CLIENT_MAC, GUEST_MAC, pk.ip_to_int(GUEST_IP), CLIENT_MAC, pk.ip_to_int(CLIENT_IP)
)


def frame_event(frame: bytes) -> tuple[int, bytes]:
    return (p.EV_FRAME, frame)


def packet_session() -> LogBuilder:
    """A packet-mode session: ARP, a TCP handshake and PING/PONG, a UDP datagram, a ping."""
    log = LogBuilder(NETWORK)
    log.entry(p.KIND_BOOT, (b"\x01" * 32, 1234, 200, 1000, "vm", NETWORK.boot_value()))
    log.wait(frame_event(ARP_REQUEST))
    log.output(p.OP_FRAME, 0, ARP_REPLY)
    log.wait(frame_event(tcp_frame(SYN, CLIENT_ISN, 0, inbound=True, mss=1460)))
    log.output(
        p.OP_FRAME, 0, tcp_frame(SYN | ACK, GUEST_ISN, CLIENT_ISN + 1, inbound=False, mss=1460)
    )
    log.wait(
        frame_event(tcp_frame(ACK, CLIENT_ISN + 1, GUEST_ISN + 1, inbound=True)),
        frame_event(tcp_frame(PSH | ACK, CLIENT_ISN + 1, GUEST_ISN + 1, b"PING\r\n", inbound=True)),
    )
    log.output(
        p.OP_FRAME,
        0,
        tcp_frame(PSH | ACK, GUEST_ISN + 1, CLIENT_ISN + 7, b"+PONG\r\n", inbound=False),
    )
    log.wait(frame_event(udp_frame(b"hello!", inbound=True)), (p.EV_SIGNAL, int(signal.SIGINT)))
    log.output(p.OP_FRAME, 0, udp_frame(b"", inbound=False))
    log.wait(frame_event(echo_frame(pk.ICMP_ECHO_REQUEST, b"abcd", inbound=True)))
    log.output(p.OP_FRAME, 0, echo_frame(pk.ICMP_ECHO_REPLY, b"abcd", inbound=False))
    return log


def test_packet_mode_header_shows_the_network(tmp_path: Path) -> None:
    lines = list(describe_log(packet_session().write(tmp_path / "packet.log")))
    assert lines[7] == "  network: 10.200.0.100/24 mac 02:00:0a:c8:00:64 (packet mode)"
    assert lines[8].startswith("  records: 6 entries, 5 outputs")
    routed = LogBuilder(Network(GUEST_MAC, GUEST_IP, 24, "10.200.0.1"))
    header = list(describe_log(routed.write(tmp_path / "routed.log")))[: HEADER_LINES + 1]
    assert "  network: 10.200.0.100/24 mac 02:00:0a:c8:00:64 gateway 10.200.0.1 (packet mode)" in (
        header
    )
    socket_header = list(describe_log(server_session().write(tmp_path / "kv.log")))
    assert not any(line.startswith("  network:") for line in socket_header)


def test_packet_mode_frames_get_a_line_each(tmp_path: Path) -> None:
    lines = record_lines(packet_session().write(tmp_path / "packet.log"))
    client, guest = f"{CLIENT_IP}:41234", f"{GUEST_IP}:6380"
    c, g = CLIENT_ISN, GUEST_ISN
    # Entry lines reduced to their summary column; frame, output and end lines whole.
    summaries = [
        line if line[:6].isspace() or line.startswith("end:") else line.split(None, 4)[4]
        for line in lines
    ]
    assert summaries == [
        "boot pid=1234 exit_every=200 step=1000ns host=vm net=10.200.0.100/24"
        " mac=02:00:0a:c8:00:64",
        "wait +1.2ms: 1 frame",
        "      frame in 42B ARP who-has 10.200.0.100 tell 10.200.0.10",
        "      out after seq 2: frame 42B ARP 10.200.0.100 is-at 02:00:0a:c8:00:64",
        "wait +1.2ms: 1 frame",
        f"      frame in 58B TCP {client} > {guest} [S] seq={c} win=65535 mss=1460",
        f"      out after seq 3: frame 58B TCP {guest} > {client} [SA] seq={g} ack={c + 1}"
        " win=65535 mss=1460",
        "wait +1.2ms: 2 frames",
        f"      frame in 54B TCP {client} > {guest} [A] seq={c + 1} ack={g + 1} win=65535",
        f"      frame in 60B TCP {client} > {guest} [PA] seq={c + 1} ack={g + 1} win=65535"
        ' len=6 "PING\\r\\n"',
        f"      out after seq 4: frame 61B TCP {guest} > {client} [PA] seq={g + 1} ack={c + 7}"
        ' win=65535 len=7 "+PONG\\r\\n"',
        "wait +1.2ms: 1 frame; signal SIGINT",
        '      frame in 48B UDP 10.200.0.10:40000 > 10.200.0.100:9999 len=6 "hello!"',
        "      out after seq 5: frame 42B UDP 10.200.0.100:9999 > 10.200.0.10:40000 len=0",
        "wait +1.2ms: 1 frame",
        "      frame in 46B ICMP 10.200.0.10 > 10.200.0.100 echo request id=7 seq=1 len=4",
        "      out after seq 6: frame 46B ICMP 10.200.0.100 > 10.200.0.10 echo reply id=7 seq=1"
        " len=4",
        "end: guest_exited returncode=0",
    ]


def test_frame_previews_follow_data_preview(tmp_path: Path) -> None:
    log = LogBuilder(NETWORK)
    log.wait(frame_event(udp_frame(b"0123456789", inbound=True)))
    log.output(p.OP_FRAME, 0, tcp_frame(PSH | ACK, 5, 6, b"abcdefgh", inbound=False))
    contents = log.write(tmp_path / "preview.log")
    short = record_lines(contents, data_preview=4)
    assert short[1].endswith('len=10 "0123"...')
    assert short[2].endswith('win=65535 len=8 "abcd"...')
    sizes_only = record_lines(contents, data_preview=0)
    assert sizes_only[1].endswith(":9999 len=10")
    assert sizes_only[2].endswith("win=65535 len=8")


def test_odd_frames_are_described_not_raised() -> None:
    syn = tcp_frame(SYN, CLIENT_ISN, 0, inbound=True)
    bad_tcp = syn[:-3] + bytes([syn[-3] ^ 0xFF]) + syn[-2:]  # a flipped checksum byte
    bad_ip = syn[:24] + bytes([syn[24] ^ 0xFF]) + syn[25:]  # the IP header checksum
    gratuitous = pk.build_gratuitous_arp(GUEST_MAC, GUEST_IP)
    ipv6 = pk.build_ethernet(GUEST_MAC, CLIENT_MAC, 0x86DD, b"\x60" + b"\x00" * 39)
    unreachable = ip_frame(pk.IPPROTO_ICMP, pk.build_icmp_unreachable(3, syn[14:48]), inbound=False)
    gre = ip_frame(47, b"\x00" * 8, inbound=True)
    tail = f"{CLIENT_IP}:41234 > {GUEST_IP}:6380 [S] seq={CLIENT_ISN} win=65535"
    assert describe_frame(bad_tcp) == f"54B TCP {tail} (bad checksum: TCP)"
    assert describe_frame(bad_ip) == f"54B TCP {tail} (bad checksum: IP)"
    assert describe_frame(syn[:30]) == "30B IPv4 <malformed>"
    assert describe_frame(syn[:40]) == "40B IPv4 <malformed>"  # shorter than its total length
    short_tcp = ip_frame(pk.IPPROTO_TCP, b"\x00" * 10, inbound=True)
    assert describe_frame(short_tcp) == f"44B TCP {CLIENT_IP} > {GUEST_IP} <malformed>"
    assert describe_frame(b"\x01\x02") == "2B <runt: no Ethernet header>"
    assert describe_frame(ARP_REQUEST[:20]) == "20B ARP <malformed>"
    assert (
        describe_frame(gratuitous) == "42B ARP who-has 10.200.0.100 tell 10.200.0.100 (gratuitous)"
    )
    assert describe_frame(ipv6) == "54B ethertype 0x86dd (IPv6)"
    assert describe_frame(unreachable) == "70B ICMP 10.200.0.100 > 10.200.0.10 port unreachable"
    assert describe_frame(gre) == "42B IPv4 10.200.0.10 > 10.200.0.100 proto=47 len=8"
    assert decode_frame(bad_tcp).tcp == decode_frame(syn).tcp


def test_boot_results_of_every_age(tmp_path: Path) -> None:
    log = LogBuilder()
    log.entry(p.KIND_BOOT, (b"\x01" * 32, 1234, 200, 1000))  # before the hostname
    log.entry(p.KIND_BOOT, (b"\x01" * 32, 1234, 200, 1000, "vm"))  # before packet mode
    log.entry(p.KIND_BOOT, (b"\x01" * 32, 1234, 200, 1000, "vm", None))  # socket mode
    routed = Network(GUEST_MAC, GUEST_IP, 24, "10.200.0.1")
    log.entry(p.KIND_BOOT, (b"\x01" * 32, 1234, 200, 1000, "vm", routed.boot_value()))
    log.entry(p.KIND_BOOT, (b"\x01" * 32, 1234, 200, 1000, "vm", ("not", "a network")))
    lines = record_lines(log.write(tmp_path / "boots.log"))
    assert lines[0].endswith("boot pid=1234 exit_every=200 step=1000ns")
    assert lines[1].endswith("boot pid=1234 exit_every=200 step=1000ns host=vm")
    assert lines[2].endswith("boot pid=1234 exit_every=200 step=1000ns host=vm")
    assert lines[3].endswith("host=vm net=10.200.0.100/24 mac=02:00:0a:c8:00:64 gw=10.200.0.1")
    assert "<undecodable reply: not a boot result: " in lines[4]


def test_frame_events_must_carry_bytes(tmp_path: Path) -> None:
    log = LogBuilder(NETWORK)
    log.wait((p.EV_FRAME, "not bytes"))
    log.wait((p.EV_FRAME, ARP_REQUEST, "extra"))
    lines = record_lines(log.write(tmp_path / "bad.log"))
    assert all("<undecodable reply: not a wait result: " in line for line in lines[:2])


def test_packet_mode_summary_counts_frames(tmp_path: Path) -> None:
    contents = packet_session().write(tmp_path / "packet.log")
    summary = log_summary(contents)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["network"] == {
        "mac": "02:00:0a:c8:00:64",
        "ip": GUEST_IP,
        "prefix_len": 24,
        "gateway": None,
    }
    assert summary["entries_by_kind"] == {"boot": 1, "wait": 5}
    assert summary["events_by_type"] == {"frame": 6, "signal": 1}
    assert summary["outputs_by_op"] == {"frame": 5}
    assert summary["frames_in"] == 6 and summary["frames_out"] == 5
    assert summary["frame_bytes_in"] == 42 + 58 + 54 + 60 + 48 + 46
    assert summary["frame_bytes_out"] == 42 + 58 + 61 + 42 + 46
    assert summary["bytes_in"] == 0 and summary["bytes_out"] == 0
    assert summary["undecodable_replies"] == 0
    socket_summary = log_summary(server_session().write(tmp_path / "kv.log"))
    assert socket_summary["network"] is None and socket_summary["frames_in"] == 0
