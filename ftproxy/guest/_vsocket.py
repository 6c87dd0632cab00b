"""Virtual sockets: the guest's ``socket.socket``, ``socketpair`` and name lookups.

A network socket lives in two halves: this object holds what the program can
see (buffers, state, options); the supervisor holds the real socket. Input
reaches the buffers only through exit replies, outputs leave as messages, so
the program's view is a pure function of the log. ``socketpair`` ends (asyncio's
self-pipe) are connected to each other inside the guest and never exit.
"""

from __future__ import annotations

import errno as _errno
import ipaddress
import os
import socket as _socket
from collections import deque
from collections.abc import Sequence
from typing import Any

from ftproxy.guest import protocol
from ftproxy.guest._runtime import Runtime, UnsupportedInGuest

_real_socket_class = _socket.socket
_STREAM = _socket.SOCK_STREAM
# Plain ints: a flag test against socket.MsgFlag runs enum.Flag's Python operators,
# which cost a stream recv more than the rest of it (profiled in the guest).
_MSG_PEEK = int(_socket.MSG_PEEK)
_MSG_DONTWAIT = int(getattr(_socket, "MSG_DONTWAIT", 0))
_DGRAM = _socket.SOCK_DGRAM
_TYPE_FLAGS = getattr(_socket, "SOCK_NONBLOCK", 0) | getattr(_socket, "SOCK_CLOEXEC", 0)
_INET_FAMILIES = (_socket.AF_INET, _socket.AF_INET6)
_INHERITABLE = (-1, -1)  # where a socket keeps its inheritable flag among its options
_SENDFILE_BLOCK = 64 * 1024

_runtime: Runtime


def bind_runtime(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def _recv_flags(flags: int) -> tuple[bool, bool]:
    """``recv``'s flags as (peek, dontwait); any other flag is refused by name."""
    flags = int(flags)  # a socket.MsgFlag would run enum.Flag's Python operators
    if flags & ~(_MSG_PEEK | _MSG_DONTWAIT):
        raise UnsupportedInGuest(
            f"socket.recv(flags={flags})",
            "only MSG_PEEK and MSG_DONTWAIT are supported",
            "call recv without that flag (for MSG_WAITALL, recv in a loop)",
        )
    return bool(flags & _MSG_PEEK), bool(flags & _MSG_DONTWAIT)


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class VirtualSocket:
    """A socket whose every effect goes through the guest's exits."""

    _timeout: float | None

    def __init__(
        self,
        family: int = -1,
        type: int = -1,
        proto: int = -1,
        fileno: int | None = None,
    ) -> None:
        if fileno is not None:
            raise UnsupportedInGuest(
                "socket.socket(fileno=...)",
                "wrapping a file descriptor the host opened would let the program read "
                "input that is not in the log",
            )
        family = _socket.AF_INET if family == -1 else family
        type = _STREAM if type == -1 else type
        nonblocking = bool(type & getattr(_socket, "SOCK_NONBLOCK", 0))
        type &= ~_TYPE_FLAGS
        if family not in _INET_FAMILIES:
            raise UnsupportedInGuest(
                f"socket.socket(family={_socket.AddressFamily(family).name})",
                "only AF_INET and AF_INET6 sockets (and socketpair) are virtualized",
                "serve on a TCP or UDP address (uvicorn: --host and --port, not --uds)",
            )
        if type not in (_STREAM, _DGRAM):
            raise UnsupportedInGuest(
                f"socket.socket(type={type})", "only SOCK_STREAM and SOCK_DGRAM are virtualized"
            )
        if proto in (-1, 0):
            proto = _socket.IPPROTO_TCP if type == _STREAM else _socket.IPPROTO_UDP
        self._setup(family, type, proto)
        self.wire_id = self._fd
        if nonblocking:
            self._timeout = 0.0

    def _setup(self, family: int, type: int, proto: int) -> None:
        _runtime.tick()
        # Plain ints: enum members do not cross the guest pipe.
        self._family = int(family)
        self._type = int(type)
        self._proto = int(proto)
        self._fd = _runtime.allocate_fd()
        self.wire_id = self._fd
        _runtime.by_fd[self._fd] = self
        self._timeout = _socket.getdefaulttimeout()
        self._closed = False
        self._closed_by_user = False
        self._io_refs = 0
        self._local: Any = None
        self._peer: Any = None
        self._state = "new"  # new, bound, listening, connected, closed
        self._rbuf = bytearray()
        self._eof = False
        self._reset = 0
        self._accepts: deque[tuple[int, Any, Any]] = deque()
        self._dgrams: deque[tuple[bytes, Any]] = deque()
        self._sent = 0
        self._written = 0
        self._shut_wr = False
        self._shut_rd = False
        self._pair: VirtualSocket | None = None
        self._options: dict[tuple[int, int], Any] = {}

    @classmethod
    def _make(cls, family: int, type: int, proto: int) -> VirtualSocket:
        sock = cls.__new__(cls)
        sock._setup(family, type, proto)
        return sock

    # -- identity ----------------------------------------------------------

    @property
    def family(self) -> _socket.AddressFamily:
        return _socket.AddressFamily(self._family)

    @property
    def type(self) -> _socket.SocketKind:
        return _socket.SocketKind(self._type)

    @property
    def proto(self) -> int:
        return self._proto

    def fileno(self) -> int:
        return -1 if self._closed else self._fd

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._state
        return (
            f"<ftproxy virtual socket fd={self._fd}, family={self.family.name}, "
            f"type={self.type.name}, {state}, laddr={self._local}, raddr={self._peer}>"
        )

    def __enter__(self) -> VirtualSocket:
        return self

    def __exit__(self, *args: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self._close_now()
        except Exception:
            pass

    # -- blocking modes ----------------------------------------------------

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def settimeout(self, value: float | None) -> None:
        if value is not None and value < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = None if value is None else float(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def _block_until(self, ready: Any, reading: bool, dontwait: bool = False) -> None:
        """Wait as the socket's mode says (or not at all: ``dontwait``) until ``ready()``
        holds."""
        if ready():
            return
        if self._timeout == 0.0 or dontwait:
            raise BlockingIOError(_errno.EAGAIN, "Resource temporarily unavailable")
        deadline = None
        if self._timeout is not None:
            deadline = _runtime.mono_ns() + int(self._timeout * 1e9)
        while not ready():
            if deadline is not None and _runtime.mono_ns() >= deadline:
                raise TimeoutError("timed out")
            if reading:
                _runtime.wait(deadline, [self], [])
            else:
                _runtime.wait(deadline, [], [self])

    # -- what the runtime asks ---------------------------------------------

    def _wants_input(self) -> bool:
        if self._closed or self._pair is not None:
            return False
        if self._state == "listening":
            return not self._accepts
        if self._type == _DGRAM:
            return self._state == "bound" and not self._dgrams
        return self._state == "connected" and not (self._rbuf or self._eof or self._reset)

    def _write_blocked(self) -> bool:
        return (
            self._state == "connected"
            and self._pair is None
            and not self._reset
            and self._sent - self._written >= protocol.SEND_BUFFER
        )

    def _on_event(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == protocol.EV_DATA:
            self._rbuf += event[2]
        elif kind == protocol.EV_ACCEPT:
            self._accepts.append((event[2], event[3], event[4]))
        elif kind == protocol.EV_SENT:
            self._written = event[2]
            if self._sent - self._written < protocol.SEND_BUFFER // 2:
                _runtime.pressured.discard(self.wire_id)
        elif kind == protocol.EV_EOF:
            self._eof = True
        elif kind == protocol.EV_RESET:
            self._reset = event[2]
            _runtime.pressured.discard(self.wire_id)
        elif kind == protocol.EV_DGRAM:
            self._dgrams.append((event[2], event[3]))

    def _readable_now(self) -> bool:
        if self._state == "listening":
            return bool(self._accepts)
        if self._type == _DGRAM:
            return bool(self._dgrams)
        return bool(self._rbuf or self._eof or self._reset or self._shut_rd or self._closed)

    def _writable_now(self) -> bool:
        if self._type == _DGRAM:
            return True
        if self._state != "connected":
            return False
        if self._reset or self._shut_wr:
            return True  # the send fails at once, which is what a writer must learn
        if self._pair is not None:
            return self._pair._closed or len(self._pair._rbuf) < protocol.SEND_BUFFER
        return self._sent - self._written < protocol.SEND_BUFFER

    def _error_now(self) -> bool:
        return bool(self._reset)

    # -- addresses ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise _os_error(_errno.EBADF)

    def _normalize(self, address: Any) -> Any:
        """Turn a user's address into the tuple form the wire carries."""
        if not isinstance(address, tuple) or len(address) < 2:
            raise TypeError(f"{self.family.name} address must be a tuple, not {address!r}")
        host, port = address[0], address[1]
        if isinstance(host, bytes):
            host = host.decode("ascii")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise OverflowError("port must be 0-65535.")
        if host == "" or host == "<broadcast>":
            host = "0.0.0.0" if self._family == _socket.AF_INET else "::"
        literal = _literal_address(host, self._family)
        if literal is None:
            infos = getaddrinfo(host, port, self._family, self._type)
            literal = infos[0][4][0]
        if self._family == _socket.AF_INET6:
            flowinfo = address[2] if len(address) > 2 else 0
            scope = address[3] if len(address) > 3 else 0
            return (literal, port, flowinfo, scope)
        return (literal, port)

    def getsockname(self) -> Any:
        _runtime.tick()
        self._check_open()
        if self._local is None:
            return ("0.0.0.0", 0) if self._family == _socket.AF_INET else ("::", 0, 0, 0)
        return self._local

    def getpeername(self) -> Any:
        _runtime.tick()
        self._check_open()
        if self._peer is None or self._state != "connected":
            raise _os_error(_errno.ENOTCONN)
        return self._peer

    # -- set-up ------------------------------------------------------------

    def bind(self, address: Any) -> None:
        _runtime.tick()
        self._check_open()
        if self._state != "new":
            raise _os_error(_errno.EINVAL)
        addr = self._normalize(address)
        code, bound = _runtime.request(
            protocol.KIND_BIND, (self.wire_id, self._family, self._type, addr)
        )
        if code:
            raise _os_error(code)
        self._local = bound
        self._state = "bound"
        _runtime.sockets[self.wire_id] = self

    def listen(self, backlog: int = 128) -> None:
        _runtime.tick()
        self._check_open()
        if self._type != _STREAM:
            raise _os_error(_errno.EOPNOTSUPP)
        if self._state == "listening":
            return
        if self._state == "new":
            self.bind(("", 0))
        code = _runtime.request(protocol.KIND_LISTEN, (self.wire_id, backlog))
        if code:
            raise _os_error(code)
        self._state = "listening"

    def accept(self) -> tuple[VirtualSocket, Any]:
        _runtime.tick()
        self._check_open()
        if self._state != "listening":
            raise _os_error(_errno.EINVAL)
        self._block_until(self._readable_now, reading=True)
        conn_id, peer, local = self._accepts.popleft()
        conn = VirtualSocket._make(self._family, self._type, self._proto)
        conn.wire_id = conn_id
        conn._state = "connected"
        conn._peer = peer
        conn._local = local
        if _socket.getdefaulttimeout() is None and self._timeout is not None:
            conn._timeout = None
        _runtime.sockets[conn_id] = conn
        return conn, peer

    def _accept(self) -> tuple[int, Any]:
        raise UnsupportedInGuest(
            "socket._accept", "the raw accept returns a host fd; use accept() instead"
        )

    def connect(self, address: Any) -> None:
        code = self.connect_ex(address)
        if code:
            raise _os_error(code)

    def connect_ex(self, address: Any) -> int:
        _runtime.tick()
        self._check_open()
        addr = self._normalize(address)
        if self._type == _DGRAM:
            if self._state == "new":
                self.bind(("", 0))
            self._peer = addr
            self._state = "bound"
            return 0
        if self._state == "connected":
            return _errno.EISCONN
        if self._state not in ("new", "bound"):
            return _errno.EINVAL
        timeout = -1 if self._timeout is None or self._timeout == 0 else int(self._timeout * 1e9)
        code, local, peer = _runtime.request(
            protocol.KIND_CONNECT, (self.wire_id, self._family, addr, timeout)
        )
        if code:
            return int(code)
        self._local = local
        self._peer = peer
        self._state = "connected"
        _runtime.sockets[self.wire_id] = self
        return 0

    # -- reading -----------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        _runtime.tick()
        return self._recv(bufsize, flags)

    def _recv(self, bufsize: int, flags: int) -> bytes:
        self._check_open()
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        if self._type == _DGRAM:
            return self._recvfrom(bufsize, flags)[0]
        if self._state != "connected":
            raise _os_error(_errno.ENOTCONN)
        peek, dontwait = _recv_flags(flags) if flags else (False, False)
        self._block_until(self._readable_now, reading=True, dontwait=dontwait)
        if self._rbuf:
            data = bytes(self._rbuf[:bufsize])
            if not peek:
                del self._rbuf[:bufsize]
            return data
        if self._reset:
            raise _os_error(self._reset)
        return b""

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        _runtime.tick()
        view = memoryview(buffer).cast("B")
        data = self._recv(nbytes or len(view), flags)
        view[: len(data)] = data
        return len(data)

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        _runtime.tick()
        if self._type == _STREAM:
            return self._recv(bufsize, flags), None
        return self._recvfrom(bufsize, flags)

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        _runtime.tick()
        view = memoryview(buffer).cast("B")
        if self._type == _STREAM:
            data, addr = self._recv(nbytes or len(view), flags), None
        else:
            data, addr = self._recvfrom(nbytes or len(view), flags)
        view[: len(data)] = data
        return len(data), addr

    def _recvfrom(self, bufsize: int, flags: int) -> tuple[bytes, Any]:
        self._check_open()
        if self._state == "new":
            raise _os_error(_errno.EINVAL)
        peek, dontwait = _recv_flags(flags) if flags else (False, False)
        self._block_until(self._readable_now, reading=True, dontwait=dontwait)
        if peek:
            data, addr = self._dgrams[0]
        else:
            data, addr = self._dgrams.popleft()
        return data[:bufsize], addr

    # -- writing -----------------------------------------------------------

    def send(self, data: Any, flags: int = 0) -> int:
        _runtime.tick()
        return self._send(data)

    def _send(self, data: Any) -> int:
        self._check_open()
        if self._type == _DGRAM:
            if self._peer is None:
                raise _os_error(_errno.EDESTADDRREQ)
            return self._sendto(data, self._peer)
        if self._state != "connected":
            raise _os_error(_errno.ENOTCONN if self._state != "listening" else _errno.EPIPE)
        self._block_until(self._writable_now, reading=False)
        if self._reset:
            raise _os_error(_errno.EPIPE if self._reset == _errno.EPIPE else self._reset)
        if self._shut_wr:
            raise _os_error(_errno.EPIPE)
        payload = bytes(data)
        pair = self._pair
        if pair is not None:
            if pair._closed:
                raise _os_error(_errno.EPIPE)
            room = protocol.SEND_BUFFER - len(pair._rbuf)
            chunk = payload[:room]
            pair._rbuf += chunk
            return len(chunk)
        room = protocol.SEND_BUFFER - (self._sent - self._written)
        chunk = payload if len(payload) <= room else payload[:room]
        if chunk:
            self._sent += len(chunk)
            _runtime.socket_output((protocol.OP_SEND, self.wire_id, chunk), chunk)
            if self._sent - self._written >= protocol.SEND_BUFFER // 2:
                _runtime.pressured.add(self.wire_id)
        return len(chunk)

    def sendall(self, data: Any, flags: int = 0) -> None:
        _runtime.tick()
        view = memoryview(data).cast("B")
        deadline = None
        if self._timeout:
            deadline = _runtime.mono_ns() + int(self._timeout * 1e9)
        while view:
            if not self._writable_now() and self._timeout != 0.0:
                if deadline is not None and _runtime.mono_ns() >= deadline:
                    raise TimeoutError("timed out")
                _runtime.wait(deadline, [], [self])
                continue
            sent = self._send(view)
            view = view[sent:]

    def sendto(self, data: Any, flags_or_addr: Any, addr: Any = None) -> int:
        _runtime.tick()
        address = flags_or_addr if addr is None else addr
        if self._type == _STREAM:
            return self._send(data)
        return self._sendto(data, self._normalize(address))

    def _sendto(self, data: Any, address: Any) -> int:
        if self._state == "new":
            self.bind(("", 0))
        payload = bytes(data)
        _runtime.socket_output((protocol.OP_SENDTO, self.wire_id, payload, address), payload)
        return len(payload)

    # -- ending ------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        _runtime.tick()
        self._check_open()
        if self._state != "connected":
            raise _os_error(_errno.ENOTCONN)
        if how in (_socket.SHUT_RD, _socket.SHUT_RDWR):
            self._shut_rd = True
        if how in (_socket.SHUT_WR, _socket.SHUT_RDWR) and not self._shut_wr:
            self._shut_wr = True
            if self._pair is not None:
                self._pair._eof = True
                return
        if self._pair is None:
            _runtime.socket_output((protocol.OP_SHUTDOWN, self.wire_id, how))

    def close(self) -> None:
        _runtime.tick()
        self._closed_by_user = True
        if self._io_refs <= 0:
            self._close_now()

    def _decref_socketios(self) -> None:
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._closed_by_user and self._io_refs <= 0:
            self._close_now()

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        _runtime.by_fd.pop(self._fd, None)
        if self._pair is not None:
            self._pair._eof = True
            return
        # Connections queued for accept() that the program never took go with
        # their listener, as in a kernel (else their clients would wait forever).
        while self._accepts:
            _runtime.socket_output((protocol.OP_CLOSE, self._accepts.popleft()[0]))
        if _runtime.sockets.pop(self.wire_id, None) is not None:
            _runtime.pressured.discard(self.wire_id)
            _runtime.socket_output((protocol.OP_CLOSE, self.wire_id))

    def detach(self) -> int:
        raise UnsupportedInGuest(
            "socket.detach", "a virtual socket has no host file descriptor to hand over"
        )

    def dup(self) -> VirtualSocket:
        raise UnsupportedInGuest(
            "socket.dup", "duplicated descriptors would share state ftproxy cannot replay"
        )

    def get_inheritable(self) -> bool:
        return bool(self._options.get(_INHERITABLE, False))

    def set_inheritable(self, inheritable: bool) -> None:
        # Only a child process would see it, and starting one is refused (with
        # the fix: run one worker) where it happens.
        self._options[_INHERITABLE] = bool(inheritable)

    @property
    def timeout(self) -> float | None:
        return self._timeout

    # -- messages and files --------------------------------------------------

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Any = None) -> int:
        _runtime.tick()
        if list(ancdata):
            raise UnsupportedInGuest(
                "socket.sendmsg(ancdata=...)",
                "ancillary data (file descriptors, credentials) cannot be replayed",
                "send the data alone",
            )
        data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        if address is not None:
            return self._sendto(data, address)
        return self._send(data)

    def recvmsg(
        self, bufsize: int, ancbufsize: int = 0, flags: int = 0
    ) -> tuple[bytes, list[Any], int, Any]:
        _runtime.tick()
        if self._type == _DGRAM:
            data, address = self._recvfrom(bufsize, flags)
            return data, [], 0, address
        return self._recv(bufsize, flags), [], 0, None

    def recvmsg_into(
        self, buffers: Any, ancbufsize: int = 0, flags: int = 0
    ) -> tuple[int, list[Any], int, Any]:
        views = [memoryview(b).cast("B") for b in buffers]
        data, ancdata, msg_flags, address = self.recvmsg(sum(len(v) for v in views), 0, flags)
        offset = 0
        for view in views:
            take = data[offset : offset + len(view)]
            view[: len(take)] = take
            offset += len(take)
        return len(data), ancdata, msg_flags, address

    def sendmsg_afalg(self, *args: Any, **kwargs: Any) -> int:
        raise UnsupportedInGuest("socket.sendmsg_afalg", "AF_ALG sockets are not virtualized")

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """As the stdlib's: the file's bytes go out through send (a file is no device)."""
        _runtime.tick()
        if "b" not in getattr(file, "mode", "b"):
            raise ValueError("file should be opened in binary mode")
        if self._type != _STREAM:
            raise ValueError("only SOCK_STREAM type sockets are supported")
        if count is not None and (not isinstance(count, int) or count <= 0):
            raise ValueError(f"count must be a positive integer (got {count!r})")
        if self._timeout == 0.0:
            raise ValueError("non-blocking sockets are not supported")
        file.seek(offset)  # from offset, wherever the file stands, as os.sendfile reads
        total = 0
        while count is None or total < count:
            chunk = file.read(min(_SENDFILE_BLOCK, count - total) if count else _SENDFILE_BLOCK)
            if not chunk:
                break
            self.sendall(chunk)
            total += len(chunk)
        if total and hasattr(file, "seek"):
            file.seek(offset + total)
        return total

    def setsockopt(self, level: int, optname: int, value: Any, optlen: Any = None) -> None:
        _runtime.tick()
        self._check_open()
        self._options[(level, optname)] = value

    def getsockopt(self, level: int, optname: int, buflen: int | None = None) -> Any:
        _runtime.tick()
        self._check_open()
        if level == _socket.SOL_SOCKET and optname == _socket.SO_ERROR:
            return self._reset
        if level == _socket.SOL_SOCKET and optname == _socket.SO_TYPE:
            return self._type
        if level == _socket.SOL_SOCKET and optname == _socket.SO_SNDBUF:
            return protocol.SEND_BUFFER
        value = self._options.get((level, optname), 0)
        if buflen is not None:
            return value if isinstance(value, bytes) else bytes(buflen)
        return value

    def makefile(self, mode: str = "r", buffering: int | None = None, **kwargs: Any) -> Any:
        _runtime.tick()
        # The stdlib's makefile needs only recv_into, send and _io_refs of its socket.
        makefile: Any = _real_socket_class.makefile
        return makefile(self, mode, buffering, **kwargs)


# -- os functions given a virtual socket's descriptor -------------------------

_real_os = {
    name: getattr(os, name)
    for name in ("close", "sendfile", "set_inheritable", "get_inheritable")
    if hasattr(os, name)
}
_real_os_read = os.read
_real_os_write = os.write


def os_read(fd: int, n: int) -> bytes:
    sock = _runtime.by_fd.get(fd)
    return _real_os_read(fd, n) if sock is None else bytes(sock.recv(n))


def os_write(fd: int, data: Any) -> int:
    sock = _runtime.by_fd.get(fd)
    return _real_os_write(fd, data) if sock is None else int(sock.send(data))


def os_close(fd: int) -> None:
    sock = _runtime.by_fd.get(fd)
    if sock is None:
        _real_os["close"](fd)
    else:
        sock.close()


def os_set_inheritable(fd: int, inheritable: bool) -> None:
    sock = _runtime.by_fd.get(fd)
    if sock is None:
        _real_os["set_inheritable"](fd, inheritable)
    else:
        sock.set_inheritable(inheritable)


def os_get_inheritable(fd: int) -> bool:
    sock = _runtime.by_fd.get(fd)
    return bool(_real_os["get_inheritable"](fd) if sock is None else sock.get_inheritable())


def os_sendfile(out_fd: int, in_fd: int, offset: int | None, count: int, *args: Any) -> int:
    """``os.sendfile`` to a virtual socket: read the file, send what the socket takes."""
    sock = _runtime.by_fd.get(out_fd)
    if _runtime.by_fd.get(in_fd) is not None:
        raise UnsupportedInGuest(
            "os.sendfile from a socket", "only a file can be its source", "recv, then send"
        )
    if sock is None:
        return int(_real_os["sendfile"](out_fd, in_fd, offset, count, *args))
    if args:
        raise UnsupportedInGuest("os.sendfile(headers, trailers, flags)", "they are BSD's")
    data = os.pread(in_fd, count, offset) if offset is not None else _real_os_read(in_fd, count)
    if not data:
        return 0
    try:
        sent: int = sock.send(data)
    except BlockingIOError:
        if offset is None:
            os.lseek(in_fd, -len(data), os.SEEK_CUR)
        raise
    if offset is None and sent < len(data):
        os.lseek(in_fd, sent - len(data), os.SEEK_CUR)
    return sent


OS_REPLACEMENTS = {
    "read": os_read,
    "write": os_write,
    "close": os_close,
    "sendfile": os_sendfile,
    "set_inheritable": os_set_inheritable,
    "get_inheritable": os_get_inheritable,
}


def socketpair(
    family: int = _socket.AF_UNIX, type: int = _STREAM, proto: int = 0
) -> tuple[VirtualSocket, VirtualSocket]:
    """Two connected sockets that live entirely inside the guest."""
    type &= ~_TYPE_FLAGS
    if type != _STREAM:
        raise UnsupportedInGuest(
            f"socket.socketpair(type={type})", "only SOCK_STREAM pairs are virtualized"
        )
    a = VirtualSocket._make(family, type, proto)
    b = VirtualSocket._make(family, type, proto)
    for sock, other in ((a, b), (b, a)):
        sock._pair = other
        sock._state = "connected"
        sock._local = ""
        sock._peer = ""
    return a, b


# -- name lookups ------------------------------------------------------------


def _literal_address(host: str, family: int) -> str | None:
    """The canonical text of an IP literal of ``family`` (0: any), else None."""
    if host == "localhost":
        return "127.0.0.1" if family != _socket.AF_INET6 else "::1"
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if family == _socket.AF_INET and address.version != 4:
        return None
    if family == _socket.AF_INET6 and address.version != 6:
        return None
    return str(address)


def getaddrinfo(
    host: Any,
    port: Any,
    family: int = 0,
    type: int = 0,
    proto: int = 0,
    flags: int = 0,
) -> list[tuple[Any, ...]]:
    """Literal addresses and localhost are answered here; other names at an exit."""
    _runtime.tick()
    if isinstance(host, bytes):
        host = host.decode("idna")
    if isinstance(port, bytes):
        port = port.decode()
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if port is None:
        port = 0
    if host is None:
        passive = flags & _socket.AI_PASSIVE
        hosts = (
            [("0.0.0.0", _socket.AF_INET), ("::", _socket.AF_INET6)]
            if passive
            else [
                ("127.0.0.1", _socket.AF_INET),
                ("::1", _socket.AF_INET6),
            ]
        )
    else:
        literal = _literal_address(host, family)
        if literal is not None and isinstance(port, int):
            version = 6 if ":" in literal else 4
            hosts = [(literal, _socket.AF_INET6 if version == 6 else _socket.AF_INET)]
        else:
            hosts = []
    if hosts and isinstance(port, int):
        return _addrinfo_list(hosts, port, family, type, proto)
    code, result = _runtime.exit(
        protocol.KIND_RESOLVE, ("getaddrinfo", (host, port, family, type, proto, flags))
    )
    if code:
        raise _socket.gaierror(code, result)
    return [
        (_socket.AddressFamily(f), _socket.SocketKind(t), pr, canon, tuple(addr))
        for f, t, pr, canon, addr in result
    ]


def _addrinfo_list(
    hosts: Sequence[tuple[str, int]], port: int, family: int, type: int, proto: int
) -> list[tuple[Any, ...]]:
    kinds = [type] if type else [_STREAM, _DGRAM]
    out: list[tuple[Any, ...]] = []
    for host, fam in hosts:
        if family not in (0, fam):
            continue
        for kind in kinds:
            pr = proto or (_socket.IPPROTO_TCP if kind == _STREAM else _socket.IPPROTO_UDP)
            addr: tuple[Any, ...] = (host, port) if fam == _socket.AF_INET else (host, port, 0, 0)
            out.append((_socket.AddressFamily(fam), _socket.SocketKind(kind), pr, "", addr))
    if not out:
        raise _socket.gaierror(_socket.EAI_ADDRFAMILY, "Address family for hostname not supported")
    return out


def gethostbyname(host: str) -> str:
    return str(getaddrinfo(host, 0, _socket.AF_INET, _STREAM)[0][4][0])


def gethostbyaddr(address: str) -> tuple[str, list[str], list[str]]:
    _runtime.tick()
    code, result = _runtime.exit(protocol.KIND_RESOLVE, ("gethostbyaddr", (address,)))
    if code:
        raise _socket.herror(code, result)
    name, aliases, addresses = result
    return name, list(aliases), list(addresses)


def gethostbyname_ex(host: str) -> tuple[str, list[str], list[str]]:
    """From getaddrinfo (a device): the canonical name and the IPv4 addresses; no aliases."""
    infos = getaddrinfo(host, 0, _socket.AF_INET, _STREAM, 0, _socket.AI_CANONNAME)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    return (infos[0][3] or host), [], addresses


def getnameinfo(sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
    """From gethostbyaddr (a device); services from the host's table, as the real one."""
    host, port = str(sockaddr[0]), int(sockaddr[1])
    if flags & _socket.NI_NUMERICSERV:
        service = str(port)
    else:
        try:
            service = _socket.getservbyport(port, "udp" if flags & _socket.NI_DGRAM else "tcp")
        except OSError:
            service = str(port)
    if not flags & _socket.NI_NUMERICHOST:
        try:
            name = gethostbyaddr(host)[0]
        except OSError:
            if flags & _socket.NI_NAMEREQD:
                raise _socket.gaierror(_socket.EAI_NONAME, "Name or service not known") from None
        else:
            host = name.split(".", 1)[0] if flags & _socket.NI_NOFQDN else name
    return host, service


def socket_close(fd: int) -> None:
    """``socket.close(fd)``."""
    os_close(fd)


def socket_dup(fd: int) -> int:
    """``socket.dup(fd)``: a host descriptor's copy; a virtual socket's is refused."""
    if _runtime.by_fd.get(fd) is not None:
        raise UnsupportedInGuest(
            "socket.dup", "duplicated descriptors would share state ftproxy cannot replay"
        )
    return int(_real_socket_dup(fd))


_real_socket_dup = _socket.dup
_HOST_INTERFACES_WHY = "the host's network interfaces are not the same on both replicas"
REFUSED = {
    "if_nameindex": _HOST_INTERFACES_WHY,
    "if_nametoindex": _HOST_INTERFACES_WHY,
    "if_indextoname": _HOST_INTERFACES_WHY,
    "sethostname": "the guest's host name is pinned in the log",
}


_hostname = "localhost"


def set_hostname(name: str) -> None:
    global _hostname
    _hostname = name


def gethostname() -> str:
    _runtime.tick()
    return _hostname


def getfqdn(name: str = "") -> str:
    name = name.strip()
    if not name or name in ("0.0.0.0", "::"):
        name = gethostname()
    try:
        hostname, aliases, _ = gethostbyaddr(name)
    except OSError:
        return name
    for candidate in [hostname, *aliases]:
        if "." in candidate:
            return candidate
    return hostname
