"""Start-up checks: what a replica verifies before anything starts, as StartupErrors."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import trio

from ftproxy.shell.exits import StartupError


async def bind_listeners(flag: str, address: tuple[str, int]) -> list[trio.SocketListener]:
    """Listen on ``address`` now, at start: a busy or foreign address is a StartupError."""
    host, port = address
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise StartupError(f"{flag} {host}:{port}", exc.strerror or str(exc)) from None
    if port == 0 and len(listeners) > 1:
        # Each address family got a port of its own; keep one, so the port we
        # report is the whole truth.
        for extra in listeners[1:]:
            extra.socket.close()
        listeners = listeners[:1]
    return listeners


def check_free(flag: str, address: tuple[str, int]) -> None:
    """Fail at start if ``address`` cannot be bound now (the guest binds it later).

    ``flag`` names the flag, address included, as the user wrote it.
    """
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise StartupError(flag, exc.strerror or str(exc)) from None


def check_program(argv: list[str], workdir: str | None = None) -> None:
    """The script after ``--`` must be there and readable before anything starts.

    A relative script is looked for where the guest will run: ``workdir`` (a
    backup's ``--workdir``), or this process's working directory.
    """
    script = argv[0]
    if script.startswith("-"):  # an interpreter option (-m MODULE): Python finds it
        return
    path = os.path.join(workdir, script) if workdir is not None else script
    if not os.path.exists(path):
        raise StartupError(f"-- {script}", "no such file")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise StartupError(f"-- {script}", "not a readable file")


def check_data_dir(data_dir: Path | None) -> None:
    """--data-dir must be a directory this replica can create and write in. Which pair
    it belongs to is checked once the pair is known (``ftproxy.shell.logstore``)."""
    if data_dir is None:
        return
    flag = f"--data-dir {data_dir}"
    existing = data_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise StartupError(flag, f"{existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "it" if existing == data_dir else f"{existing}, where it would be created,"
        raise StartupError(flag, f"{what} is not writable by this user")
