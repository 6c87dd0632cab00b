"""Socket mode: the supervisor terminates TCP and UDP on real sockets for its guest.

The guest's virtual sockets name real ones by wire id. Input is read into
per-socket buffers (bounded, so a slow guest pushes back on its clients
through TCP) and handed out only when an exit asks for it, so what the guest
sees is exactly what the log says it saw. Outputs are written at once when
the kernel takes them, and queued otherwise.

Stream input is not read by a task per connection: every stream sits in one
level-triggered epoll set of the front's own, which the supervisor drains
without blocking (``pump``) when a wait exit comes, and sleeps on (its fd is
readable when any stream is) only when nothing is ready. A request then costs
one wake-up of the supervisor instead of a reader task's wake-up, its
re-registration with trio's epoll and a doorbell ring.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
from collections import deque
from typing import Any

import structlog
import trio

from ftproxy.guest import _trace, protocol
from ftproxy.shell.admission import RESERVED_DESCRIPTORS, RejectionLog, descriptors_left, peer_name
from ftproxy.shell.spin import spinner
from ftproxy.shell.sync import Doorbell

log = structlog.get_logger()
_ACCEPT_PAUSE_S = 0.1

_INPUT_LIMIT = 256 * 1024
_DATAGRAM_QUEUE = 1024
_CONNECT_TIMEOUT_S = 30.0
AddressMap = dict[int, tuple[str, int]]


class _Stream:
    """A real TCP connection on behalf of a guest socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = bytearray()
        self.eof = False
        self.reset = 0
        self.reset_reported = False
        self.eof_reported = False
        self.outbox: deque[bytes] = deque()
        self.written = 0
        self.written_reported = 0
        self.closing = False
        self.shutdown_after_flush: int | None = None
        self.polled = False  # in the front's epoll set: input is read when it comes
        self.to_write = Doorbell()
        self.scopes: list[trio.CancelScope] = []


class _Listener:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: deque[tuple[int, Any, Any]] = deque()
        self.cancel = trio.CancelScope()


class _Datagram:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.queue: deque[tuple[bytes, Any]] = deque()
        self.cancel = trio.CancelScope()


class SocketFront:
    """Real sockets for one guest; every method is called from the supervisor's task."""

    def __init__(
        self,
        nursery: trio.Nursery,
        doorbell: Doorbell,
        address_map: AddressMap | None = None,
    ) -> None:
        self._nursery = nursery
        self._doorbell = doorbell
        self._map = address_map or {}
        self._bound: dict[int, socket.socket] = {}
        self._streams: dict[int, _Stream] = {}
        self._listeners: dict[int, _Listener] = {}
        self._datagrams: dict[int, _Datagram] = {}
        self._next_accepted = protocol.FIRST_ACCEPTED_SOCK
        # Connections the guest held before this front existed (a backup gone
        # live): they have no real socket here, and each reads as reset once.
        # id -> whether the guest has been told.
        self._inherited: dict[int, bool] = {}
        self.input_bytes = 0  # client bytes handed to the guest, for log-size ratios
        # Streams whose input is wanted (open, buffer not full), by fd.
        self._poller = select.epoll()
        self._polled: dict[int, _Stream] = {}
        spinner.watch(self._poller.fileno())
        self._rejections = RejectionLog("connection_rejected", port="service")

    def inherit(self, held: dict[int, bool], next_accepted: int) -> None:
        """Take over a guest that already holds connections (a backup going live).

        ``held`` maps each connection id the guest holds to whether it already
        knows the connection was reset. Their real sockets died with the old
        primary: each reads as reset at the guest's next wait on it (a logged
        input, like any other), and outputs to them go nowhere. Accepted
        connections are numbered from ``next_accepted`` on, so that an id never
        names two connections in one guest's life.
        """
        self._inherited.update(held)
        self._next_accepted = max(self._next_accepted, next_accepted)

    # -- set-up exits ------------------------------------------------------

    def bind(self, sock_id: int, family: int, kind: int, addr: tuple[Any, ...]) -> tuple[int, Any]:
        """Create and bind the real socket; answer (errno, the address the guest sees)."""
        real_addr = addr
        mapped = self._map.get(addr[1]) if addr[1] else None
        if mapped is not None:
            real_addr = (mapped[0], mapped[1], *addr[2:])
        sock = socket.socket(family, kind)
        try:
            sock.setblocking(False)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(real_addr)
        except OSError as exc:
            sock.close()
            log.warning("bind_failed", address=real_addr, error=exc.strerror)
            return exc.errno or errno.EINVAL, None
        seen = addr if mapped is not None else sock.getsockname()
        if kind == socket.SOCK_DGRAM:
            datagram = _Datagram(sock)
            self._datagrams[sock_id] = datagram
            self._nursery.start_soon(self._receive_datagrams, datagram)
        else:
            self._bound[sock_id] = sock
        log.info("socket_bound", sock=sock_id, guest_address=seen, address=sock.getsockname())
        return 0, tuple(seen)

    def listen(self, sock_id: int, backlog: int) -> int:
        sock = self._bound.pop(sock_id, None)
        if sock is None:
            return errno.EINVAL
        try:
            sock.listen(max(backlog, 128))
        except OSError as exc:
            sock.close()
            return exc.errno or errno.EINVAL
        listener = _Listener(sock)
        self._listeners[sock_id] = listener
        self._nursery.start_soon(self._accept_loop, sock_id, listener)
        log.info("listening", sock=sock_id, address=sock.getsockname())
        return 0

    async def connect(
        self, sock_id: int, family: int, addr: tuple[Any, ...], timeout_ns: int
    ) -> tuple[int, Any, Any]:
        sock = self._bound.pop(sock_id, None) or socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        timeout = _CONNECT_TIMEOUT_S if timeout_ns < 0 else timeout_ns / 1e9
        try:
            with trio.fail_after(timeout):
                code = sock.connect_ex(addr)
                if code == errno.EINPROGRESS:
                    await trio.lowlevel.wait_writable(sock)
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except trio.TooSlowError:
            code = errno.ETIMEDOUT
        if code:
            sock.close()
            return code, None, None
        self._add_stream(sock_id, sock)
        return 0, sock.getsockname(), sock.getpeername()

    # -- outputs -----------------------------------------------------------

    def apply(self, message: tuple[Any, ...]) -> None:
        """Put one guest output on the network."""
        op = message[0]
        if op == protocol.OP_SEND:
            self.send(message[1], message[2])
        elif op == protocol.OP_SENDTO:
            self.sendto(message[1], message[2], message[3])
        elif op == protocol.OP_SHUTDOWN:
            self.shutdown(message[1], message[2])
        elif op == protocol.OP_CLOSE:
            self.close(message[1])
        else:
            raise ValueError(f"a {protocol.OP_NAMES.get(op, op)} output in socket mode")

    def send(self, sock_id: int, data: bytes) -> None:
        stream = self._streams.get(sock_id)
        if stream is None or stream.reset:
            return
        if not stream.outbox:
            if _trace.stamp is not None:
                _trace.stamp(_trace.CLIENT_WRITE, -1)
            try:
                sent = stream.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._fail(stream, exc.errno or errno.EPIPE)
                return
            stream.written += sent
            if sent == len(data):
                return
            data = data[sent:]
        stream.outbox.append(data)
        stream.to_write.ring()

    def sendto(self, sock_id: int, data: bytes, addr: Any) -> None:
        datagram = self._datagrams.get(sock_id)
        if datagram is None:
            return
        try:
            datagram.sock.sendto(data, tuple(addr))
        except OSError as exc:
            log.info("datagram_dropped", sock=sock_id, error=exc.strerror)

    def shutdown(self, sock_id: int, how: int) -> None:
        stream = self._streams.get(sock_id)
        if stream is None or how == socket.SHUT_RD:
            return
        stream.shutdown_after_flush = how
        stream.to_write.ring()

    def close(self, sock_id: int) -> None:
        if self._inherited.pop(sock_id, None) is not None:
            return
        stream = self._streams.get(sock_id)
        if stream is not None:
            if stream.reset:
                self._drop(sock_id)
            else:
                stream.closing = True
                stream.to_write.ring()
            return
        for table in (self._listeners, self._datagrams):
            entry = table.pop(sock_id, None)
            if entry is not None:
                entry.cancel.cancel()
                entry.sock.close()
                for conn_id, _, _ in getattr(entry, "pending", ()):
                    self._drop(conn_id)
                return
        sock = self._bound.pop(sock_id, None)
        if sock is not None:
            sock.close()

    # -- reading input -------------------------------------------------------

    @property
    def input_fd(self) -> int:
        """Readable whenever some stream has input (or news: EOF, an error) to read."""
        return self._poller.fileno()

    def pump(self) -> None:
        """Read what the kernel holds for every stream that has something, without blocking."""
        for fd, _ in self._poller.poll(0):
            stream = self._polled.get(fd)
            if stream is not None:
                self._read(stream)

    def _read(self, stream: _Stream) -> None:
        try:
            data = stream.sock.recv(_INPUT_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(stream, exc.errno or errno.ECONNRESET)
            return
        if not data:
            stream.eof = True
            self._unpoll(stream)
            return
        if _trace.stamp is not None:
            _trace.stamp(_trace.SUP_READ, -1)
        stream.inbox += data
        if len(stream.inbox) >= _INPUT_LIMIT:
            self._unpoll(stream)  # the guest pushes back on its client through TCP

    def _poll(self, stream: _Stream) -> None:
        fd = stream.sock.fileno()
        self._poller.register(fd, select.EPOLLIN)
        self._polled[fd] = stream
        stream.polled = True

    def _unpoll(self, stream: _Stream) -> None:
        if stream.polled:
            stream.polled = False
            fd = stream.sock.fileno()
            self._polled.pop(fd, None)
            with contextlib.suppress(OSError, ValueError):
                self._poller.unregister(fd)

    # -- handing input to the guest ----------------------------------------

    def ready(self, readable: list[int], writable: list[int]) -> bool:
        """Would a wait for these sockets end now?"""
        for sid in readable:
            stream = self._streams.get(sid)
            if stream is not None:
                if stream.inbox or (stream.eof and not stream.eof_reported):
                    return True
                if stream.reset and not stream.reset_reported:
                    return True
                continue
            listener = self._listeners.get(sid)
            if listener is not None and listener.pending:
                return True
            datagram = self._datagrams.get(sid)
            if datagram is not None and datagram.queue:
                return True
            if self._inherited.get(sid) is False:
                return True
        for sid in writable:
            stream = self._streams.get(sid)
            if stream is None:
                if self._inherited.get(sid, False) is False:
                    return True
                continue
            if stream.written > stream.written_reported or stream.reset:
                return True
        return False

    def collect(
        self, readable: list[int], writable: list[int], pressured: list[int]
    ) -> tuple[bytes, bytes, list[Any]]:
        """Take every ready event for these sockets, in a deterministic order:
        a wait result, stream input packed apart (see ``protocol.pack_data``)."""
        chunks: list[tuple[int, bytes]] = []
        events: list[Any] = []
        for sid in readable:
            stream = self._streams.get(sid)
            if stream is not None:
                self._collect_stream_input(sid, stream, chunks, events)
                continue
            listener = self._listeners.get(sid)
            if listener is not None:
                while listener.pending:
                    conn_id, peer, local = listener.pending.popleft()
                    events.append((protocol.EV_ACCEPT, sid, conn_id, peer, local))
                continue
            datagram = self._datagrams.get(sid)
            if datagram is not None:
                while datagram.queue:
                    data, addr = datagram.queue.popleft()
                    events.append((protocol.EV_DGRAM, sid, data, addr))
                    self.input_bytes += len(data)
                continue
            self._collect_inherited(sid, events)
        for sid in (*writable, *pressured):
            stream = self._streams.get(sid)
            if stream is None:
                self._collect_inherited(sid, events)
                continue
            if stream.written > stream.written_reported:
                stream.written_reported = stream.written
                events.append((protocol.EV_SENT, sid, stream.written))
            if stream.reset and not stream.reset_reported:
                stream.reset_reported = True
                events.append((protocol.EV_RESET, sid, stream.reset))
        index, blob = protocol.pack_data(chunks)
        return index, blob, events

    def _collect_inherited(self, sid: int, events: list[Any]) -> None:
        if self._inherited.get(sid) is False:
            self._inherited[sid] = True
            events.append((protocol.EV_RESET, sid, errno.ECONNRESET))

    def _collect_stream_input(
        self, sid: int, stream: _Stream, chunks: list[tuple[int, bytes]], events: list[Any]
    ) -> None:
        if stream.inbox:
            chunk = bytes(stream.inbox[: protocol.RECV_CHUNK])
            del stream.inbox[: protocol.RECV_CHUNK]
            chunks.append((sid, chunk))
            self.input_bytes += len(chunk)
            if not stream.polled and not (stream.eof or stream.reset):
                self._poll(stream)  # there is room again
        elif stream.reset and not stream.reset_reported:
            stream.reset_reported = True
            events.append((protocol.EV_RESET, sid, stream.reset))
        elif stream.eof and not stream.eof_reported:
            stream.eof_reported = True
            events.append((protocol.EV_EOF, sid))

    # -- tasks -------------------------------------------------------------

    def _add_stream(self, sock_id: int, sock: socket.socket) -> _Stream:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = _Stream(sock)
        self._streams[sock_id] = stream
        self._poll(stream)
        self._nursery.start_soon(self._write_loop, sock_id, stream)
        return stream

    async def _accept_loop(self, sock_id: int, listener: _Listener) -> None:
        with listener.cancel:
            while True:
                await trio.lowlevel.wait_readable(listener.sock)
                while True:
                    try:
                        conn, peer = listener.sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        # Out of descriptors or memory: try again shortly, not at once.
                        self._rejections("?", f"accept failed: {exc.strerror}", sock=sock_id)
                        await trio.sleep(_ACCEPT_PAUSE_S)
                        break
                    if descriptors_left(conn.fileno()) < RESERVED_DESCRIPTORS:
                        # Keep what the replica itself needs (the arbiter, the log channel).
                        self._rejections(peer_name(conn), "too few descriptors left", sock=sock_id)
                        conn.close()
                        continue
                    conn_id = self._next_accepted
                    self._next_accepted += 1
                    self._add_stream(conn_id, conn)
                    listener.pending.append((conn_id, peer, conn.getsockname()))
                    log.debug("connection_accepted", sock=sock_id, conn=conn_id, peer=peer)
                self._doorbell.ring()

    async def _write_loop(self, sock_id: int, stream: _Stream) -> None:
        with trio.CancelScope() as scope:
            stream.scopes.append(scope)
            while True:
                while stream.outbox:
                    chunk = stream.outbox[0]
                    await trio.lowlevel.wait_writable(stream.sock)
                    try:
                        sent = stream.sock.send(chunk)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        self._fail(stream, exc.errno or errno.EPIPE)
                        return
                    stream.written += sent
                    if sent == len(chunk):
                        stream.outbox.popleft()
                    else:
                        stream.outbox[0] = chunk[sent:]
                    self._doorbell.ring()
                if stream.shutdown_after_flush is not None:
                    self._shutdown_real(stream, stream.shutdown_after_flush)
                    stream.shutdown_after_flush = None
                if stream.closing:
                    self._drop(sock_id)
                    return
                await stream.to_write.wait()

    def _shutdown_real(self, stream: _Stream, how: int) -> None:
        with contextlib.suppress(OSError):  # the peer may be gone already
            stream.sock.shutdown(how)

    async def _receive_datagrams(self, datagram: _Datagram) -> None:
        with datagram.cancel:
            while True:
                await trio.lowlevel.wait_readable(datagram.sock)
                while True:
                    try:
                        data, addr = datagram.sock.recvfrom(65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    if len(datagram.queue) < _DATAGRAM_QUEUE:
                        datagram.queue.append((data, addr))
                self._doorbell.ring()

    def _fail(self, stream: _Stream, code: int) -> None:
        if not stream.reset:
            stream.reset = code
            stream.outbox.clear()
            self._unpoll(stream)
            self._doorbell.ring()

    def _drop(self, sock_id: int) -> None:
        stream = self._streams.pop(sock_id, None)
        if stream is not None:
            self._unpoll(stream)
            for scope in stream.scopes:
                scope.cancel()
            stream.sock.close()

    def status(self) -> dict[str, Any]:
        """What ``ftproxy status`` shows of this front."""
        return {"mode": "socket", "connections": len(self._streams)}

    def close_all(self) -> None:
        """Close every real socket (the guest ended)."""
        for sid in list(self._streams):
            self._drop(sid)
        for table in (self._listeners, self._datagrams):
            for entry in table.values():
                entry.cancel.cancel()
                entry.sock.close()
            table.clear()
        for sock in self._bound.values():
            sock.close()
        self._bound.clear()
        spinner.unwatch(self._poller.fileno())
        self._poller.close()


async def resolve_name(function: str, args: tuple[Any, ...]) -> tuple[int, Any]:
    """Answer a RESOLVE exit with the host's resolver: (error code, result)."""
    try:
        if function == "getaddrinfo":
            infos = await trio.to_thread.run_sync(socket.getaddrinfo, *args)
            return 0, [(int(f), int(t), pr, canon, addr) for f, t, pr, canon, addr in infos]
        if function == "gethostbyaddr":
            name, aliases, addrs = await trio.to_thread.run_sync(socket.gethostbyaddr, *args)
            return 0, (name, aliases, addrs)
    except socket.gaierror as exc:
        return exc.errno or socket.EAI_FAIL, str(exc.strerror)
    except OSError as exc:
        return exc.errno or 1, str(exc.strerror)
    return socket.EAI_FAIL, f"unknown lookup {function}"


def parse_address_map(items: list[str]) -> AddressMap:
    """``GUESTPORT=HOST:PORT`` items, as ``--map`` takes them."""
    mapping: AddressMap = {}
    for item in items:
        guest, _, real = item.partition("=")
        host, _, port = real.rpartition(":")
        if not guest.isdigit() or not port.isdigit() or not host:
            raise ValueError(
                f"--map {item!r}: expected GUESTPORT=HOST:PORT, e.g. 6380=127.0.0.1:16380"
            )
        mapping[int(guest)] = (host.strip("[]"), int(port))
    return mapping
