"""Record real services under real clients, replay their logs, demand equality.

Replay checks every exit (icount, kind, output digest) and every output byte
for byte against the recording, so "the replay verified N entries and M
outputs" is the whole claim; these tests also check N and M against the log.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    EXAMPLES,
    GUESTS,
    Recording,
    Resp,
    connect,
    free_port,
    recv_until,
    replay_log,
    run_ftproxy,
)

from ftproxy.core.records import End, Entry
from ftproxy.log.file import read_log
from ftproxy.shell.replay import replay
from ftproxy.shell.supervisor import Divergence


def test_socketserver_echo_replays(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "echo.ftlog"
    with Recording(log, EXAMPLES / "echo.py", "--port", str(port)) as rec:
        for round_ in range(3):
            with connect(port) as sock:
                lines = b"".join(b"line %d of %d\n" % (i, round_) for i in range(5))
                sock.sendall(lines)
                assert recv_until(sock, b"line 4 of %d\n" % round_) == lines
        assert rec.stop() == 0
    result = replay_log(log)
    assert result.log_complete and result.returncode == result.recorded_returncode
    assert result.output_bytes >= 3 * len(lines)


def test_kv_under_redis_cli_replays(tmp_path: Path) -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed (apt-get install redis-tools)")
    port = free_port()
    log = tmp_path / "kv.ftlog"
    with Recording(log, EXAMPLES / "kv.py", "--port", str(port)) as rec:
        cli = ["redis-cli", "-p", str(port)]
        assert (
            subprocess.run([*cli, "set", "a", "1"], capture_output=True, text=True).stdout == "OK\n"
        )
        assert subprocess.run([*cli, "incr", "n"], capture_output=True, text=True).stdout == "1\n"
        assert subprocess.run([*cli, "incr", "n"], capture_output=True, text=True).stdout == "2\n"
        assert subprocess.run([*cli, "get", "a"], capture_output=True, text=True).stdout == "1\n"
        assert rec.stop() == 0
    replay_log(log)


def test_kv_under_redis_benchmark_replays(tmp_path: Path) -> None:
    if shutil.which("redis-benchmark") is None:
        pytest.skip("redis-benchmark is not installed (apt-get install redis-tools)")
    port = free_port()
    log = tmp_path / "kvbench.ftlog"
    with Recording(log, EXAMPLES / "kv.py", "--port", str(port)) as rec:
        bench = subprocess.run(
            [
                "redis-benchmark",
                "-p",
                str(port),
                "-t",
                "ping,set,get,incr",
                "-n",
                "400",
                "-c",
                "10",
                "-q",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bench.returncode == 0, bench.stderr
        assert "ERR" not in bench.stdout + bench.stderr
        assert rec.stop() == 0
    result = replay_log(log)
    assert result.outputs > 400


def test_asyncio_chat_with_a_set_of_writers_replays(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "chat.ftlog"
    with Recording(log, EXAMPLES / "chat.py", "--port", str(port), "--tick", "0.05") as rec:
        clients = [connect(port) for _ in range(3)]
        nicks = [recv_until(c, b"\n").split()[1] for c in clients]
        assert len(set(nicks)) == 3
        clients[0].sendall(b"hello everyone\n")
        for other in clients[1:]:
            assert b"hello everyone" in recv_until(other, b"hello everyone\n")
        assert b"tick" in recv_until(clients[2], b"tick")
        for c in clients:
            c.close()
        assert rec.stop() == 0
    replay_log(log)


def test_broadcast_to_a_set_of_sockets_replays_in_the_same_order(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "broadcast.ftlog"
    with Recording(log, GUESTS / "broadcast.py", str(port)) as rec:
        members = [connect(port) for _ in range(6)]
        for i, member in enumerate(members):
            member.sendall(b"from %d\n" % i)
            for other in members[: i + 1]:
                recv_until(other, b"from %d\n" % i)
        for member in members:
            member.close()
        rec.stop()
    replay_log(log)


def test_every_virtual_device_replays(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "devices.ftlog"
    with Recording(log, GUESTS / "devices.py", str(port)) as rec:
        with connect(port) as sock:
            answers = []
            for request in (b"one\n", b"sleep\n", b"two\n"):
                sock.sendall(request)
                answers.append(recv_until(sock, b"\n"))
        rec.stop()
    assert answers[0] != answers[2]  # the clocks and generators did move
    replay_log(log)


def test_udp_replays(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "udp.ftlog"
    with Recording(log, GUESTS / "udp_echo.py", str(port)) as rec:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            for i in range(5):
                sock.sendto(b"ping %d" % i, ("127.0.0.1", port))
                assert sock.recvfrom(100)[0] == b"%d:ping %d" % (i + 1, i)
        rec.stop()
    replay_log(log)


def test_connections_never_accepted_end_with_their_listener(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "listener.ftlog"
    with Recording(log, GUESTS / "close_listener.py", str(port)) as rec:
        with connect(port) as queued, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
            ctl.settimeout(10)
            ctl.sendto(b"close it", ("127.0.0.1", port + 1))
            assert ctl.recvfrom(100)[0] == b"closed"
            # A FIN or a reset: what matters is that the connection ends.
            with contextlib.suppress(ConnectionResetError):
                assert queued.recv(100) == b""
        rec.stop()
    replay_log(log)


def test_outbound_connections_replay_without_the_upstream(tmp_path: Path) -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    upstream_port = upstream.getsockname()[1]
    port = free_port()
    log = tmp_path / "proxy.ftlog"
    with upstream, Recording(log, GUESTS / "proxy.py", str(port), str(upstream_port)) as rec:
        with connect(port) as client:
            for word in (b"alpha", b"beta"):
                client.sendall(word + b"\n")
                conn, _ = upstream.accept()
                with conn:
                    assert recv_until(conn, b"\n") == word + b"\n"
                    conn.sendall(word.upper() + b"\n")
                assert recv_until(client, b"\n") == b"upstream said: " + word.upper() + b"\n"
        rec.stop()
    # The upstream is gone: the replay must not need it.
    replay_log(log)


def test_sigterm_reaches_the_guest_as_a_logged_event(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "term.ftlog"
    with Recording(log, GUESTS / "sigterm.py", str(port)) as rec:
        with connect(port) as sock:
            for _ in range(3):
                sock.sendall(b"x")
                recv_until(sock, b"\n")
        assert rec.stop(signal.SIGTERM) == 0
    assert "stopping after 3 requests\n" in rec.stdout_lines
    contents = read_log(log)
    assert contents.records[-1] == End("guest_exited", 0)
    replay_log(log)


def test_a_nondeterministic_guest_is_caught_with_both_sides_and_its_stack(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "uptime.ftlog"
    with Recording(log, GUESTS / "uptime.py", str(port)) as rec:
        with connect(port) as sock:
            sock.sendall(b"?")
            recorded = recv_until(sock, b"\n")
        rec.stop()
    contents = read_log(log)
    with pytest.raises(Divergence) as caught:
        trio.run(lambda: replay(contents, stdout=subprocess.DEVNULL))
    divergence = caught.value
    assert recorded[:12] in divergence.recorded.encode()
    assert divergence.replaying.startswith("output send")
    assert "uptime.py" in divergence.stack
    cli = run_ftproxy("replay", str(log), "--quiet-guest")
    assert cli.returncode == 1
    assert "divergence at log entry" in cli.stderr and "Traceback" not in cli.stderr


def test_threads_are_refused_with_the_reason(tmp_path: Path) -> None:
    log = tmp_path / "threads.ftlog"
    with Recording(log, GUESTS / "threads.py", ready_marker="") as rec:
        rec.stop(None)
    assert "threading.Thread.start is not supported under ftproxy" in rec.stderr
    assert "single-threaded" in rec.stderr and "threads.py:6" in rec.stderr
    assert "Traceback" not in rec.stderr
    assert read_log(log).records[-1] == End("guest_exited", 3)


def test_replay_refuses_another_program(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "echo.ftlog"
    with Recording(log, EXAMPLES / "echo.py", "--port", str(port)) as rec:
        rec.stop()
    cli = run_ftproxy("replay", str(log), "--", "examples/kv.py", "--port", str(port))
    assert cli.returncode == 2
    assert "the log recorded the program" in cli.stderr


def test_the_cli_replays_a_log_whose_recorder_was_killed(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "killed.ftlog"
    with Recording(log, EXAMPLES / "echo.py", "--port", str(port)) as rec:
        with connect(port) as sock:
            sock.sendall(b"before the kill\n")
            recv_until(sock, b"\n")
        rec.stop(signal.SIGKILL)
    contents = read_log(log)
    assert not any(isinstance(r, End) for r in contents.records)
    cli = run_ftproxy("replay", str(log), "--quiet-guest")
    assert cli.returncode == 0, cli.stderr
    assert "no end record" in cli.stderr


@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="needs redis-tools")
def test_a_log_whose_recorder_was_killed_mid_load_replays_up_to_its_end(tmp_path: Path) -> None:
    """SIGKILL under 20 clients cuts the log anywhere, often among an exit's outputs."""
    port = free_port()
    log = tmp_path / "killed.ftlog"
    with Recording(log, EXAMPLES / "kv.py", "--port", str(port)) as rec:
        load = subprocess.Popen(
            ["redis-benchmark", "-p", str(port), "-c", "20", "-n", "1000000", "-t", "set,incr"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while log.stat().st_size < 256 * 1024:  # well into the load
                assert time.monotonic() < deadline, "the load never reached the recorder"
                assert rec.process is not None and rec.process.alive(), rec.stop(None)
                time.sleep(0.05)
            rec.stop(signal.SIGKILL)
        finally:
            load.kill()
            load.wait()
    contents = read_log(log)
    assert not any(isinstance(r, End) for r in contents.records)
    cli = run_ftproxy("replay", str(log), "--quiet-guest")
    assert cli.returncode == 0, cli.stderr
    ended = r"the log ends early at entry (\d+); everything before it verified"
    match = re.search(ended, cli.stderr)
    assert match, cli.stderr
    assert int(match[1]) in (contents.entries, contents.entries + 1)
    assert f"{contents.entries} entries" in cli.stderr
    assert "divergence" not in cli.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="address-space randomisation is Linux's")
def test_guest_runs_without_address_space_randomisation(tmp_path: Path) -> None:
    script = tmp_path / "persona.py"
    script.write_text(
        "print('personality', open('/proc/self/personality').read().strip(), flush=True)\n"
    )
    with Recording(tmp_path / "p.ftlog", script, ready_marker="personality") as rec:
        line = rec.stdout_lines[-1]
        rec.stop()
    assert int(line.split()[1], 16) & 0x0040000


KEYS = st.sampled_from(["a", "b", "counter", "x:1"])
COMMANDS = st.one_of(
    st.tuples(st.just("SET"), KEYS, st.text("abc123", min_size=1, max_size=8)),
    st.tuples(st.just("SET"), KEYS, st.just("v"), st.just("PX"), st.integers(1, 50).map(str)),
    st.tuples(st.just("GET"), KEYS),
    st.tuples(st.just("INCR"), KEYS),
    st.tuples(st.just("INCRBY"), KEYS, st.integers(-5, 5).map(str)),
    st.tuples(st.just("DEL"), KEYS, KEYS),
    st.tuples(st.just("EXISTS"), KEYS),
    st.tuples(st.just("DBSIZE")),
    st.tuples(st.just("KEYS"), st.just("*")),
    st.tuples(st.just("PING")),
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2), COMMANDS), min_size=1, max_size=25))
def test_kv_replays_any_command_sequence_over_several_connections(
    script: list[tuple[int, tuple[str, ...]]],
) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "kv.ftlog"
        with Recording(log, EXAMPLES / "kv.py", "--port", str(port)) as rec:
            clients = [Resp(port) for _ in range(3)]
            for index, command in script:
                clients[index].command(*command)
            for client in clients:
                client.close()
            assert rec.stop() == 0
        replay_log(log)


def test_peer_resets_and_slow_readers_replay(tmp_path: Path) -> None:
    """A client that resets mid-request, and one that reads a large reply slowly."""
    import struct

    port = free_port()
    log = tmp_path / "kvreset.ftlog"
    with Recording(log, EXAMPLES / "kv.py", "--port", str(port)) as rec:
        rude = connect(port)
        rude.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nva")  # half a command
        rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rude.close()  # RST: the guest sees a reset, logged as an input
        client = Resp(port)
        value = b"v" * 600_000  # larger than the guest's virtual send buffer
        assert client.command("SET", "big", value) == "OK"
        client.sock.sendall(b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n" * 4)
        for _ in range(4):
            assert client.read() == value
        assert client.command("PING") == "PONG"
        client.close()
        assert rec.stop() == 0
    from ftproxy.guest import protocol as p

    contents = read_log(log)
    kinds = {
        event[0]
        for r in contents.records
        if isinstance(r, Entry) and r.kind == p.KIND_WAIT
        for event in p.wait_events(p.split_reply(p.decode_body(r.reply))[2])
    }
    assert p.EV_RESET in kinds  # the reset reached the guest as a logged input
    assert p.EV_SENT in kinds  # the big replies filled the virtual send buffer
    replay_log(log)


def test_a_second_ctrl_c_kills_a_guest_that_ignores_the_first(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "stubborn.ftlog"
    with Recording(log, GUESTS / "stubborn.py", str(port)) as rec:
        assert rec.process is not None
        rec.process.signal(signal.SIGINT)
        rec.process.wait_for_output("not stopping", timeout=20.0)
        assert rec.stop(signal.SIGINT) == 0
    end = read_log(log).records[-1]
    assert isinstance(end, End) and end.reason == "killed" and end.returncode == -9
    replay_log(log)


def test_a_diverged_guest_stops_where_it_diverged_though_replies_were_written_ahead(
    tmp_path: Path,
) -> None:
    # Several clients recorded: when the first answer diverges, the log holds the
    # replies for the exits after it, and replay writes replies ahead. The guest
    # must not run on with them: each reply names its exit (icount, kind, digest),
    # and the first whose digest is not the guest's stops it there.
    port = free_port()
    log = tmp_path / "uptime.ftlog"
    with Recording(log, GUESTS / "uptime.py", str(port)) as rec:
        for _ in range(5):
            with connect(port) as sock:
                sock.sendall(b"?")
                recv_until(sock, b"\n")
        rec.stop()
    contents = read_log(log)
    entries = [r for r in contents.records if isinstance(r, Entry)]
    with pytest.raises(Divergence) as caught:
        trio.run(lambda: replay(contents, stdout=subprocess.DEVNULL))
    divergence = caught.value
    assert divergence.seq < len(entries) - 3  # replies for later exits were there to run on
    assert divergence.stack_exits_later == 0
    # The exit after the diverging output: the accept of the next client, as a
    # supervisor answering one exit at a time would have found it.
    assert re.search(
        r'uptime\.py", line 13, in <module>\n +conn, _ = server.accept\(\)', divergence.stack
    ), divergence.stack
    assert "at that point" in divergence.report()
