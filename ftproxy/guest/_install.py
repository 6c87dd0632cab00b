"""Putting the virtual devices in place, before the program is imported.

Module attributes are replaced in place, so ``time.time()`` finds the virtual
clock; references copied out before boot (``from time import monotonic`` in a
module a ``.pth`` file imported) are found by scanning ``sys.modules``. Modules
that bind a device when they are imported later (``socketserver`` takes
``selectors.PollSelector``, ``random`` takes ``os.urandom``) see the virtual
one because the replacement comes first.
"""

from __future__ import annotations

import _thread
import datetime
import os
import select
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from types import FunctionType, ModuleType
from typing import Any

from ftproxy.guest import _vclock, _ventropy, _vselect, _vsignal, _vsocket
from ftproxy.guest._runtime import ModuleNotOffered, Runtime, refusal

_THREAD_WHY = (
    "ftproxy replays a single-threaded guest; how a second thread interleaves with "
    "the first is decided by the host's scheduler and cannot be reproduced on the backup"
)
_PROCESS_WHY = (
    "a child process's input and output are not virtual devices, so the backup could "
    "not replay them"
)
_THREAD_INSTEAD = "serve every connection from one thread (selectors, asyncio or a plain server)"


def install(runtime: Runtime, seed: bytes, pid: int, hostname: str) -> None:
    """Replace every non-deterministic device the guest could reach."""
    for module in (_vsocket, _vselect, _vclock, _vsignal):
        module.bind_runtime(runtime)
    originals: dict[int, Any] = {}

    def replace(module: ModuleType | type, name: str, value: Any) -> None:
        if isinstance(module, ModuleType) and isinstance(value, FunctionType):
            # The real ones are builtins, which do not bind as methods when a
            # class stores them (logging.Formatter.converter = time.localtime):
            # a staticmethod does not either, and calls the same.
            value = staticmethod(value)
        old = getattr(module, name, None)
        if old is not None:
            originals[id(old)] = value
        setattr(module, name, value)

    for name, value in _vclock.REPLACEMENTS.items():
        replace(time, name, value)
    originals[id(datetime.datetime)] = _vclock.VirtualDatetime
    _vclock.install_datetime()

    entropy = _ventropy.Entropy(runtime, seed)
    replace(os, "urandom", entropy.urandom)
    if hasattr(os, "getrandom"):
        replace(os, "getrandom", entropy.getrandom)
    _ventropy.install_random(entropy)

    replace(os, "getpid", lambda: pid)
    real_kill = os.kill

    def kill(target: int, signum: int) -> None:
        if target in (pid, 0):
            _vsignal.deliver(int(signum))
        else:
            real_kill(target, signum)

    replace(os, "kill", kill)
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "popen"):
        if hasattr(os, name):
            replace(os, name, refusal(f"os.{name}", _PROCESS_WHY))
    real_exit = os._exit

    def _exit(code: int) -> None:
        runtime.flush()
        real_exit(code)

    replace(os, "_exit", _exit)

    for name, value in _vsocket.OS_REPLACEMENTS.items():
        if hasattr(os, name):
            replace(os, name, value)

    _vsocket.set_hostname(hostname)
    replace(socket, "socket", _vsocket.VirtualSocket)
    replace(socket, "SocketType", _vsocket.VirtualSocket)
    for name in (
        "socketpair",
        "getaddrinfo",
        "gethostbyname",
        "gethostbyname_ex",
        "gethostbyaddr",
        "getnameinfo",
    ):
        replace(socket, name, getattr(_vsocket, name))
    replace(socket, "close", _vsocket.socket_close)
    replace(socket, "dup", _vsocket.socket_dup)
    for name, why in _vsocket.REFUSED.items():
        if hasattr(socket, name):
            replace(socket, name, refusal(f"socket.{name}", why))
    for name in ("gethostname", "getfqdn"):
        replace(socket, name, getattr(_vsocket, name))
    for name in ("fromfd", "fromshare", "send_fds", "recv_fds"):
        if hasattr(socket, name):
            replace(
                socket, name, refusal(f"socket.{name}", "host file descriptors cannot be replayed")
            )

    replace(select, "select", _vselect.select)
    replace(select, "poll", _vselect.poll)
    # Not offered at all, so that programs which look for them first (pyftpdlib:
    # hasattr(select, "epoll")) fall back to poll or select, as on a host without them.
    for name in _vselect.NOT_OFFERED:
        if name in vars(select):
            delattr(select, name)
    setattr(select, "__getattr__", _vselect.missing_attribute)  # noqa: B010
    for name in (
        "DefaultSelector",
        "SelectSelector",
        "PollSelector",
        "EpollSelector",
        "DevpollSelector",
        "KqueueSelector",
    ):
        if hasattr(selectors, name):
            replace(selectors, name, _vselect.VirtualSelector)

    import signal

    for name, value in _vsignal.REPLACEMENTS.items():
        if hasattr(signal, name):
            replace(signal, name, value)

    replace(
        threading.Thread,
        "start",
        refusal("threading.Thread.start", _THREAD_WHY, _THREAD_INSTEAD),
    )
    for name in ("start_new_thread", "start_new"):
        if hasattr(_thread, name):
            replace(_thread, name, refusal(f"_thread.{name}", _THREAD_WHY, _THREAD_INSTEAD))

    _rebind_copies(originals)
    sys.meta_path.insert(0, _NotOffered())
    _PatchOnImport.install(
        {
            "asyncio.base_events": _inline_default_executor,
            "socketserver": _inline_threading_mixin,
            "_posixsubprocess": _refuse_fork_exec,
        }
    )


def _rebind_copies(originals: dict[int, Any]) -> None:
    """Replace module-level copies of the real devices taken before boot."""
    for module in list(sys.modules.values()):
        if module is None or module.__name__.startswith("ftproxy.guest"):
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            replacement = originals.get(id(value))
            if replacement is not None and replacement is not value:
                namespace[attr] = replacement


def _inline_default_executor(module: ModuleType) -> None:
    """asyncio's default executor runs its work inline: getaddrinfo is a device call."""
    loop_class = module.BaseEventLoop
    real_run_in_executor = loop_class.run_in_executor

    def run_in_executor(self: Any, executor: Any, func: Any, *args: Any) -> Any:
        if executor is not None:
            return real_run_in_executor(self, executor, func, *args)
        self._check_closed()
        future = self.create_future()
        try:
            future.set_result(func(*args))
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            future.set_exception(exc)
        return future

    loop_class.run_in_executor = run_in_executor


def _inline_threading_mixin(module: ModuleType) -> None:
    """socketserver.ThreadingMixIn (ThreadingHTTPServer, ``python -m http.server``) serves
    each request inline, in turn, exactly as the plain server class does."""

    def process_request(self: Any, request: Any, client_address: Any) -> None:
        self.process_request_thread(request, client_address)

    module.ThreadingMixIn.process_request = process_request


def _refuse_fork_exec(module: ModuleType) -> None:
    setattr(module, "fork_exec", refusal("subprocess", _PROCESS_WHY))  # noqa: B010


class _NotOffered(MetaPathFinder):
    """Modules that bring their own I/O or event loop in C: not there, as if not installed."""

    MODULES = {
        "uvloop": (
            "it runs its own event loop on libuv, whose I/O ftproxy cannot virtualize",
            "use asyncio's own event loop (uvicorn: --loop asyncio)",
        ),
    }

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> ModuleSpec | None:
        refused = self.MODULES.get(fullname.partition(".")[0])
        if refused is not None:
            raise ModuleNotOffered(fullname, *refused)
        return None


class _PatchOnImport(MetaPathFinder):
    """Patches a module right after it is first executed."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]) -> None:
        self._patches = patches

    @classmethod
    def install(cls, patches: dict[str, Callable[[ModuleType], None]]) -> None:
        for name, patch in list(patches.items()):
            if name in sys.modules:
                patch(sys.modules[name])
                del patches[name]
        sys.meta_path.insert(0, cls(patches))

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> ModuleSpec | None:
        patch = self._patches.pop(fullname, None)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec: ModuleSpec | None = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


class _PatchingLoader(Loader):
    def __init__(self, loader: Loader, patch: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._patch(module)
