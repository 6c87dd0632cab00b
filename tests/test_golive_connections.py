"""Connections across a failover in socket mode: kill -9 of the primary while clients are
idle, mid-request, mid-response and half-closed, then many new clients at once.

A connection id names one connection for the whole life of the guest: the backup gone
live numbers new connections after the ones the log shows, and every connection its
guest held at go-live reads as reset (a logged input). Were an id reused, a new client
would be served as if it were an old one: its bytes glued to an old half-request, its
replies sent to a dead socket, or the server stuck reading a connection nobody writes.

Each server shape is proven with real processes: socketserver (examples/echo.py),
selectors (examples/kv.py), asyncio streams and asyncio Protocols (tests/guests/
line_store.py) and the standard library's http.server.HTTPServer with keep-alive
(tests/guests/http_store.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster import Cluster, status, wait_until
from support import EXAMPLES, GUESTS, connect, free_port

from ftproxy.tools.resp import encode_command

NEW_CLIENTS = 20
BIG = 16 * 1024 * 1024  # a reply far larger than every socket buffer on the way
OLD_CLIENT_TIMEOUT_S = 20.0


class Client:
    """One client connection with a read buffer; every read has a deadline."""

    def __init__(self, port: int) -> None:
        self.sock = connect(port, timeout=OLD_CLIENT_TIMEOUT_S)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        self.buffer += chunk

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._fill()
        line, _, self.buffer = self.buffer.partition(marker)
        return line + marker

    def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def rest_until_closed(self) -> bytes:
        """Everything that still arrives, until EOF or a reset."""
        data, self.buffer = self.buffer, b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionError:
                return data
            if not chunk:
                return data
            data += chunk

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Shape:
    """A server and how a client speaks to it."""

    name: str
    guest: Callable[[int], tuple[str, ...]]
    # Serves one connection at a time: only the first client is being served at the kill.
    sequential: bool
    write: Callable[[Client, str, str], None]  # store key=value, checking the acknowledgement
    read: Callable[[Client, str], str | None]  # the value of key
    half_request: bytes
    big_request: Callable[[Client, str], None]  # ask for BIG bytes of reply made from key
    big_reply_head: Callable[[Client], None]  # read that reply up to its body
    big_reply_tail: Callable[[str], bytes]  # what follows the body


def _body(key: str, size: int) -> bytes:
    return (key.encode() * (size // len(key) + 1))[:size]


# -- examples/echo.py (socketserver): the "value" of a key is its echo ----------------


def _echo_write(client: Client, key: str, value: str) -> None:
    line = f"{key}={value}\n".encode()
    client.send(line)
    assert client.read_until(b"\n") == line


def _echo_read(client: Client, key: str) -> str | None:
    raise AssertionError("echo keeps nothing")


def _echo_big(client: Client, key: str) -> None:
    # The echo comes back while we send, and we read it slowly: send from a thread.
    def send() -> None:
        with contextlib.suppress(OSError):
            client.send(_body(key, BIG))

    threading.Thread(target=send, daemon=True).start()


def _no_head(client: Client) -> None:
    pass


# -- examples/kv.py (selectors, RESP) --------------------------------------------------


def _kv_write(client: Client, key: str, value: str) -> None:
    client.send(encode_command("SET", key, value))
    assert client.read_until(b"\r\n") == b"+OK\r\n"


def _kv_read(client: Client, key: str) -> str | None:
    client.send(encode_command("GET", key))
    head = client.read_until(b"\r\n")
    if head == b"$-1\r\n":
        return None
    assert head.startswith(b"$"), head
    return client.read_exact(int(head[1:-2]) + 2)[:-2].decode()


def _kv_big(client: Client, key: str) -> None:
    _kv_write(client, key, _body(key, BIG).decode())
    client.send(encode_command("GET", key))


def _kv_big_head(client: Client) -> None:
    assert client.read_until(b"\r\n") == b"$%d\r\n" % BIG


# -- tests/guests/line_store.py (asyncio streams and Protocols) -------------------------


def _line_write(client: Client, key: str, value: str) -> None:
    client.send(f"PUT {key} {value}\n".encode())
    assert client.read_until(b"\n") == f"OK {key}\n".encode()


def _line_read(client: Client, key: str) -> str | None:
    client.send(f"GET {key}\n".encode())
    reply = client.read_until(b"\n").decode().split()
    if reply == ["NONE", key]:
        return None
    assert reply[:2] == ["VAL", key], reply
    return reply[2]


def _line_big(client: Client, key: str) -> None:
    client.send(f"BIG {key} {BIG}\n".encode())


# -- tests/guests/http_store.py (http.server.HTTPServer, keep-alive) -------------------


def _http_get(client: Client, target: str) -> tuple[int, bytes]:
    client.send(f"GET {target} HTTP/1.1\r\nHost: store\r\n\r\n".encode())
    head = client.read_until(b"\r\n\r\n").decode("latin-1")
    status_line, *headers = head.split("\r\n")
    assert status_line.startswith("HTTP/1.1 "), head
    length = next(
        int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")
    )
    return int(status_line.split()[1]), client.read_exact(length)


def _http_write(client: Client, key: str, value: str) -> None:
    assert _http_get(client, f"/put?k={key}&v={value}") == (200, f"OK {key}".encode())


def _http_read(client: Client, key: str) -> str | None:
    code, body = _http_get(client, f"/get?k={key}")
    if code == 404:
        assert body == f"NONE {key}".encode()
        return None
    words = body.decode().split()
    assert code == 200 and words[:2] == ["VAL", key], (code, body)
    return words[2]


def _http_big(client: Client, key: str) -> None:
    client.send(f"GET /big?k={key}&n={BIG} HTTP/1.1\r\nHost: store\r\n\r\n".encode())


def _http_big_head(client: Client) -> None:
    head = client.read_until(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and f"Content-Length: {BIG}".encode() in head


SHAPES = {
    "socketserver": Shape(
        "socketserver",
        lambda port: (str(EXAMPLES / "echo.py"), "--port", str(port)),
        sequential=True,
        write=_echo_write,
        read=_echo_read,
        half_request=b"half a li",
        big_request=_echo_big,
        big_reply_head=_no_head,
        big_reply_tail=lambda key: b"",
    ),
    "selectors": Shape(
        "selectors",
        lambda port: (str(EXAMPLES / "kv.py"), "--port", str(port)),
        sequential=False,
        write=_kv_write,
        read=_kv_read,
        half_request=b"*3\r\n$3\r\nSET\r\n$7\r\npartial\r\n$1",
        big_request=_kv_big,
        big_reply_head=_kv_big_head,
        big_reply_tail=lambda key: b"\r\n",
    ),
    "asyncio-streams": Shape(
        "asyncio-streams",
        lambda port: (str(GUESTS / "line_store.py"), str(port), "streams"),
        sequential=False,
        write=_line_write,
        read=_line_read,
        half_request=b"PUT partial 1",
        big_request=_line_big,
        big_reply_head=_no_head,
        big_reply_tail=lambda key: b"\nEND " + key.encode() + b"\n",
    ),
    "asyncio-protocol": Shape(
        "asyncio-protocol",
        lambda port: (str(GUESTS / "line_store.py"), str(port), "protocol"),
        sequential=False,
        write=_line_write,
        read=_line_read,
        half_request=b"PUT partial 1",
        big_request=_line_big,
        big_reply_head=_no_head,
        big_reply_tail=lambda key: b"\nEND " + key.encode() + b"\n",
    ),
    "http.server": Shape(
        "http.server",
        lambda port: (str(GUESTS / "http_store.py"), str(port)),
        sequential=True,
        write=_http_write,
        read=_http_read,
        half_request=b"GET /put?k=partial&v=1 HTTP/1.1\r\nHost: a\r\n",
        big_request=_http_big,
        big_reply_head=_http_big_head,
        big_reply_tail=lambda key: b"",
    ),
}

OLD_STATES = ("idle", "mid-request", "mid-response", "half-closed")
CASES = [
    pytest.param(name, first, id=f"{name}-{first}-served")
    for name, shape in SHAPES.items()
    for first in (OLD_STATES[:3] if shape.sequential else OLD_STATES[:1])
]


@pytest.fixture
def cluster(tmp_path: Path):
    made: list[Cluster] = []

    def make(shape: Shape) -> Cluster:
        port = free_port()
        c = Cluster(tmp_path, service_port=port, guest=shape.guest(port))
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.stop()


def _open_old_client(shape: Shape, state: str, port: int, served: bool) -> tuple[Client, bytes]:
    """A client left in ``state`` at the kill, and the reply it is owed (a prefix of it
    may still arrive). One a sequential server does not serve yet only sends."""
    client = Client(port)
    if state == "idle":
        if served:
            shape.write(client, "idle", "1")
        return client, b""
    if state == "mid-request":
        # A keep-alive client that was served once, in the middle of its next request.
        if served:
            shape.write(client, "midrequest", "1")
        client.send(shape.half_request)
        # An echo server answers half a line too: the bytes come back as they came.
        return client, shape.half_request if served and shape.name == "socketserver" else b""
    if state == "half-closed" and shape.name == "socketserver":
        # Queued behind the served client (this shape serves one at a time).
        client.send(b"last line\n")
        client.sock.shutdown(socket.SHUT_WR)
        return client, b""
    key = "slowreader" if state == "mid-response" else "halfclosed"
    shape.big_request(client, key)
    if state == "half-closed":
        # All sent, its side shut: the server reads EOF while it still writes the reply.
        client.sock.shutdown(socket.SHUT_WR)
    return client, _body(key, BIG) + shape.big_reply_tail(key)


def _serve_new_client(shape: Shape, port: int, index: int, acked_before: dict[str, str]) -> None:
    """A client after the failover: its writes acknowledged and read back as its own."""
    token = f"new{index}x{time.monotonic_ns()}"
    client = Client(port)
    try:
        for round_ in range(3):
            shape.write(client, f"{token}r{round_}", f"v{index}r{round_}")
        if shape.name != "socketserver":
            for round_ in range(3):
                assert shape.read(client, f"{token}r{round_}") == f"v{index}r{round_}"
            for key, value in acked_before.items():
                assert shape.read(client, key) == value, f"{key}: acknowledged {value}, lost"
    finally:
        client.close()


@pytest.mark.parametrize(("shape_name", "first"), CASES)
def test_old_connections_read_as_reset_and_new_ones_are_their_own(
    cluster, shape_name: str, first: str
) -> None:
    shape = SHAPES[shape_name]
    c = cluster(shape)
    port = c.service_port
    acked_before: dict[str, str] = {}
    if shape.name != "socketserver":
        setup = Client(port)
        for i in range(5):
            shape.write(setup, f"before{i}", f"b{i}")
            acked_before[f"before{i}"] = f"b{i}"
        setup.close()
    # The served connection first (a sequential server is then busy with it and leaves
    # the other two unserved in its listen queue); each one's owed reply is what may
    # still trickle out of the dead primary.
    order = [first, *(state for state in OLD_STATES if state != first)]
    old: dict[str, tuple[Client, bytes]] = {}
    for state in order:
        served = not shape.sequential or state == first
        old[state] = _open_old_client(shape, state, port, served)
    for state in ("mid-response", "half-closed"):
        if shape.sequential and first != state:
            continue  # not served before the kill
        # Read a little of the large reply, slowly: the guest is blocked writing the rest.
        reader, owed = old[state]
        shape.big_reply_head(reader)
        start = reader.read_exact(65536)
        assert owed.startswith(start)
        old[state] = (reader, owed[len(start) :])
    c.kill_primary()
    wait_until(lambda: status(c.backup_admin)["role"] == "live", 20, "the backup is live")

    for state, (client, owed) in old.items():
        rest = client.rest_until_closed()
        assert owed.startswith(rest), f"the {state} client got bytes it was not owed: {rest[:80]!r}"
        client.close()

    with concurrent.futures.ThreadPoolExecutor(NEW_CLIENTS) as pool:
        futures = [
            pool.submit(_serve_new_client, shape, port, i, acked_before) for i in range(NEW_CLIENTS)
        ]
        for future in futures:
            future.result(timeout=60)

    reset = [e for e in c.backup.events() if e.get("event") == "connections_reset"]
    assert reset, "the backup went live without resetting its guest's connections"
    assert reset[0]["count"] >= 1
    assert status(c.backup_admin)["role"] == "live"
    # The guest is still serving: one more client after the crowd.
    _serve_new_client(shape, port, NEW_CLIENTS, acked_before)


def test_connection_ids_continue_after_failover(cluster) -> None:
    """The live front numbers new connections after every id the log handed out."""
    shape = SHAPES["selectors"]
    c = cluster(shape)
    clients = [Client(c.service_port) for _ in range(3)]
    for i, client in enumerate(clients):
        shape.write(client, f"k{i}", "v")
    c.kill_primary()
    wait_until(lambda: status(c.backup_admin)["role"] == "live", 20, "the backup is live")
    reset = next(e for e in c.backup.events() if e.get("event") == "connections_reset")
    assert reset["count"] == 3
    assert reset["next_id"] == (1 << 30) + 3
    for client in clients:
        assert client.rest_until_closed() == b""
        client.close()
    with socket.create_connection(("127.0.0.1", c.service_port), timeout=10) as sock:
        sock.sendall(encode_command("GET", "k1"))
        assert sock.recv(100) == b"$1\r\nv\r\n"


class Upstream:
    """A line server the guest connects to: answers ``echo LINE``, except a line
    starting with ``hold``, which it never answers (the guest waits on it)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held = threading.Event()
        self.held_ended = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            if data.startswith(b"hold"):
                self.held.set()
                with contextlib.suppress(OSError):
                    while conn.recv(4096):
                        pass
                self.held_ended.set()
                return
            conn.sendall(b"echo " + data)

    def close(self) -> None:
        self.listener.close()


def test_a_connection_the_guest_made_reads_as_reset_and_new_ones_connect_afresh(
    tmp_path: Path,
) -> None:
    upstream = Upstream()
    port = free_port()
    c = Cluster(
        tmp_path, service_port=port, guest=(str(GUESTS / "proxy.py"), str(port), str(upstream.port))
    )
    try:
        c.start()
        served = Client(port)
        served.send(b"first\n")
        assert served.read_until(b"\n") == b"upstream said: echo first\n"
        waiting = Client(port)
        waiting.send(b"hold on\n")
        # The guest's own connection upstream is open and waits for an answer at the kill.
        assert upstream.held.wait(20)
        c.kill_primary()
        wait_until(lambda: status(c.backup_admin)["role"] == "live", 20, "the backup is live")
        for client in (served, waiting):
            assert client.rest_until_closed() == b""
            client.close()
        assert upstream.held_ended.wait(20)  # it was the old primary's socket
        reset = next(e for e in c.backup.events() if e.get("event") == "connections_reset")
        assert reset["count"] == 3  # two clients and the guest's connection upstream

        def ask(index: int) -> None:
            client = Client(port)
            try:
                client.send(b"word%d\n" % index)
                assert client.read_until(b"\n") == b"upstream said: echo word%d\n" % index
            finally:
                client.close()

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            for future in [pool.submit(ask, i) for i in range(10)]:
                future.result(timeout=60)
    finally:
        c.stop()
        upstream.close()


def test_a_udp_service_answers_from_the_same_address_after_failover(tmp_path: Path) -> None:
    port = free_port()
    c = Cluster(tmp_path, service_port=port, guest=(str(GUESTS / "udp_echo.py"), str(port)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        try:
            c.start()
            sock.sendto(b"before", ("127.0.0.1", port))
            assert sock.recvfrom(100)[0] == b"1:before"
            c.kill_primary()
            wait_until(lambda: status(c.backup_admin)["role"] == "live", 20, "the backup is live")

            def answered() -> bool:
                # Datagrams may be lost while the address moves: ask until one is answered.
                sock.sendto(b"after", ("127.0.0.1", port))
                try:
                    data = sock.recvfrom(100)[0]
                except TimeoutError:
                    return False
                assert data.endswith(b":after") and int(data.split(b":")[0]) >= 2, data
                return True

            wait_until(answered, 20, "the live backup answers datagrams")
        finally:
            c.stop()
