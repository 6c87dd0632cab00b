"""Log files: round trip, and every way a file can be wrong gives a clear error."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from support import run_ftproxy

from ftproxy.core.records import FORMAT_VERSION, End, Entry, Header, Output, Policy
from ftproxy.log.file import (
    MAGIC,
    LogFormatError,
    LogVersionError,
    LogWriter,
    read_log,
)

HEADER = Header(FORMAT_VERSION, ["kv.py"], {}, "/", "3.11.7", Policy(200, 1000), 0)


def write_log(path: Path, *records: Entry | Output | End) -> Path:
    writer = LogWriter(path, HEADER)
    for record in records:
        writer.append(record)
    writer.close()
    return path


def test_round_trip(tmp_path: Path) -> None:
    records = [Entry(1, 0, 0, 0, b"boot"), Output(1, 1, 1000, b"+OK\r\n"), End("guest_exited", 0)]
    contents = read_log(write_log(tmp_path / "a.ftlog", *records))
    assert contents.header == HEADER
    assert contents.records == records
    assert contents.entries == 1 and contents.truncated_at is None


def test_a_partial_last_record_is_a_truncated_tail_not_corruption(tmp_path: Path) -> None:
    path = write_log(tmp_path / "t.ftlog", Entry(1, 0, 0, 0, b"boot"), Entry(2, 5, 1, 0, b"x" * 50))
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    contents = read_log(path)
    assert contents.records == [Entry(1, 0, 0, 0, b"boot")]
    assert contents.truncated_at is not None


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: b"", "not an ftproxy log"),
        (lambda d: b"GIF89a" + d, "not an ftproxy log"),
        (lambda d: d[:8], "no header"),
        (lambda d: d[:8] + struct.pack("<I", 2**31) + b"x", "claims 2147483648 bytes"),
        (lambda d: d[:8] + struct.pack("<I", 3) + b"\xc1\xc1\xc1", "does not decode"),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path: Path, mangle, message: str) -> None:
    path = write_log(tmp_path / "bad.ftlog", Entry(1, 0, 0, 0, b"boot"))
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(LogFormatError, match=message):
        read_log(path)


def test_a_log_from_a_newer_ftproxy_is_refused_by_version(tmp_path: Path) -> None:
    path = write_log(tmp_path / "new.ftlog")
    data = bytearray(path.read_bytes())
    data[len(MAGIC) : len(MAGIC) + 2] = struct.pack("<H", FORMAT_VERSION + 1)
    path.write_bytes(bytes(data))
    with pytest.raises(LogVersionError, match="written by a newer ftproxy"):
        read_log(path)


def test_a_log_from_an_older_ftproxy_is_refused_by_version(tmp_path: Path) -> None:
    path = write_log(tmp_path / "old.ftlog")
    data = bytearray(path.read_bytes())
    data[len(MAGIC) : len(MAGIC) + 2] = struct.pack("<H", FORMAT_VERSION - 1)
    path.write_bytes(bytes(data))
    with pytest.raises(LogVersionError, match=r"written by an older ftproxy.*the ftproxy that"):
        read_log(path)


def test_the_cli_reports_bad_logs_without_a_traceback(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ftlog"
    garbage.write_bytes(b"this is not a log")
    newer = write_log(tmp_path / "newer.ftlog")
    data = bytearray(newer.read_bytes())
    data[len(MAGIC) : len(MAGIC) + 2] = struct.pack("<H", FORMAT_VERSION + 7)
    newer.write_bytes(bytes(data))
    for command in ("replay", "log show", "log export --pcap x.pcap"):
        for path, message in ((garbage, "not an ftproxy log"), (newer, "newer ftproxy")):
            words = command.split()
            args = [*words[:2], str(path), *words[2:]] if words[0] == "log" else [*words, str(path)]
            done = run_ftproxy(*args)
            assert done.returncode == 2, (command, done.stderr)
            assert message in done.stderr and "Traceback" not in done.stderr
    missing = run_ftproxy("replay", str(tmp_path / "nope.ftlog"))
    assert missing.returncode == 2 and "cannot read the log" in missing.stderr
