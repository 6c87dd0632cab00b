"""Virtual readiness: ``select.select``, ``select.poll`` and every ``selectors`` class.

Readiness is answered from the virtual sockets' buffers. Only when nothing is
ready and the caller would block does the guest exit, naming the sockets it
waits on; the reply fills their buffers and the question is asked again.
"""

from __future__ import annotations

import math
import select as _select
import selectors
from collections.abc import Iterable
from typing import Any

from ftproxy.guest._runtime import Runtime, UnsupportedInGuest
from ftproxy.guest._vsocket import VirtualSocket

_runtime: Runtime


def bind_runtime(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def _fd_of(obj: Any) -> int:
    if isinstance(obj, int):
        return obj
    try:
        fd = obj.fileno()
    except AttributeError:
        raise TypeError(f"argument must be an int, or have a fileno() method: {obj!r}") from None
    if not isinstance(fd, int):
        raise TypeError("fileno() returned a non-integer")
    return fd


def _socket_for(fd: int, obj: Any) -> VirtualSocket:
    sock: VirtualSocket | None = _runtime.by_fd.get(fd)
    if sock is None or sock._closed:
        if fd < 0:
            raise ValueError(f"file descriptor cannot be a negative integer ({fd})")
        raise UnsupportedInGuest(
            f"waiting for readiness of fd {fd} ({obj!r})",
            "it is not a socket ftproxy virtualizes, so when it becomes ready depends on "
            "the host and cannot be replayed",
        )
    return sock


def _deadline(timeout: float | None) -> int | None:
    if timeout is None or timeout < 0:
        return None
    return _runtime.mono_ns() + math.ceil(timeout * 1e9)


def wait_ready(
    readers: list[VirtualSocket], writers: list[VirtualSocket], timeout: float | None
) -> tuple[list[VirtualSocket], list[VirtualSocket]]:
    """The one loop behind every readiness call: ready sockets, exiting only to wait."""
    _runtime.tick()
    deadline = _deadline(timeout)
    while True:
        ready_r = [s for s in readers if s._readable_now()]
        ready_w = [s for s in writers if s._writable_now()]
        if ready_r or ready_w or timeout == 0:
            return ready_r, ready_w
        if deadline is not None and _runtime.mono_ns() >= deadline:
            return ready_r, ready_w
        _runtime.wait(deadline, readers, writers)


def select(
    rlist: Iterable[Any], wlist: Iterable[Any], xlist: Iterable[Any], timeout: float | None = None
) -> tuple[list[Any], list[Any], list[Any]]:
    """``select.select`` over virtual sockets."""
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be non-negative")
    robjs, wobjs, xobjs = list(rlist), list(wlist), list(xlist)
    readers = [_socket_for(_fd_of(o), o) for o in robjs]
    writers = [_socket_for(_fd_of(o), o) for o in wobjs]
    errors = [_socket_for(_fd_of(o), o) for o in xobjs]
    ready_r, ready_w = wait_ready(readers, writers, timeout)
    rset, wset = set(map(id, ready_r)), set(map(id, ready_w))
    return (
        [o for o, s in zip(robjs, readers, strict=True) if id(s) in rset],
        [o for o, s in zip(wobjs, writers, strict=True) if id(s) in wset],
        [o for o, s in zip(xobjs, errors, strict=True) if s._error_now()],
    )


class VirtualPoll:
    """``select.poll()`` over virtual sockets."""

    def __init__(self) -> None:
        self._registered: dict[int, int] = {}

    def register(
        self, fd: Any, eventmask: int = _select.POLLIN | _select.POLLPRI | _select.POLLOUT
    ) -> None:
        self._registered[_fd_of(fd)] = eventmask

    def modify(self, fd: Any, eventmask: int) -> None:
        number = _fd_of(fd)
        if number not in self._registered:
            raise FileNotFoundError(2, "No such file or directory")
        self._registered[number] = eventmask

    def unregister(self, fd: Any) -> None:
        del self._registered[_fd_of(fd)]

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        seconds = None if timeout is None or timeout < 0 else timeout / 1000
        socks = {fd: _socket_for(fd, fd) for fd in self._registered}
        readers = [socks[fd] for fd, m in self._registered.items() if m & _select.POLLIN]
        writers = [socks[fd] for fd, m in self._registered.items() if m & _select.POLLOUT]
        ready_r, ready_w = wait_ready(readers, writers, seconds)
        rset, wset = set(map(id, ready_r)), set(map(id, ready_w))
        result = []
        for fd, sock in socks.items():
            revents = 0
            if id(sock) in rset:
                revents |= _select.POLLIN
            if id(sock) in wset:
                revents |= _select.POLLOUT
            if sock._error_now():
                revents |= _select.POLLERR
            if revents:
                result.append((fd, revents))
        return result


def poll() -> VirtualPoll:
    return VirtualPoll()


# Removed from the guest's select module, as on a host that lacks them.
NOT_OFFERED = ("epoll", "devpoll", "kqueue")


def missing_attribute(name: str) -> Any:
    """``select``'s module ``__getattr__``: say why epoll and the like are not there."""
    if name in NOT_OFFERED:
        raise AttributeError(
            f"module 'select' has no attribute {name!r} under ftproxy: it is not virtualized; "
            "use select.poll, select.select or selectors.DefaultSelector (asyncio and "
            "socketserver do)",
            name=name,
            obj=_select,
        )
    raise AttributeError(f"module 'select' has no attribute {name!r}", name=name, obj=_select)


class VirtualSelector(selectors._BaseSelectorImpl):
    """Stands in for every selector class (DefaultSelector, PollSelector, ...)."""

    _fd_to_key: dict[int, selectors.SelectorKey]

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        keys = list(self._fd_to_key.values())
        readers = [_socket_for(k.fd, k.fileobj) for k in keys if k.events & selectors.EVENT_READ]
        writers = [_socket_for(k.fd, k.fileobj) for k in keys if k.events & selectors.EVENT_WRITE]
        if timeout is not None and timeout < 0:
            timeout = 0
        ready_r, ready_w = wait_ready(readers, writers, timeout)
        rset, wset = {s._fd for s in ready_r}, {s._fd for s in ready_w}
        ready = []
        for key in keys:
            events = 0
            if key.events & selectors.EVENT_READ and key.fd in rset:
                events |= selectors.EVENT_READ
            if key.events & selectors.EVENT_WRITE and key.fd in wset:
                events |= selectors.EVENT_WRITE
            if events:
                ready.append((key, events))
        return ready
