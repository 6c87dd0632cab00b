"""The stdlib and third-party libraries as real programs use them, recorded and replayed.

Each test runs what a real program does and was seen to break under ftproxy:
socketserver swallowing a refusal, logging's asctime, ``-m`` modules, numpy's
C datetime API, pyftpdlib's choice of poller, uvicorn's workers and uvloop.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import ftplib
import importlib.util
import io
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

from support import GUESTS, Recording, connect, free_port, recv_until, replay_log, run_ftproxy

from ftproxy.core.records import End
from ftproxy.log.file import read_log


def _refused_exit(rec: Recording, log: Path) -> None:
    """The guest stopped with exit code 3 and one clear line, and the log says so."""
    assert rec.stop(None) == 3, rec.stderr
    assert "Traceback" not in rec.stderr
    assert read_log(log).records[-1] == End("guest_exited", 3)


def test_a_refusal_inside_a_socketserver_handler_stops_the_program(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "refused.ftlog"
    with Recording(log, GUESTS / "thread_in_handler.py", str(port)) as rec:
        with connect(port) as sock:
            sock.sendall(b"job 1\n")
            # The program stops at the refused call: the connection ends unanswered.
            assert sock.recv(100) == b""
        _refused_exit(rec, log)
    assert "threading.Thread.start is not supported under ftproxy" in rec.stderr
    assert "instead, serve every connection from one thread" in rec.stderr
    assert "thread_in_handler.py:16" in rec.stderr
    assert "serve_forever returned" not in "".join(rec.stdout_lines)
    assert replay_log(log).returncode == 3


def test_a_refusal_inside_an_asyncio_task_stops_the_program(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "executor.ftlog"
    with Recording(log, GUESTS / "executor_in_task.py", str(port)) as rec:
        with connect(port) as sock:
            sock.sendall(b"upper\n")
            assert sock.recv(100) == b""
        _refused_exit(rec, log)
    assert "threading.Thread.start is not supported under ftproxy" in rec.stderr
    assert "instead, run the work inline, or run_in_executor(None, ...)" in rec.stderr
    assert "asyncio.run returned" not in "".join(rec.stdout_lines)
    assert replay_log(log).returncode == 3


def test_logging_with_asctime_records_and_replays(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "logging.ftlog"
    with Recording(log, GUESTS / "logging_asctime.py", str(port)) as rec:
        replies = []
        with connect(port) as sock:
            for word in ("one", "two", "three"):
                sock.sendall(word.encode() + b"\n")
                replies.append(recv_until(sock, b"\n").decode())
        assert rec.stop() == 0, rec.stderr
    for word, reply in zip(("one", "two", "three"), replies, strict=True):
        local, utc = reply.rstrip("\n").split(" | ")
        # 2026-12-06 20:43:58,123 INFO got 'one'
        assert local.endswith(f"INFO got '{word}'"), reply
        assert local[:4].isdigit() and local[4] == "-" and "," in local[:24], reply
        assert utc[:4].isdigit() and utc[10] == "T", reply
    assert "got 'three'" in rec.stderr
    result = replay_log(log)
    assert result.output_bytes == sum(len(r) for r in replies)


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=20) as reply:
        return bytes(reply.read())


def test_python_m_http_server_serves_concurrent_clients_and_replays(tmp_path: Path) -> None:
    served = tmp_path / "site"
    served.mkdir()
    (served / "index.txt").write_bytes(b"served by python -m http.server\n" * 100)
    (served / "other.txt").write_bytes(b"another file\n")
    port = free_port()
    log = tmp_path / "httpserver.ftlog"
    command = ("http.server", "--bind", "127.0.0.1", "--directory", str(served), str(port))
    with Recording(log, "-m", *command, ready_marker="Serving HTTP") as rec:
        base = f"http://127.0.0.1:{port}"
        urls = [f"{base}/index.txt", f"{base}/other.txt", f"{base}/"] * 8
        # http.server's main is a ThreadingHTTPServer: it serves them in turn.
        with concurrent.futures.ThreadPoolExecutor(8) as clients:
            bodies = list(clients.map(_fetch, urls))
        assert rec.stop() == 0, rec.stderr
    for url, body in zip(urls, bodies, strict=True):
        if url.endswith("index.txt"):
            assert body == (served / "index.txt").read_bytes()
        elif url.endswith("other.txt"):
            assert body == b"another file\n"
        else:
            assert b"index.txt" in body and b"other.txt" in body
    assert rec.stderr.count('"GET /index.txt HTTP/1.1" 200') == 8
    result = replay_log(log)
    assert result.output_bytes > 24 * len(b"another file\n")


def test_numpy_and_fakeredis_import_and_datetime_now_follows_the_virtual_clock(
    tmp_path: Path,
) -> None:
    port = free_port()
    log = tmp_path / "numpy.ftlog"
    with Recording(log, GUESTS / "numpy_fakeredis.py", str(port)) as rec:
        replies = []
        with connect(port) as sock:
            commands = ("now", "set a 1", "incr a", "incr a", "get a", "mean 1 2 4", "pickle")
            for command in (*commands, "now"):
                sock.sendall(command.encode() + b"\n")
                replies.append(recv_until(sock, b"\n").decode().rstrip("\n"))
        assert rec.stop() == 0, rec.stderr
    first_now, *store, last_now = replies
    *store, pickled = store
    assert store == ["True", "2", "3", "3", "2.3333333333333335"]
    assert pickled == (
        "datetime.datetime(2020, 1, 2, 3, 4, 5) datetime.datetime(2021, 5, 6, 0, 0) [True, True]"
    )
    for now in (first_now, last_now):
        local, utc, utcnow, today, np_now, kind = now.split(" ", 5)
        assert kind == "<class 'datetime.datetime'>"
        assert utc.endswith("+00:00") and utc[:19] == utcnow[:19]
        assert local.startswith(today) and np_now == local
        stamp = datetime.datetime.fromisoformat(utc)
        # The guest's clock is the host's, moved only at exits.
        assert abs((datetime.datetime.now(datetime.UTC) - stamp).total_seconds()) < 60
    assert first_now.split()[0] < last_now.split()[0]
    # Replay runs later, on the log's clock: datetime.now() must read that one.
    replay_log(log)


def _wait_for_port(port: int, rec: Recording, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert rec.process is not None and rec.process.alive(), rec.stop(None)
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on {port} within {timeout}s") from None
            time.sleep(0.05)


def _ftp_session(port: int, index: int) -> tuple[list[str], bytes]:
    with ftplib.FTP() as ftp:
        ftp.connect("127.0.0.1", port, timeout=20)
        ftp.login()  # anonymous
        listing: list[str] = []
        ftp.retrlines("LIST", listing.append)
        fetched = bytearray()
        ftp.retrbinary("RETR data.bin", fetched.extend)
        ftp.storbinary(f"STOR upload-{index}.txt", io.BytesIO(b"upload %d\n" % index * 50))
        return listing, bytes(fetched)


def test_pyftpdlib_picks_poll_and_serves_concurrent_ftp_clients_and_replays(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "ftp"
    shared.mkdir()
    data = bytes(range(256)) * 300
    (shared / "data.bin").write_bytes(data)
    (shared / "readme.txt").write_text("hello\n")
    for name in ("data.bin", "readme.txt"):
        # LIST shows modification times: fixed, so the replay lists the same.
        os.utime(shared / name, (1_700_000_000, 1_700_000_000))
    # Files are not devices: the replay must start from the files the recording started from.
    at_start = tmp_path / "ftp-at-start"
    shutil.copytree(shared, at_start)
    port = free_port()
    log = tmp_path / "ftp.ftlog"
    command = ("pyftpdlib", "-i", "127.0.0.1", "-p", str(port), "-d", str(shared), "-w", "-D")
    with Recording(log, "-m", *command, ready_marker="") as rec:
        _wait_for_port(port, rec)
        with concurrent.futures.ThreadPoolExecutor(4) as clients:
            sessions = list(clients.map(lambda i: _ftp_session(port, i), range(4)))
        assert rec.stop() == 0, rec.stderr
    for index, (listing, fetched) in enumerate(sessions):
        assert fetched == data
        # The sessions run at once: a LIST may also show what another one stored before
        # it, never its own upload (stored after its LIST).
        names = {line.split()[-1] for line in listing}
        others = {f"upload-{i}.txt" for i in range(len(sessions)) if i != index}
        assert {"data.bin", "readme.txt"} <= names <= {"data.bin", "readme.txt"} | others, listing
        assert (shared / f"upload-{index}.txt").read_bytes() == b"upload %d\n" % index * 50
    # pyftpdlib chose select.poll: the guest offers no epoll.
    assert "poller: 'pyftpdlib.ioloop.Poll'" in rec.stderr
    shutil.rmtree(shared)
    shutil.copytree(at_start, shared)
    result = replay_log(log)
    assert result.output_bytes > 4 * len(data)


def _uvicorn(port: int, *options: str) -> tuple[str, ...]:
    app_dir = str(GUESTS)
    return ("-m", "uvicorn", "asgi_app:app", "--app-dir", app_dir, "--port", str(port), *options)


def test_uvicorn_with_several_workers_is_refused_with_the_fix(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "workers.ftlog"
    with Recording(log, *_uvicorn(port, "--workers", "2"), ready_marker="") as rec:
        _refused_exit(rec, log)
    assert "ftproxy: the guest stopped: " in rec.stderr
    assert "is not supported under ftproxy" in rec.stderr
    assert "instead, run one process (uvicorn and gunicorn: --workers 1)" in rec.stderr
    assert replay_log(log).returncode == 3


def test_uvicorn_with_uvloop_installed_runs_on_asyncio_and_replays(tmp_path: Path) -> None:
    # uvicorn's default loop is uvloop whenever it imports: this test needs it (the dev extra).
    assert importlib.util.find_spec("uvloop") is not None, "install uvloop (the dev extra)"
    port = free_port()
    log = tmp_path / "uvicorn.ftlog"
    with Recording(log, *_uvicorn(port), ready_marker="") as rec:
        _wait_for_port(port, rec)
        paths = [f"/client/{i}" for i in range(24)]
        with concurrent.futures.ThreadPoolExecutor(8) as clients:
            bodies = list(clients.map(lambda path: _fetch(f"http://127.0.0.1:{port}{path}"), paths))
        assert rec.stop() == 0, rec.stderr
    assert bodies == [f"hello from {path}\n".encode() for path in paths]
    assert "Uvicorn running on" in rec.stderr
    result = replay_log(log)
    assert result.outputs >= 24


def test_a_program_that_needs_uvloop_stops_with_the_fix(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "uvloop.ftlog"
    with Recording(log, *_uvicorn(port, "--loop", "uvloop"), ready_marker="") as rec:
        assert rec.stop(None) == 3, rec.stderr
    assert (
        "ftproxy: the guest stopped: uvloop is not offered under ftproxy: it runs its own event "
        "loop on libuv, whose I/O ftproxy cannot virtualize; instead, use asyncio's own event "
        "loop (uvicorn: --loop asyncio)"
    ) in rec.stderr
    assert read_log(log).records[-1] == End("guest_exited", 3)


def test_the_socket_surface_real_programs_touch_works_and_replays(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "surface.ftlog"
    with Recording(log, GUESTS / "socket_surface.py", str(port)) as rec:
        answers = []
        for _ in range(2):
            with connect(port) as sock:
                answers.append(recv_until(sock, b"\n"))
                for command, end in (
                    (b"osio   \n", b"osio   \n"),
                    (b"msg    \n", b"msg    \n"),
                    (b"file   \n", b"s \n"),
                    (b"names  \n", b"\n"),
                    (b"select \n", b"\n"),
                    (b"peek   \nwxyz", b"\n"),
                ):
                    sock.sendall(command)
                    answers.append(recv_until(sock, end))
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(10) == b""  # closed through socket.close(fd)
        assert rec.stop() == 0, rec.stderr
    first = answers[:7]
    assert answers[7:] == first
    assert first[0] == b"inheritable True False None\n"
    assert first[1] == b"os.write osio   \n"
    assert first[2] == b"sendmsg msg    \n"
    file_bytes = b"file bytes " * 10
    assert first[3] == file_bytes[:50] + b" sent 50\n" + file_bytes[:110] + b"\n"
    assert first[4] == b"localhost ['127.0.0.1'] 127.0.0.1 80\n"
    assert first[5] == b"False poll\n"
    # Peeked twice, taken, then MSG_DONTWAIT on the blocking socket found nothing.
    assert first[6] == b"peek wxyz wxyz wxyz (then none)\n"
    replay_log(log)


def test_a_recv_flag_the_guest_cannot_offer_is_refused_by_name(tmp_path: Path) -> None:
    port = free_port()
    with Recording(tmp_path / "oob.ftlog", GUESTS / "socket_surface.py", str(port)) as rec:
        with connect(port) as sock:
            recv_until(sock, b"\n")
            sock.sendall(b"oob    \n")
            assert sock.recv(10) == b""  # the guest stopped: its connection closed
        assert rec.stop(None) == 3, rec.stderr  # EXIT_UNSUPPORTED
    refusal = "socket.recv(flags=1) is not supported under ftproxy: only MSG_PEEK and MSG_DONTWAIT"
    assert refusal in rec.stderr
    assert "Traceback" not in rec.stderr


def test_a_guest_command_python_could_not_run_is_refused_clearly(tmp_path: Path) -> None:
    log = str(tmp_path / "x.ftlog")
    for command, message in (
        (["-m"], "record: -m needs a module name: expected SCRIPT [ARGS...] or -m MODULE"),
        (["-X", "dev", "app.py"], "the guest's command starts with the interpreter option '-X'"),
    ):
        cli = run_ftproxy("record", "--log", log, "--", *command)
        assert cli.returncode == 2 and message in cli.stderr, cli.stderr
    cli = run_ftproxy("record", "--log", log, "--", "-m", "no_such_module_here")
    assert cli.returncode == 3
    assert "ftproxy: the guest's module 'no_such_module_here' was not found" in cli.stderr
    assert "Traceback" not in cli.stderr


def test_uvicorn_on_a_unix_socket_is_refused_with_the_fix(tmp_path: Path) -> None:
    log = tmp_path / "uds.ftlog"
    uds = ("--uds", str(tmp_path / "app.sock"))
    with Recording(log, *_uvicorn(free_port(), *uds), ready_marker="") as rec:
        _refused_exit(rec, log)
    assert (
        "socket.socket(family=AF_UNIX) is not supported under ftproxy: only AF_INET and "
        "AF_INET6 sockets (and socketpair) are virtualized; instead, serve on a TCP or UDP "
        "address (uvicorn: --host and --port, not --uds)"
    ) in rec.stderr


def test_a_forking_socketserver_is_refused_with_the_plain_class_as_the_fix(tmp_path: Path) -> None:
    script = tmp_path / "forking.py"
    script.write_text(
        "import socketserver, sys\n"
        "class Echo(socketserver.StreamRequestHandler):\n"
        "    def handle(self):\n"
        "        self.wfile.write(self.rfile.readline())\n"
        "server = socketserver.ForkingTCPServer(('127.0.0.1', int(sys.argv[1])), Echo)\n"
        "print('listening', flush=True)\n"
        "server.serve_forever()\n"
    )
    port = free_port()
    log = tmp_path / "forking.ftlog"
    with Recording(log, script, str(port)) as rec:
        with connect(port) as sock:
            sock.sendall(b"echo\n")
            assert sock.recv(100) == b""
        _refused_exit(rec, log)
    assert "os.fork is not supported under ftproxy" in rec.stderr
    assert (
        "instead, use the plain server class (socketserver.TCPServer, http.server.HTTPServer)"
    ) in rec.stderr
    assert f"from {script}:7" in rec.stderr
