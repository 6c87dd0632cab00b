"""A small Redis-compatible key-value store on a :mod:`selectors` event loop.

It speaks RESP (the Redis protocol), both the array form that client libraries send
and the inline form you can type into ``telnet``, so ``redis-cli`` and
``redis-benchmark`` work against it. Requests may be pipelined (many commands in
one read) or split across reads. Keys can expire: expired keys vanish when they
are next touched, and a sweep driven by the selector's timeout removes the rest.

Everything runs on one thread with non-blocking sockets: no asyncio, no threads.

Run it standalone::

    python examples/kv.py --port 6380
    redis-cli -p 6380 set greeting hello
"""

from __future__ import annotations

import argparse
import fnmatch
import heapq
import re
import selectors
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import NamedTuple, NoReturn

CRLF = b"\r\n"
RECV_SIZE = 65536
ACCEPTS_PER_WAKEUP = 64
MAX_INLINE_SIZE = 64 * 1024
MAX_ARGS = 1024 * 1024
MAX_BULK_SIZE = 512 * 1024 * 1024
OUTPUT_HIGH_WATER = 1024 * 1024  # stop reading a client that does not read its replies
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
STRICT_INT = re.compile(rb"-?(?:0|[1-9][0-9]*)")

NOT_AN_INTEGER = "ERR value is not an integer or out of range"
SYNTAX_ERROR = "ERR syntax error"


# --- RESP encoding -----------------------------------------------------------------


def simple_string(text: str) -> bytes:
    """Encode a status reply such as ``+OK``."""
    return b"+" + text.encode() + CRLF


def error_reply(message: str) -> bytes:
    """Encode an error reply; the message starts with its code, e.g. ``ERR ...``."""
    one_line = message.replace("\r", " ").replace("\n", " ")
    return b"-" + one_line.encode("utf-8", "replace") + CRLF


def integer(value: int) -> bytes:
    """Encode an integer reply."""
    return b":%d\r\n" % value


def bulk_string(value: bytes | None) -> bytes:
    """Encode a bulk string, or the nil bulk string for ``None``."""
    if value is None:
        return b"$-1\r\n"
    return b"$%d\r\n%s\r\n" % (len(value), value)


def array(items: list[bytes]) -> bytes:
    """Encode an array of bulk strings."""
    return b"*%d\r\n" % len(items) + b"".join(bulk_string(item) for item in items)


OK = simple_string("OK")
EMPTY_ARRAY = array([])


def parse_int(raw: bytes) -> int | None:
    """Parse a signed 64-bit integer written the way Redis accepts it, else ``None``."""
    if not STRICT_INT.fullmatch(raw):
        return None
    value = int(raw)
    return value if INT64_MIN <= value <= INT64_MAX else None


# --- RESP decoding -----------------------------------------------------------------


class ProtocolError(Exception):
    """The client sent bytes that are not a valid request."""


class RequestParser:
    """Turn a stream of bytes into commands, each a list of byte-string arguments.

    Feed it whatever ``recv`` returned; :meth:`next_command` then yields complete
    commands one at a time and ``None`` once only a partial command is left.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        """Append bytes received from the client."""
        self._buffer += data

    def next_command(self) -> list[bytes] | None:
        """Remove and return the next complete command, or ``None`` if there is none.

        An empty list stands for an empty request (a blank line or ``*0``), which
        the caller should ignore.
        """
        if not self._buffer:
            return None
        if self._buffer.startswith(b"*"):
            return self._next_array()
        return self._next_inline()

    def _next_inline(self) -> list[bytes] | None:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_INLINE_SIZE:
                raise ProtocolError("too big inline request")
            return None
        line = bytes(self._buffer[:end]).rstrip(b"\r")
        del self._buffer[: end + 1]
        try:
            words = shlex.split(line.decode("latin-1"))
        except ValueError:
            raise ProtocolError("unbalanced quotes in request") from None
        return [word.encode("latin-1") for word in words]

    def _next_array(self) -> list[bytes] | None:
        buffer = self._buffer
        header = self._read_line(1)
        if header is None:
            return None
        count_text, pos = header
        count = parse_int(count_text)
        if count is None or count > MAX_ARGS:
            raise ProtocolError("invalid multibulk length")
        args: list[bytes] = []
        for _ in range(count):
            if pos >= len(buffer):
                return None
            if buffer[pos] != ord("$"):
                raise ProtocolError(f"expected '$', got '{chr(buffer[pos])}'")
            line = self._read_line(pos + 1)
            if line is None:
                return None
            length_text, start = line
            length = parse_int(length_text)
            if length is None or not 0 <= length <= MAX_BULK_SIZE:
                raise ProtocolError("invalid bulk length")
            end = start + length
            if len(buffer) < end + len(CRLF):
                return None
            if buffer[end : end + len(CRLF)] != CRLF:
                raise ProtocolError("expected CRLF after bulk string")
            args.append(bytes(buffer[start:end]))
            pos = end + len(CRLF)
        del buffer[:pos]
        return args

    def _read_line(self, start: int) -> tuple[bytes, int] | None:
        """Return the text from ``start`` to the next CRLF and the offset after it."""
        end = self._buffer.find(CRLF, start)
        if end < 0:
            if len(self._buffer) - start > MAX_INLINE_SIZE:
                raise ProtocolError("too big count or length line")
            return None
        return bytes(self._buffer[start:end]), end + len(CRLF)


# --- The data ----------------------------------------------------------------------


class CommandError(Exception):
    """A command failed; the message becomes the error reply (``ERR ...``)."""


class Store:
    """Byte-string keys and values with optional expiry on the monotonic clock."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._expires: dict[bytes, float] = {}
        self._deadlines: list[tuple[float, bytes]] = []  # heap; may hold stale entries

    def __len__(self) -> int:
        """The number of keys held, including expired ones not swept yet (as Redis)."""
        return len(self._data)

    def get(self, key: bytes) -> bytes | None:
        """Return the value of ``key``, or ``None`` if it is missing or expired."""
        self._expire_if_due(key)
        return self._data.get(key)

    def set(self, key: bytes, value: bytes, ttl: float | None = None) -> None:
        """Set ``key``; a ``ttl`` in seconds makes it expire, ``None`` clears any TTL."""
        self._data[key] = value
        if ttl is None:
            self._expires.pop(key, None)
        else:
            deadline = time.monotonic() + ttl
            self._expires[key] = deadline
            heapq.heappush(self._deadlines, (deadline, key))

    def set_keep_ttl(self, key: bytes, value: bytes) -> None:
        """Replace the value of ``key`` but keep its expiry, if it has one."""
        self._expire_if_due(key)
        self._data[key] = value

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; return whether it existed."""
        self._expire_if_due(key)
        self._expires.pop(key, None)
        return self._data.pop(key, None) is not None

    def exists(self, key: bytes) -> bool:
        """Return whether ``key`` holds a value."""
        return self.get(key) is not None

    def keys(self, pattern: bytes) -> list[bytes]:
        """Return the live keys matching a glob ``pattern`` (``*``, ``?``, ``[...]``)."""
        return [
            key
            for key in list(self._data)
            if fnmatch.fnmatchcase(key, pattern) and self.get(key) is not None
        ]

    def flush(self) -> None:
        """Delete every key."""
        self._data.clear()
        self._expires.clear()
        self._deadlines.clear()

    def seconds_until_next_expiry(self) -> float | None:
        """How long the event loop may sleep before :meth:`sweep` has work to do."""
        if not self._deadlines:
            return None
        return max(0.0, self._deadlines[0][0] - time.monotonic())

    def sweep(self) -> int:
        """Delete the keys whose expiry has passed; return how many were deleted."""
        now = time.monotonic()
        removed = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, key = heapq.heappop(self._deadlines)
            if self._expires.get(key) == deadline:  # not overwritten since
                self._remove(key)
                removed += 1
        return removed

    def _expire_if_due(self, key: bytes) -> None:
        deadline = self._expires.get(key)
        if deadline is not None and deadline <= time.monotonic():
            self._remove(key)

    def _remove(self, key: bytes) -> None:
        del self._data[key]
        del self._expires[key]


# --- Commands ----------------------------------------------------------------------


def cmd_ping(store: Store, args: list[bytes]) -> bytes:
    """PING [message]"""
    return bulk_string(args[1]) if len(args) == 2 else simple_string("PONG")


def cmd_echo(store: Store, args: list[bytes]) -> bytes:
    """ECHO message"""
    return bulk_string(args[1])


def cmd_set(store: Store, args: list[bytes]) -> bytes:
    """SET key value [NX | XX] [EX seconds | PX milliseconds | KEEPTTL]"""
    key, value = args[1], args[2]
    condition: bytes | None = None
    expiry: bytes | None = None
    ttl: float | None = None
    options = iter(args[3:])
    for option in options:
        word = option.upper()
        if word in (b"NX", b"XX") and condition in (None, word):
            condition = word
        elif word in (b"EX", b"PX") and expiry is None:
            expiry = word
            ttl = parse_ttl(next(options, None), per_second=1 if word == b"EX" else 1000)
        elif word == b"KEEPTTL" and expiry in (None, word):
            expiry = word
        else:
            raise CommandError(SYNTAX_ERROR)
    present = store.exists(key)
    if (condition == b"NX" and present) or (condition == b"XX" and not present):
        return bulk_string(None)
    if expiry == b"KEEPTTL":
        store.set_keep_ttl(key, value)
    else:
        store.set(key, value, ttl)
    return OK


def parse_ttl(raw: bytes | None, per_second: int) -> float:
    """Turn the argument of SET's EX or PX option into seconds."""
    if raw is None:
        raise CommandError(SYNTAX_ERROR)
    amount = parse_int(raw)
    if amount is None:
        raise CommandError(NOT_AN_INTEGER)
    if amount <= 0:
        raise CommandError("ERR invalid expire time in 'set' command")
    return amount / per_second


def cmd_get(store: Store, args: list[bytes]) -> bytes:
    """GET key"""
    return bulk_string(store.get(args[1]))


def increment(store: Store, key: bytes, delta: int) -> bytes:
    """Add ``delta`` to the integer stored at ``key`` (0 if missing), keeping its TTL."""
    current = store.get(key)
    value = 0 if current is None else parse_int(current)
    if value is None:
        raise CommandError(NOT_AN_INTEGER)
    result = value + delta
    if not INT64_MIN <= result <= INT64_MAX:
        raise CommandError("ERR increment or decrement would overflow")
    store.set_keep_ttl(key, b"%d" % result)
    return integer(result)


def delta_argument(raw: bytes) -> int:
    """Parse the amount given to INCRBY or DECRBY."""
    delta = parse_int(raw)
    if delta is None:
        raise CommandError(NOT_AN_INTEGER)
    return delta


def cmd_incr(store: Store, args: list[bytes]) -> bytes:
    """INCR key"""
    return increment(store, args[1], 1)


def cmd_incrby(store: Store, args: list[bytes]) -> bytes:
    """INCRBY key increment"""
    return increment(store, args[1], delta_argument(args[2]))


def cmd_decr(store: Store, args: list[bytes]) -> bytes:
    """DECR key"""
    return increment(store, args[1], -1)


def cmd_decrby(store: Store, args: list[bytes]) -> bytes:
    """DECRBY key decrement"""
    return increment(store, args[1], -delta_argument(args[2]))


def cmd_del(store: Store, args: list[bytes]) -> bytes:
    """DEL key [key ...]"""
    return integer(sum(store.delete(key) for key in args[1:]))


def cmd_exists(store: Store, args: list[bytes]) -> bytes:
    """EXISTS key [key ...] (a key named twice counts twice)"""
    return integer(sum(store.exists(key) for key in args[1:]))


def cmd_dbsize(store: Store, args: list[bytes]) -> bytes:
    """DBSIZE"""
    return integer(len(store))


def cmd_keys(store: Store, args: list[bytes]) -> bytes:
    """KEYS pattern"""
    return array(store.keys(args[1]))


def cmd_flushall(store: Store, args: list[bytes]) -> bytes:
    """FLUSHALL [ASYNC | SYNC]"""
    if len(args) > 2 or (len(args) == 2 and args[1].upper() not in (b"ASYNC", b"SYNC")):
        raise CommandError(SYNTAX_ERROR)
    store.flush()
    return OK


def cmd_config(store: Store, args: list[bytes]) -> bytes:
    """CONFIG GET parameter [parameter ...]: there is no configuration to report."""
    subcommand = args[1].decode("latin-1")
    if subcommand.upper() != "GET":
        raise CommandError(f"ERR unknown subcommand '{subcommand}'. Try CONFIG HELP.")
    if len(args) < 3:
        raise CommandError("ERR wrong number of arguments for 'config|get' command")
    return EMPTY_ARRAY


def cmd_command(store: Store, args: list[bytes]) -> bytes:
    """COMMAND [...]: no command documentation is offered."""
    return EMPTY_ARRAY


def cmd_quit(store: Store, args: list[bytes]) -> bytes:
    """QUIT: reply OK, then the server closes the connection."""
    return OK


Handler = Callable[[Store, list[bytes]], bytes]


class Command(NamedTuple):
    """How to run a command: ``arity`` counts the name; negative means "at least"."""

    handler: Handler
    arity: int
    closes_connection: bool = False

    def accepts(self, argc: int) -> bool:
        """Return whether ``argc`` arguments (the name included) are allowed."""
        return argc == self.arity if self.arity >= 0 else argc >= -self.arity


COMMANDS: dict[bytes, Command] = {
    b"ping": Command(cmd_ping, -1),
    b"echo": Command(cmd_echo, 2),
    b"set": Command(cmd_set, -3),
    b"get": Command(cmd_get, 2),
    b"incr": Command(cmd_incr, 2),
    b"incrby": Command(cmd_incrby, 3),
    b"decr": Command(cmd_decr, 2),
    b"decrby": Command(cmd_decrby, 3),
    b"del": Command(cmd_del, -2),
    b"exists": Command(cmd_exists, -2),
    b"dbsize": Command(cmd_dbsize, 1),
    b"keys": Command(cmd_keys, 2),
    b"flushall": Command(cmd_flushall, -1),
    b"config": Command(cmd_config, -2),
    b"command": Command(cmd_command, -1),
    b"quit": Command(cmd_quit, -1, closes_connection=True),
}


def unknown_command(args: list[bytes]) -> str:
    """The error Redis gives for a command it does not know."""
    name = args[0].decode("latin-1")[:128]
    quoted = "".join(f"'{arg.decode('latin-1')}' " for arg in args[1:])
    return f"ERR unknown command '{name}', with args beginning with: {quoted}"


def execute(store: Store, args: list[bytes]) -> tuple[bytes, bool]:
    """Run one command; return its reply and whether to close the connection after it."""
    name = args[0].lower()
    command = COMMANDS.get(name)
    if command is None:
        return error_reply(unknown_command(args)), False
    if not command.accepts(len(args)):
        message = f"ERR wrong number of arguments for '{name.decode()}' command"
        return error_reply(message), False
    try:
        reply = command.handler(store, args)
    except CommandError as exc:
        reply = error_reply(str(exc))
    return reply, command.closes_connection


# --- The network -------------------------------------------------------------------


class Connection:
    """One client: its socket, what it sent but we have not parsed, what we owe it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = RequestParser()
        self.output = bytearray()
        self.closing = False  # QUIT or a protocol error: close once output is flushed
        self.eof = False  # the client sent all it will: close once answered
        self.events = selectors.EVENT_READ


class KVServer:
    """Accept clients and serve their commands from one selector loop."""

    def __init__(self, host: str, port: int) -> None:
        self.store = Store()
        self.selector = selectors.DefaultSelector()
        self.listener = socket.create_server((host, port), backlog=128)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.connections: set[Connection] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The host and port the server listens on."""
        host, port = self.listener.getsockname()[:2]
        return host, port

    def serve_forever(self) -> None:
        """Run the event loop until an exception (e.g. KeyboardInterrupt) stops it."""
        while True:
            timeout = self.store.seconds_until_next_expiry()
            for key, mask in self.selector.select(timeout):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._service(key.data, mask)
            self.store.sweep()

    def close(self) -> None:
        """Close every client connection and the listening socket."""
        for conn in list(self.connections):
            self._close(conn)
        self.selector.unregister(self.listener)
        self.listener.close()
        self.selector.close()

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, _address = self.listener.accept()
            except OSError:  # none waiting (BlockingIOError), or aborted before accepted
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock)
            self.selector.register(sock, conn.events, conn)
            self.connections.add(conn)

    def _service(self, conn: Connection, mask: int) -> None:
        if mask & selectors.EVENT_READ and not self._receive(conn):
            return
        while True:
            backlog = self._run_commands(conn)
            if not self._send(conn):
                return
            if not backlog or len(conn.output) >= OUTPUT_HIGH_WATER:
                break
        if (conn.closing or (conn.eof and not backlog)) and not conn.output:
            self._close(conn)
        else:
            self._update_interest(conn)

    def _receive(self, conn: Connection) -> bool:
        """Read what the client sent into its parser; return False if it went away."""
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return True
        except OSError:  # reset by the peer, and the like
            self._close(conn)
            return False
        if data:
            conn.parser.feed(data)
        else:
            conn.eof = True  # still answer the commands it sent before
        return True

    def _run_commands(self, conn: Connection) -> bool:
        """Run buffered commands; return True if it stopped because output piled up."""
        while not conn.closing:
            if len(conn.output) >= OUTPUT_HIGH_WATER:
                return True
            try:
                args = conn.parser.next_command()
            except ProtocolError as exc:
                conn.output += error_reply(f"ERR Protocol error: {exc}")
                conn.closing = True
                break
            if args is None:
                break
            if args:
                reply, conn.closing = execute(self.store, args)
                conn.output += reply
        return False

    def _send(self, conn: Connection) -> bool:
        """Send what the socket takes without blocking; return False if it failed."""
        while conn.output:
            try:
                sent = conn.sock.send(conn.output)
            except BlockingIOError:
                break
            except OSError:
                self._close(conn)
                return False
            del conn.output[:sent]
        return True

    def _update_interest(self, conn: Connection) -> None:
        """Wait for input only while replies are not piling up, for output only if any."""
        events = 0
        if not (conn.closing or conn.eof) and len(conn.output) < OUTPUT_HIGH_WATER:
            events |= selectors.EVENT_READ
        if conn.output:
            events |= selectors.EVENT_WRITE
        if events != conn.events:
            self.selector.modify(conn.sock, events, conn)
            conn.events = events

    def _close(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.selector.unregister(conn.sock)
        conn.sock.close()


# --- Entry point -------------------------------------------------------------------


def exit_quietly(signum: int, frame: FrameType | None) -> NoReturn:
    """Signal handler: leave through the normal clean-up path with status 0."""
    raise SystemExit(0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=6380, help="port to bind (default: %(default)s)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM; return the process exit status."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_quietly)
    try:
        server = KVServer(args.host, args.port)
    except OSError as exc:
        print(f"kv: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    host, port = server.address
    try:
        print(f"kv listening on {host}:{port}", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
