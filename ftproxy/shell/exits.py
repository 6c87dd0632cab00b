"""How a replica ends: its exit codes, and the exceptions that lead to them."""

from __future__ import annotations

EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_HALTED = 4
EXIT_STARTUP = 5
# ``ftproxy switchover``'s own outcomes (0 when the backup serves now, 2 for bad flags).
EXIT_SWITCHOVER_REFUSED = 6  # nothing changed: no caught-up backup, not a primary...
EXIT_SWITCHOVER_UNFINISHED = 7  # tried, and not done: timed out, or the backup was lost
EXIT_UNAUTHENTICATED = 8  # the log channel refused us: another secret, --insecure on one side
EXIT_UNREACHABLE = 9  # the admin or the log channel address did not answer


class StartupError(Exception):
    """A replica cannot start as asked: the flag, and why (a busy port, a missing script)."""

    def __init__(self, flag: str, reason: str) -> None:
        super().__init__(f"{flag}: {reason}")
        self.flag = flag
        self.reason = reason


class Halted(Exception):
    """This replica must stop serving: it lost the arbiter, or its pair is decided."""


class Retired(Halted):
    """This replica handed the service to its backup (a switchover) and stops: exit 0."""
