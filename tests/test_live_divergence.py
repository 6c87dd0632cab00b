"""A running pair catches a divergence: the backup compares each exit's digest of the
outputs before it with the primary's, stops with the report `ftproxy replay` gives
(entry, icount, both sides, where the outputs first differ, the guest's stack), and the
primary, told why over the log channel, goes on alone through the arbiter."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest
from cluster import Cluster, status, wait_until
from support import GUESTS, Recording, connect, free_port, recv_until, run_ftproxy

from ftproxy.core.records import Output
from ftproxy.guest import protocol as p
from ftproxy.shell.replay import first_difference

EXIT_DIVERGED = 1


@pytest.fixture
def pair(tmp_path: Path):
    port = free_port()
    c = Cluster(tmp_path, service_port=port, guest=(str(GUESTS / "host_facts.py"), str(port)))
    yield c.start()
    c.stop()


def test_the_backup_stops_on_a_divergence_and_the_primary_goes_on_alone(pair: Cluster) -> None:
    with connect(pair.service_port) as sock:
        sock.sendall(b"?")
        first = recv_until(sock, b"\n")
    assert first.startswith(b"host facts, read from /proc: uptime ")
    # The backup's guest, replaying, read another pid: it diverges at the next exit.
    assert pair.backup.wait(timeout=20) == EXIT_DIVERGED
    diverged = [e for e in pair.backup.events() if e.get("event") == "replay_diverged"]
    assert diverged, pair.backup.stderr()
    report = diverged[0]["report"]
    assert re.search(r"divergence at log entry \d+ \(icount \d+\)", report), report
    assert "recorded:  outputs before this exit with digest" in report
    # Where the two replies first differ: past their common first bytes.
    match = re.search(r"at byte (\d+):", report)
    assert match, report
    offset = int(match.group(1))
    assert offset > 24, report  # the first 24 bytes are equal: showing them proves nothing
    # The recorded side is what the client got.
    recorded_line = next(line for line in report.splitlines() if "recorded  [" in line)
    start = int(re.search(r"\[(\d+):", recorded_line).group(1))
    assert repr(first[start : offset + 16])[2:-1] in recorded_line, (first, recorded_line)
    assert "replaying [" in report
    assert "host_facts.py" in report  # the replaying guest's stack

    # The primary learnt why, went on alone (the arbiter decided for it) and serves.
    wait_until(
        lambda: status(pair.primary_admin)["role"] == "live", 20, "the primary goes on alone"
    )
    primary_status = status(pair.primary_admin)
    assert primary_status["divergences_total"] == 1
    assert "diverged" in primary_status["peer"]["lost_because"]
    told = [e for e in pair.primary.events() if e.get("event") == "backup_diverged"]
    assert told and f"at byte {offset}:" in told[0]["difference"]
    decided = [e for e in pair.primary.events() if e.get("event") == "arbiter_decided"]
    assert decided and decided[0]["won"] is True
    with connect(pair.service_port) as sock:
        sock.sendall(b"?")
        assert recv_until(sock, b"\n").startswith(b"host facts")
    metrics = urllib_get(f"http://127.0.0.1:{pair.primary_admin}/metrics")
    assert "ftproxy_divergences_total 1" in metrics


def urllib_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


def test_replay_shows_where_the_outputs_first_differ(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "facts.ftlog"
    with Recording(log, GUESTS / "host_facts.py", str(port)) as rec:
        with connect(port) as sock:
            sock.sendall(b"?")
            recorded = recv_until(sock, b"\n")
        rec.stop()
    cli = run_ftproxy("replay", str(log), "--quiet-guest")
    assert cli.returncode == EXIT_DIVERGED, cli.stderr
    match = re.search(r"at byte (\d+):", cli.stderr)
    assert match, cli.stderr
    offset = int(match.group(1))
    # Past the common words: in the uptime (a later replay) or else in the pid.
    assert recorded.index(b"uptime ") < offset < len(recorded), (offset, recorded)
    assert "replaying [" in cli.stderr and "Traceback" not in cli.stderr


def _send(sock: int, data: bytes) -> Output:
    return Output(3, p.OP_SEND, sock, data)


def test_first_difference_names_the_output_and_the_offset() -> None:
    same = b"0123456789" * 5
    text = first_difference([_send(7, same + b"A tail")], [_send(7, same + b"B tail")])
    assert "output 0 (send on socket 7, 56B recorded, 56B replaying) at byte 50:" in text
    assert "recorded  [34:66]: b'4567890123456789A tail'" in text
    assert "B tail'" in text
    # A shorter side differs where it ends; an output only one side made is named.
    assert "at byte 4:" in first_difference([_send(7, b"abcdef")], [_send(7, b"abcd")])
    extra = first_difference([_send(7, b"x")], [_send(7, b"x"), _send(8, b"y")])
    assert "output 1 exists only on the replaying side: send on socket 8" in extra
    other = first_difference([_send(7, b"x")], [_send(8, b"x")])
    assert "output 0 is send on socket 7" in other and "send on socket 8" in other
    assert first_difference([_send(7, b"x")], [_send(7, b"x")]) == ""
