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

from ftproxy.guest import protocol as p
from ftproxy.logfile import LogContents, LogWriter, read_log
from ftproxy.logview import describe_log, format_duration, log_summary, preview_bytes
from ftproxy.wire import FORMAT_VERSION, End, Entry, Header, Output, Policy, Record

CLEAN_EXIT = End("guest_exited", 0)
CREATED_NS = 1_714_564_800_123_456_789  # 2024-05-01T12:00:00.123456789Z
WALL_START_NS = 1_714_564_801_000_000_000
MONO_STEP_NS = 1_200_000
FIRST_CONN = p.FIRST_ACCEPTED_SOCK
HEADER_LINES = 8  # the summary lines before the column heading


class LogBuilder:
    """Records for a synthetic log: entries numbered from 1, outputs after the last one."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.seq = 0
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
        )
        writer = LogWriter(path, header)
        for record in [*self.records, *([end] if end else [])]:
            writer.append(record)
        writer.close()
        return read_log(path)


def record_lines(contents: LogContents, **kwargs: Any) -> list[str]:
    """The listing's lines after the header summary and the column heading."""
    lines = list(describe_log(contents, **kwargs))
    assert lines[HEADER_LINES].split() == ["seq", "icount", "kind", "size", "summary"]
    return lines[HEADER_LINES + 1 :]


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
