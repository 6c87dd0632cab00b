"""Packet mode inside the guest: virtual sockets over the guest's own TCP/IP stack.

In socket mode the supervisor holds a real socket for each virtual one. In
packet mode the guest holds a ``NetStack`` (``ftproxy.netstack``) for the
virtual IP instead, and ``PacketNetwork`` plays the supervisor's part for the
virtual sockets: it answers their BIND, LISTEN and CONNECT requests, takes
their outputs and hands them the same events (accept, data, EOF, reset, sent,
datagram) the socket front would. Only Ethernet frames cross the guest pipe:
received frames arrive as EV_FRAME events at exits (logged inputs, so a backup
replays them into an identical stack), frames the stack transmits leave as
OP_FRAME outputs (under the output rule). The stack's timers run on the
guest's virtual clock and its randomness comes from the logged seed, so the
backup's stack is the primary's, segment for segment: that is what lets a
client's TCP connection survive a failover.

Addresses: the guest has one interface. A bind to the wildcard, the virtual IP
or a loopback address binds the virtual IP (services bind 127.0.0.1 by
default; in packet mode that is where their clients reach them). IPv6 sockets
bind and listen but never see a connection: the virtual host has no IPv6
network (so ``asyncio.start_server(host=None)``, which binds both, still works).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import socket as _socket
from collections import deque
from typing import Any

from ftproxy.guest import protocol
from ftproxy.guest._runtime import Runtime
from ftproxy.netstack import NetStack, TcpConnection, TcpListener, TcpState, UdpSocket

_CONNECT_TIMEOUT_NS = 30 * 1_000_000_000


class _Stream:
    """A stack connection on behalf of one virtual socket."""

    __slots__ = (
        "closing",
        "conn",
        "eof_reported",
        "outbox",
        "reset_reported",
        "shutdown_pending",
        "written",
        "written_reported",
    )

    def __init__(self, conn: TcpConnection) -> None:
        self.conn = conn
        # Bytes the virtual socket sent that the stack's send buffer has not taken yet.
        self.outbox: deque[bytes] = deque()
        self.written = 0
        self.written_reported = 0
        self.eof_reported = False
        self.reset_reported = False
        self.shutdown_pending = False
        self.closing = False


def _stack_random(seed: bytes) -> Any:
    """A random32 for the stack: BLAKE2b counter mode, apart from the program's stream.

    Drawing from the program's entropy device would tick the instruction counter
    in the middle of the stack's work, which must never start an exit.
    """
    counter = 0
    pool: list[int] = []

    def random32() -> int:
        nonlocal counter
        if not pool:
            block = hashlib.blake2b(
                counter.to_bytes(16, "little"), key=seed, person=b"ftproxy-netstack"
            ).digest()
            counter += 1
            pool.extend(int.from_bytes(block[i : i + 4], "little") for i in range(0, 64, 4))
        return pool.pop()

    return random32


class PacketNetwork:
    """The guest's virtual sockets on its own stack; see the module docstring."""

    def __init__(self, runtime: Runtime, network: Any, seed: bytes) -> None:
        mac, ip, prefix_len, gateway = network
        self._runtime = runtime
        self.stack = NetStack(mac, ip, prefix_len, gateway, random32=_stack_random(seed))
        self.ip = ip
        self._bound: dict[int, tuple[int, int, int]] = {}  # sock -> (family, type, port)
        self._streams: dict[int, _Stream] = {}
        self._listeners: dict[int, TcpListener] = {}
        self._inert: set[int] = set()  # IPv6 sockets: bound, never connected
        self._udp: dict[int, UdpSocket] = {}
        self._next_accepted = protocol.FIRST_ACCEPTED_SOCK

    # -- requests --------------------------------------------------------------

    def request(self, kind: int, args: tuple[Any, ...]) -> Any:
        if kind == protocol.KIND_BIND:
            return self._bind(*args)
        if kind == protocol.KIND_LISTEN:
            return self._listen(*args)
        if kind == protocol.KIND_CONNECT:
            return self._connect(*args)
        return self._runtime.exit(kind, args)

    def _bind(self, sock: int, family: int, kind: int, addr: tuple[Any, ...]) -> tuple[int, Any]:
        host, port = addr[0], addr[1]
        if family == _socket.AF_INET6:
            self._inert.add(sock)
            return 0, (host, port or self.stack.free_port(), 0, 0)
        if host not in ("0.0.0.0", self.ip) and not host.startswith("127."):
            return errno.EADDRNOTAVAIL, None
        seen = "0.0.0.0" if host == "0.0.0.0" else self.ip
        if kind == _socket.SOCK_DGRAM:
            try:
                udp = self.stack.udp_bind(port)
            except OSError as exc:
                return exc.errno or errno.EINVAL, None
            self._udp[sock] = udp
            return 0, (seen, udp.port)
        if port == 0:
            port = self.stack.free_port()
        elif any(bound_port == port for _, _, bound_port in self._bound.values()):
            return errno.EADDRINUSE, None
        self._bound[sock] = (family, kind, port)
        return 0, (seen, port)

    def _listen(self, sock: int, backlog: int) -> int:
        if sock in self._inert:
            return 0
        bound = self._bound.pop(sock, None)
        if bound is None:
            return errno.EINVAL
        try:
            listener = self.stack.tcp_listen(bound[2], max(backlog, 1))
        except OSError as exc:
            return exc.errno or errno.EINVAL
        self._listeners[sock] = listener
        return 0

    def _connect(
        self, sock: int, family: int, addr: tuple[Any, ...], timeout_ns: int
    ) -> tuple[int, Any, Any]:
        if family != _socket.AF_INET:
            return errno.ENETUNREACH, None, None
        bound = self._bound.pop(sock, None)
        try:
            conn = self.stack.tcp_connect(addr[0], addr[1], bound[2] if bound else 0)
        except OSError as exc:
            return exc.errno or errno.EINVAL, None, None
        self._transmit()
        runtime = self._runtime
        limit = _CONNECT_TIMEOUT_NS if timeout_ns < 0 else timeout_ns
        deadline = runtime.mono_ns() + limit
        # The handshake runs on exits like any wait; other sockets' events are
        # delivered meanwhile, as they would be while the supervisor connected.
        while conn.state is TcpState.SYN_SENT and not conn.error:
            remaining = deadline - runtime.mono_ns()
            if remaining <= 0:
                conn.abort()
                self._transmit()
                return errno.ETIMEDOUT, None, None
            runtime._exit_wait(self.timeout_ns(remaining), [], [])
        if conn.error or not conn.connected:
            return conn.error or errno.ECONNREFUSED, None, None
        self._streams[sock] = _Stream(conn)
        return 0, conn.local_address, conn.remote_address

    # -- outputs ---------------------------------------------------------------

    def output(self, message: tuple[Any, ...]) -> None:
        op, sock = message[0], message[1]
        stream = self._streams.get(sock)
        if op == protocol.OP_SEND:
            if stream is not None and not stream.closing:
                stream.outbox.append(message[2])
                self._flush(stream)
        elif op == protocol.OP_SENDTO:
            udp = self._udp.get(sock)
            if udp is not None:
                # A datagram that cannot go is dropped, as on a real network.
                with contextlib.suppress(OSError):
                    udp.sendto(message[2], tuple(message[3]))
        elif op == protocol.OP_SHUTDOWN:
            if stream is not None and message[2] != _socket.SHUT_RD:
                stream.shutdown_pending = True
                self._flush(stream)
        else:
            self._close(sock)
        self._transmit()

    def _flush(self, stream: _Stream) -> None:
        """Move queued bytes into the stack's send buffer; FIN or close once empty."""
        conn = stream.conn
        while stream.outbox and not conn.error:
            chunk = stream.outbox[0]
            try:
                taken = conn.send(chunk)
            except OSError:
                stream.outbox.clear()
                break
            if taken == 0:
                return
            stream.written += taken
            if taken == len(chunk):
                stream.outbox.popleft()
            else:
                stream.outbox[0] = chunk[taken:]
        if stream.shutdown_pending:
            stream.shutdown_pending = False
            conn.shutdown_write()
        if stream.closing:
            conn.close()

    def _close(self, sock: int) -> None:
        stream = self._streams.get(sock)
        if stream is not None:
            stream.closing = True
            if not stream.outbox:
                del self._streams[sock]
            self._flush(stream)
            return
        listener = self._listeners.pop(sock, None)
        if listener is not None:
            listener.close()
            return
        udp = self._udp.pop(sock, None)
        if udp is not None:
            udp.close()
            return
        self._bound.pop(sock, None)
        self._inert.discard(sock)

    def _transmit(self) -> None:
        runtime = self._runtime
        for frame in self.stack.take_frames():
            runtime.emit((protocol.OP_FRAME, 0, frame), frame)

    # -- input -----------------------------------------------------------------

    def timeout_ns(self, timeout_ns: int) -> int:
        deadline = self.stack.next_deadline()
        if deadline is None:
            return timeout_ns
        until = max(0, deadline - self._runtime.mono_ns())
        return until if timeout_ns < 0 else min(timeout_ns, until)

    def settle(self, frames: list[bytes]) -> list[tuple[Any, ...]]:
        stack = self.stack
        now = self._runtime.mono_ns()
        for frame in frames:
            stack.receive_frame(frame, now)
        stack.on_time(now)
        for sock, stream in list(self._streams.items()):
            if stream.outbox or stream.closing:
                self._flush(stream)
                if stream.closing and not stream.outbox:
                    del self._streams[sock]
        events: list[tuple[Any, ...]] = []
        sockets = self._runtime.sockets
        for sock, listener in self._listeners.items():
            while (conn := listener.accept()) is not None:
                conn_id = self._next_accepted
                self._next_accepted += 1
                self._streams[conn_id] = _Stream(conn)
                events.append(
                    (protocol.EV_ACCEPT, sock, conn_id, conn.remote_address, conn.local_address)
                )
        for sock, stream in self._streams.items():
            if not stream.closing:
                self._stream_events(sock, stream, sockets.get(sock), events)
        for sock, udp in self._udp.items():
            while (datagram := udp.recvfrom()) is not None:
                events.append((protocol.EV_DGRAM, sock, datagram[0], datagram[1]))
        self._transmit()
        return events

    def _stream_events(
        self, sock: int, stream: _Stream, vsock: Any, events: list[tuple[Any, ...]]
    ) -> None:
        conn = stream.conn
        if stream.written > stream.written_reported:
            stream.written_reported = stream.written
            events.append((protocol.EV_SENT, sock, stream.written))
        # Input stays in the stack until the socket's own buffer is empty, so a
        # slow reader closes the TCP window instead of growing the guest's memory.
        if vsock is None or not vsock._wants_input():
            # A writer blocked on a failed connection must learn of it even unread.
            blocked = vsock is not None and vsock._write_blocked()
            if conn.error and blocked and not stream.reset_reported:
                stream.reset_reported = True
                events.append((protocol.EV_RESET, sock, conn.error))
            return
        try:
            data = conn.recv(protocol.RECV_CHUNK)
        except OSError as exc:
            if not stream.reset_reported:
                stream.reset_reported = True
                events.append((protocol.EV_RESET, sock, exc.errno or errno.ECONNRESET))
            return
        if data:
            events.append((protocol.EV_DATA, sock, data))
        elif data is not None and not stream.eof_reported:
            stream.eof_reported = True
            events.append((protocol.EV_EOF, sock))
