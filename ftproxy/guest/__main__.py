"""``python -m ftproxy.guest SCRIPT ARGS`` (or ``-m MODULE ARGS``): boot a program on virtual
devices.

Started by a supervisor with the guest pipe on fds 3 and 4 (see
``ftproxy.guest.protocol``). The first exit learns the pinned policy and the
entropy seed; then the devices are installed and the program runs as
``__main__``, unmodified, exactly as ``python SCRIPT ARGS`` or ``python -m
MODULE ARGS`` would run it.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import NoReturn

from ftproxy.guest import _trace
from ftproxy.guest._install import install
from ftproxy.guest._runtime import EXIT_UNSUPPORTED, ModuleNotOffered, Runtime
from ftproxy.guest.command import CommandError, GuestCommand, parse_command

EXIT_USAGE = 2


def main() -> None:
    try:
        command = parse_command(sys.argv[1:])
    except CommandError as exc:
        _stop(f"ftproxy: {exc}", EXIT_USAGE)
    if command.script is not None and not os.path.isfile(command.script):
        _stop(f"ftproxy: the guest's script {command.script!r} is not a file", EXIT_USAGE)
    _trace.enable("guest")
    runtime = Runtime()
    seed, pid, hostname, network = runtime.boot()
    install(runtime, seed, pid, hostname)
    if network is not None:
        # Packet mode: imported only here, so a socket-mode guest imports no stack.
        from ftproxy.guest._vnet import PacketNetwork

        runtime.network = PacketNetwork(runtime, network, seed)
    runtime.stop_on_refusal()
    try:
        _run(command)
    except ModuleNotOffered as exc:
        runtime.flush()
        _stop(f"ftproxy: the guest stopped: {exc}", EXIT_UNSUPPORTED)
    finally:
        runtime.flush()


def _run(command: GuestCommand) -> None:
    if command.script is not None:
        script = os.path.abspath(command.script)
        sys.argv = [command.script, *command.args]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
        return
    assert command.module is not None
    # As ``python -m``: the working directory leads sys.path, argv[0] becomes
    # the module's file (run_module sets it).
    sys.argv = ["-m", *command.args]
    sys.path[0] = os.getcwd()
    import importlib.util

    try:
        found = importlib.util.find_spec(command.module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        _stop(f"ftproxy: the guest's module {command.module!r} was not found", EXIT_USAGE)
    runpy.run_module(command.module, run_name="__main__", alter_sys=True)


def _stop(message: str, code: int) -> NoReturn:
    sys.stderr.write(message + "\n")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
