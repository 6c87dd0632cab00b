"""How a replica ends: its exit codes, and the exceptions that lead to them."""

from __future__ import annotations

EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_HALTED = 4
EXIT_STARTUP = 5


class StartupError(Exception):
    """A replica cannot start as asked: the flag, and why (a busy port, a missing script)."""

    def __init__(self, flag: str, reason: str) -> None:
        super().__init__(f"{flag}: {reason}")
        self.flag = flag
        self.reason = reason


class Halted(Exception):
    """This replica must stop serving: it lost the arbiter, or its pair is decided."""
