"""The files a guest runs at start, pinned by digest so both replicas start the same program.

Files are not virtual devices: a replica reads its own host's copy. The
program itself (the script, or for ``-m`` the module's file) is what every
execution reads first, so the header pins its SHA-256 (path relative to the
working directory when it lies inside it); a backup or a replay computes the
same digests in its own working directory and refuses, naming the file, when
one differs or is missing, instead of diverging somewhere later. ``--pin
PATH`` adds the other files the guest reads (a configuration, a database it
starts from): a directory pins each file in it and its listing (``DIR/``), so
an added or removed file shows too.
"""

from __future__ import annotations

import hashlib
import os
import sys
from importlib.machinery import PathFinder

from ftproxy.guest.command import CommandError, parse_command


def start_files(argv: list[str], cwd: str) -> dict[str, str]:
    """{path: sha256 hex} of the files the guest command ``argv`` runs, seen from ``cwd``."""
    try:
        command = parse_command(argv)
    except CommandError:
        return {}
    if command.script is not None:
        # As the guest opens it: an absolute path, or one relative to its directory.
        shown = [os.path.normpath(command.script)]
    else:
        assert command.module is not None
        shown = [_shown(path, cwd) for path in _module_files(command.module, cwd)]
    pinned: dict[str, str] = {}
    for path in shown:
        digest = _digest(os.path.join(cwd, path))
        if digest is not None:
            pinned[path] = digest
    return pinned


def pinned_paths(paths: list[str], cwd: str) -> dict[str, str]:
    """{path: sha256 hex} of ``paths`` (files, or directories: each file and the listing)."""
    pinned: dict[str, str] = {}
    for given in paths:
        path = os.path.join(cwd, given)
        shown = os.path.normpath(given)
        if os.path.isdir(path):
            pinned[shown + os.sep] = _listing_digest(path)
            for name in _listing(path):
                digest = _digest(os.path.join(path, name))
                if digest is not None:
                    pinned[os.path.join(shown, name)] = digest
            continue
        digest = _digest(path)
        if digest is None:
            raise ValueError(f"--pin {given!r}: no such file or directory in {cwd}")
        pinned[shown] = digest
    return pinned


def start_files_problem(pinned: dict[str, str], cwd: str, source: str = "the primary") -> str:
    """Why the files in ``cwd`` are not those ``source`` pinned ("" when they all match)."""
    for shown, digest in pinned.items():
        path = os.path.join(cwd, shown)
        if shown.endswith(os.sep):
            if not os.path.isdir(path) or _listing_digest(path) != digest:
                return (
                    f"the guest's directory {path} does not list the files {source}'s did "
                    "(a file added or removed): start each replica from an identical copy"
                )
            continue
        mine = _digest(path)
        if mine is None:
            return (
                f"the guest's file {path} is missing here, and {source} ran it: start "
                "each replica from an identical copy of the program"
            )
        if mine != digest:
            return (
                f"the guest's file {path} differs from {source}'s (sha256 {mine[:12]} "
                f"here, {digest[:12]} there): start each replica from an identical copy "
                "of the program"
            )
    return ""


def _module_files(module: str, cwd: str) -> list[str]:
    """The files ``python -m module`` would run, found without importing anything."""
    search = [cwd, *sys.path[1:]]
    files: list[str] = []
    name = ""
    spec = None
    for part in module.split("."):
        name = f"{name}.{part}" if name else part
        spec = PathFinder.find_spec(name, search)
        if spec is None:
            return files
        if spec.origin and os.path.isfile(spec.origin):
            files.append(spec.origin)
        search = list(spec.submodule_search_locations or [])
    if spec is not None and spec.submodule_search_locations:  # a package: its __main__
        main = PathFinder.find_spec(f"{name}.__main__", search)
        if main is not None and main.origin and os.path.isfile(main.origin):
            files.append(main.origin)
    return files


def _listing(directory: str) -> list[str]:
    """Every file under ``directory``, relative to it, sorted."""
    names = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        names += [os.path.relpath(os.path.join(root, name), directory) for name in files]
    return sorted(names)


def _listing_digest(directory: str) -> str:
    return hashlib.sha256("\0".join(_listing(directory)).encode()).hexdigest()


def _digest(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _shown(path: str, cwd: str) -> str:
    """Relative to ``cwd`` when inside it (each replica has its own), else absolute."""
    path = os.path.abspath(path)
    relative = os.path.relpath(path, cwd)
    return path if relative.startswith(os.pardir) else relative
