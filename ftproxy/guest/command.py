"""The guest's command line: ``SCRIPT [ARGS]`` or ``-m MODULE [ARGS]``, as ``python`` takes them.

Imported by the guest (inside the user's process, so it imports little) and by
the supervisor's side, which checks a command before starting anything and
finds the files the guest will run (see ``ftproxy.shell.startfiles``).
"""

from __future__ import annotations

from dataclasses import dataclass

USAGE = "SCRIPT [ARGS...] or -m MODULE [ARGS...]"


class CommandError(ValueError):
    """A guest command line ftproxy cannot run, with the reason."""


@dataclass(frozen=True)
class GuestCommand:
    """What to run: a script path or a module name, and the program's arguments."""

    script: str | None
    module: str | None
    args: list[str]


def parse_command(argv: list[str]) -> GuestCommand:
    """Split ``argv`` as ``python`` would; raise CommandError for what it cannot run."""
    if not argv:
        raise CommandError(f"no program given: expected {USAGE}")
    first = argv[0]
    if first == "-m":
        if len(argv) < 2 or not argv[1] or argv[1].startswith("-"):
            raise CommandError(f"-m needs a module name: expected {USAGE}")
        return GuestCommand(None, argv[1], argv[2:])
    if first.startswith("-m") and len(first) > 2:  # python -mhttp.server
        return GuestCommand(None, first[2:], argv[1:])
    if first.startswith("-") and first != "-":
        raise CommandError(
            f"the guest's command starts with the interpreter option {first!r}: ftproxy runs "
            f"{USAGE}; interpreter options are not supported (the environment is, with --env)"
        )
    if first == "-":
        raise CommandError("the guest's program cannot be read from stdin: give a script file")
    return GuestCommand(first, None, argv[1:])
