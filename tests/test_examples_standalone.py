"""The example services run standalone (no ftproxy) and behave as documented.

Each test starts ``python examples/X.py --port PORT`` as a subprocess, waits for its
"listening" line, and talks to it over real sockets (and, for kv, with redis-cli
and redis-benchmark when they are installed).
"""

from __future__ import annotations

import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import free_port

from ftproxy.tools.resp import ErrorReply, Reply, RespClient, encode_command

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STARTUP_TIMEOUT = 10.0
IO_TIMEOUT = 5.0
EXIT_TIMEOUT = 5.0


# --- Running an example ------------------------------------------------------------


def _default_sigint() -> None:
    # A child of a non-interactive shell's background job inherits SIGINT ignored,
    # and Python then never raises KeyboardInterrupt; give the example the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Service:
    """A running example and the port it listens on."""

    proc: subprocess.Popen[bytes]
    port: int

    def stop(self, sig: signal.Signals = signal.SIGINT) -> tuple[int, bytes]:
        """Send ``sig``; return the exit status and everything written to stderr."""
        self.proc.send_signal(sig)
        _, stderr = self.proc.communicate(timeout=EXIT_TIMEOUT)
        return self.proc.returncode, stderr


def wait_for_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Read one line from the process's stdout, failing after ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output within {timeout} s")
    line = proc.stdout.readline().decode()
    if not line:
        _, stderr = proc.communicate(timeout=EXIT_TIMEOUT)
        raise AssertionError(f"exited with {proc.returncode}: {stderr.decode()}")
    return line


@pytest.fixture
def start_example() -> Iterator[Callable[..., Service]]:
    """Start ``examples/NAME.py`` on a free port; kill it after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> Service:
        port = free_port()
        command = [sys.executable, str(EXAMPLES / f"{name}.py"), "--port", str(port)]
        proc = subprocess.Popen(
            [*command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_default_sigint,
        )
        procs.append(proc)
        line = wait_for_line(proc, STARTUP_TIMEOUT)
        assert line == f"{name} listening on 127.0.0.1:{port}\n"
        return Service(proc, port)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=EXIT_TIMEOUT)


def connect(port: int) -> socket.socket:
    """Open a client connection with a timeout on every operation."""
    return socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)


def recv_until_eof(sock: socket.socket) -> bytes:
    """Read everything the peer sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# --- Shutting down -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["echo", "kv", "chat"])
@pytest.mark.parametrize("with_client", [False, True], ids=["idle", "client-connected"])
def test_sigint_exits_zero_quietly(
    start_example: Callable[..., Service], name: str, with_client: bool
) -> None:
    service = start_example(name)
    with connect(service.port) if with_client else socket.socket() as client:
        if with_client and name == "chat":
            client.recv(100)  # the welcome line: the session is under way
        status, stderr = service.stop(signal.SIGINT)
    assert (status, stderr.decode()) == (0, "")


def test_kv_sigterm_exits_zero_quietly(start_example: Callable[..., Service]) -> None:
    service = start_example("kv")
    with connect(service.port) as client:
        client.sendall(b"PING\r\n")
        assert client.recv(100) == b"+PONG\r\n"
        status, stderr = service.stop(signal.SIGTERM)
    assert status == 0
    assert stderr == b""


# --- echo --------------------------------------------------------------------------


def test_echo_two_sequential_connections(start_example: Callable[..., Service]) -> None:
    service = start_example("echo")
    for lines in ([b"hello\n", b"world\n"], [b"second connection\n", b"x" * 100_000 + b"\n"]):
        with connect(service.port) as sock:
            for line in lines:
                sock.sendall(line)
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b"".join(lines)


def test_echo_replies_before_eof_and_without_newline(
    start_example: Callable[..., Service],
) -> None:
    service = start_example("echo")
    with connect(service.port) as sock, sock.makefile("rb") as replies:
        sock.sendall(b"ping\n")
        assert replies.readline() == b"ping\n"
        sock.sendall(b"no newline")
        assert replies.read1(100) == b"no newline"


# --- kv ----------------------------------------------------------------------------


class Kv(RespClient):
    """The project's RESP client, ``kv(*args)`` one request whose reply comes back as it
    came (an error reply as an ErrorReply)."""

    def __init__(self, port: int) -> None:
        super().__init__(port, timeout=IO_TIMEOUT)

    def __call__(self, *args: str | bytes) -> Reply:
        return self.request(*args)


@pytest.fixture
def kv(start_example: Callable[..., Service]) -> Iterator[tuple[Service, Kv]]:
    service = start_example("kv")
    client = Kv(service.port)
    yield service, client
    client.close()


def test_kv_string_commands(kv: tuple[Service, Kv]) -> None:
    _, r = kv
    assert r("PING") == "PONG"
    assert r("PING", "hi") == b"hi"
    assert r("ECHO", "two words") == b"two words"
    assert r("SET", "a", "1") == "OK"
    assert r("GET", "a") == b"1"
    assert r("GET", "missing") is None
    assert r("INCR", "a") == 2
    assert r("INCRBY", "a", "40") == 42
    assert r("DECR", "a") == 41
    assert r("INCR", "counter") == 1
    assert r("SET", "bin", b"\x00\r\n\xff") == "OK"
    assert r("GET", "bin") == b"\x00\r\n\xff"
    assert r("DBSIZE") == 3
    assert sorted(r("KEYS", "*")) == [b"a", b"bin", b"counter"]
    assert r("KEYS", "c?un*") == [b"counter"]
    assert r("EXISTS", "a", "counter", "missing", "a") == 3
    assert r("DEL", "a", "missing", "bin") == 2
    assert r("EXISTS", "a") == 0
    assert r("DBSIZE") == 1
    assert r("FLUSHALL") == "OK"
    assert r("DBSIZE") == 0
    assert r("KEYS", "*") == []


def test_kv_set_options(kv: tuple[Service, Kv]) -> None:
    _, r = kv
    assert r("SET", "k", "v1", "NX") == "OK"
    assert r("SET", "k", "v2", "NX") is None
    assert r("SET", "other", "v", "XX") is None
    assert r("SET", "k", "v3", "XX") == "OK"
    assert r("GET", "k") == b"v3"
    assert r("SET", "k", "v", "EX", "0") == ErrorReply("ERR invalid expire time in 'set' command")
    assert r("SET", "k", "v", "PX", "soon") == ErrorReply(
        "ERR value is not an integer or out of range"
    )
    assert r("SET", "k", "v", "EX", "10", "PX", "10") == ErrorReply("ERR syntax error")
    assert r("SET", "k", "v", "BOGUS") == ErrorReply("ERR syntax error")


def test_kv_errors(kv: tuple[Service, Kv]) -> None:
    _, r = kv
    assert r("SET", "s", "not a number") == "OK"
    assert r("INCR", "s") == ErrorReply("ERR value is not an integer or out of range")
    assert r("INCRBY", "n", "1.5") == ErrorReply("ERR value is not an integer or out of range")
    assert r("SET", "big", str(2**63 - 1)) == "OK"
    assert r("INCR", "big") == ErrorReply("ERR increment or decrement would overflow")
    assert r("GET") == ErrorReply("ERR wrong number of arguments for 'get' command")
    assert r("GET", "a", "b") == ErrorReply("ERR wrong number of arguments for 'get' command")
    reply = r("NOSUCH", "x")
    assert isinstance(reply, ErrorReply)
    assert reply.message.startswith("ERR unknown command 'NOSUCH'")
    assert r("CONFIG", "GET", "save") == []
    assert r("COMMAND", "DOCS") == []
    assert r("GET", "s") == b"not a number"  # the connection survived every error


def test_kv_pipelined_commands(kv: tuple[Service, Kv]) -> None:
    _, r = kv
    count = 500
    r.send_raw(
        b"".join(encode_command("INCR", "hits") for _ in range(count))
        + encode_command("GET", "hits")
    )
    assert [r.read_reply() for _ in range(count)] == list(range(1, count + 1))
    assert r.read_reply() == str(count).encode()


def test_kv_command_split_across_sends(kv: tuple[Service, Kv]) -> None:
    _, r = kv
    command = encode_command("SET", "split", "value spanning two sends")
    r.send_raw(command[:17])
    r.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        r.sock.recv(1)  # no reply to half a command
    r.sock.settimeout(IO_TIMEOUT)
    r.send_raw(command[17:])
    assert r.read_reply() == "OK"

    r.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in encode_command("GET", "split"):
        r.send_raw(bytes([byte]))
    assert r.read_reply() == b"value spanning two sends"


def test_kv_inline_commands(kv: tuple[Service, Kv]) -> None:
    _, r = kv
    r.send_raw(b'PING\r\nSET greeting "hello world"\r\nGET greeting\nINCR n\r\n\r\nGET n\r\n')
    assert [r.read_reply() for _ in range(5)] == ["PONG", "OK", b"hello world", 1, b"1"]


def test_kv_protocol_error_closes_connection(kv: tuple[Service, Kv]) -> None:
    service, r = kv
    r.send_raw(b"*1\r\nGET\r\n")
    reply = r.read_reply()
    assert isinstance(reply, ErrorReply)
    assert reply.message.startswith("ERR Protocol error")
    assert r.read_rest() == b""
    other = Kv(service.port)  # the server itself is fine
    assert other("PING") == "PONG"
    other.close()


def test_kv_quit(kv: tuple[Service, Kv]) -> None:
    _, r = kv
    r.send_raw(encode_command("QUIT") + encode_command("SET", "after", "quit"))
    assert r.read_reply() == "OK"
    assert r.read_rest() == b""


def test_kv_answers_before_closing_on_eof(kv: tuple[Service, Kv]) -> None:
    service, _ = kv
    with connect(service.port) as sock:
        sock.sendall(encode_command("SET", "k", "v") + b"GET k\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"+OK\r\n$1\r\nv\r\n"


def test_kv_reset_connection_is_harmless(kv: tuple[Service, Kv]) -> None:
    service, r = kv
    rude = Kv(service.port)
    rude.send_raw(encode_command("SET", "x", "1") + encode_command("GET"))  # replies left unread
    rude.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    rude.close()  # sends RST
    assert r("PING") == "PONG"


def test_kv_large_reply_with_slow_reader(kv: tuple[Service, Kv]) -> None:
    """Replies bigger than the socket buffer are queued and flushed as the client reads."""
    _, r = kv
    value = b"v" * 1_000_000
    assert r("SET", "big", value) == "OK"
    r.send_raw(encode_command("GET", "big") * 8)
    time.sleep(0.2)  # let the server fill its send buffer before reading starts
    for _ in range(8):
        assert r.read_reply() == value
    assert r("PING") == "PONG"


def poll_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` is true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.02)


def test_kv_expiry(kv: tuple[Service, Kv]) -> None:
    _, r = kv
    assert r("SET", "short", "v", "PX", "400") == "OK"
    assert r("SET", "keep", "v") == "OK"
    assert r("GET", "short") == b"v"
    poll_until(lambda: r("GET", "short") is None)
    assert r("EXISTS", "short") == 0
    assert r("GET", "keep") == b"v"

    # Never touched again, the key is still removed by the periodic sweep.
    assert r("SET", "swept", "v", "PX", "100") == "OK"
    assert r("DBSIZE") == 2
    poll_until(lambda: r("DBSIZE") == 1)
    assert r("KEYS", "*") == [b"keep"]

    # A plain SET clears the TTL.
    assert r("SET", "t", "1", "PX", "100") == "OK"
    assert r("SET", "t", "2") == "OK"
    assert r("SET", "marker", "m", "PX", "150") == "OK"
    poll_until(lambda: r("GET", "marker") is None)
    assert r("GET", "t") == b"2"


def run_tool(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed")
def test_kv_with_redis_cli(kv: tuple[Service, Kv]) -> None:
    service, _ = kv

    def cli(*args: str) -> str:
        result = run_tool("redis-cli", "-p", str(service.port), *args)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert cli("ping") == "PONG"
    assert cli("set", "a", "1") == "OK"
    assert cli("incr", "a") == "2"
    assert cli("get", "a") == "2"
    assert cli("set", "s", "text") == "OK"
    assert cli("incr", "s").startswith("ERR value is not an integer")
    assert cli("exists", "a", "s", "nope") == "2"
    assert cli("dbsize") == "2"


@pytest.mark.skipif(
    shutil.which("redis-benchmark") is None, reason="redis-benchmark is not installed"
)
def test_kv_with_redis_benchmark(kv: tuple[Service, Kv]) -> None:
    service, r = kv
    result = run_tool(
        *("redis-benchmark", "-p", str(service.port), "-t", "ping,set,get,incr"),
        *("-n", "2000", "-c", "20", "-q"),
    )
    assert result.returncode == 0, result.stderr
    assert "ERR" not in result.stdout + result.stderr
    for test in ("PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"):
        assert re.search(rf"\b{test}: [0-9.]+ requests per second", result.stdout), test
    # Every INCR reached the one counter redis-benchmark uses (without -r).
    assert r("GET", "counter:__rand_int__") == b"2000"


# --- chat --------------------------------------------------------------------------

NICK = re.compile(r"[a-z]+-[0-9]{3}")


class ChatClient:
    """A line-oriented chat client."""

    def __init__(self, port: int) -> None:
        self.sock = connect(port)
        self.lines = self.sock.makefile("rb")
        welcome = self.read()
        assert welcome.startswith("welcome "), welcome
        self.nick = welcome.removeprefix("welcome ")
        assert NICK.fullmatch(self.nick), self.nick

    def say(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def read(self) -> str:
        line = self.lines.readline()
        assert line.endswith(b"\n"), f"connection closed, got {line!r}"
        return line.decode().removesuffix("\n")

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


@pytest.fixture
def chat(start_example: Callable[..., Service]) -> Iterator[tuple[Service, list[ChatClient]]]:
    """A chat server with ticks off and three clients who have seen each other join."""
    service = start_example("chat", "--tick", "0")
    clients: list[ChatClient] = []
    for _ in range(3):
        newcomer = ChatClient(service.port)
        for client in clients:
            assert client.read() == f"* {newcomer.nick} joined"
        clients.append(newcomer)
    yield service, clients
    for client in clients:
        client.close()


def test_chat_broadcast_reaches_others_not_sender(
    chat: tuple[Service, list[ChatClient]],
) -> None:
    _, (a, b, c) = chat
    assert len({a.nick, b.nick, c.nick}) == 3
    a.say("hello, room")
    assert b.read() == f"{a.nick}: hello, room"
    assert c.read() == f"{a.nick}: hello, room"
    a.say("/who")  # the sender's next line is the reply, not its own message
    assert a.read() == "users: " + ", ".join(sorted([a.nick, b.nick, c.nick]))
    c.say("and hello back")
    assert a.read() == f"{c.nick}: and hello back"
    assert b.read() == f"{c.nick}: and hello back"


def test_chat_nick(chat: tuple[Service, list[ChatClient]]) -> None:
    _, (a, b, c) = chat
    b.say("/nick bob")
    assert b.read() == "you are now bob"
    assert a.read() == f"* {b.nick} is now bob"
    assert c.read() == f"* {b.nick} is now bob"
    b.say("hi")
    assert a.read() == "bob: hi"
    assert c.read() == "bob: hi"
    c.say("/nick bob")
    assert c.read() == "error: bob is taken"
    c.say("/nick two words")
    assert c.read().startswith("error: ")
    c.say("/dance")
    assert c.read() == "error: unknown command /dance"
    a.say("/who")
    assert a.read() == "users: " + ", ".join(sorted([a.nick, "bob", c.nick]))


def test_chat_disconnects(chat: tuple[Service, list[ChatClient]]) -> None:
    service, (a, b, c) = chat
    c.say("/quit")
    assert c.read() == "bye"
    assert c.lines.readline() == b""  # the server hung up
    assert a.read() == f"* {c.nick} left"
    assert b.read() == f"* {c.nick} left"

    b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    b.close()  # reset, not a clean close
    assert a.read() == f"* {b.nick} left"

    a.say("/who")
    assert a.read() == f"users: {a.nick}"
    d = ChatClient(service.port)
    assert a.read() == f"* {d.nick} joined"
    d.say("still here?")
    assert a.read() == f"{d.nick}: still here?"
    d.close()
    assert a.read() == f"* {d.nick} left"


def test_chat_ticks(start_example: Callable[..., Service]) -> None:
    service = start_example("chat", "--tick", "0.1")
    a = ChatClient(service.port)
    first = re.fullmatch(r"\* tick (\d+), 1 users", a.read())
    second = re.fullmatch(r"\* tick (\d+), 1 users", a.read())
    assert first and second, "expected two ticks counting one user"
    assert int(second[1]) == int(first[1]) + 1
    b = ChatClient(service.port)
    assert re.fullmatch(r"\* tick \d+, 2 users", b.read())
    a.close()
    b.close()
