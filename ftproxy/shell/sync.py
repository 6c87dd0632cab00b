"""The shell's synchronisation primitive: a doorbell that wakes whoever waits for a change."""

from __future__ import annotations

import math

import trio


class Doorbell:
    """Wakes whoever waits for "something changed"; a ring is never lost.

    A waiter checks its condition and then waits with no checkpoint between,
    so under trio a ring cannot fall between the check and the wait.
    """

    def __init__(self) -> None:
        self._event = trio.Event()
        self._scopes: list[trio.CancelScope] = []

    def ring(self) -> None:
        self._event.set()
        self._event = trio.Event()
        if self._scopes:
            scopes, self._scopes = self._scopes, []
            for scope in scopes:
                scope.cancel()

    @property
    def next_ring(self) -> trio.Event:
        """Set by the next ring (for a waiter that polls instead of awaiting ``wait``)."""
        return self._event

    async def wait(self) -> None:
        await self._event.wait()

    async def wait_readable(self, fd: int, deadline: float = math.inf) -> None:
        """Wait for a ring, for ``fd`` to be readable or for ``deadline``, whichever is first."""
        with trio.CancelScope(deadline=deadline) as scope:
            self._scopes.append(scope)
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                if scope in self._scopes:
                    self._scopes.remove(scope)
