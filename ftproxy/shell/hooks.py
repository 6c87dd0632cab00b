"""Role-change hooks, like keepalived's ``notify_master``: ``--on-role-change CMD``.

On every role change (a primary paired with its backup, a backup joined, either
went live alone, either halted) the replica runs CMD, split like a shell would
(``shlex``) but without a shell, with what changed in its environment:

- ``FTPROXY_ROLE``: ``primary``, ``backup``, ``live`` or ``halted``;
- ``FTPROXY_PREVIOUS_ROLE``: the role before (``starting`` for the first);
- ``FTPROXY_PAIR``, ``FTPROXY_GENERATION``: the pair at the arbiter;
- ``FTPROXY_REASON``: why, in words;
- ``FTPROXY_PID``: the replica's process id.

Hooks run one at a time, in order, beside the replica (which never waits for
them), each for at most ``timeout_s`` seconds; a hook that fails, cannot start
or runs too long is logged (``role_hook_failed``) and nothing else: a hook is
never fatal. A replica that stops gives the hooks it queued (its last, halted,
among them) their time to run first.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
import trio

log = structlog.get_logger()

DEFAULT_TIMEOUT_S = 10.0


def parse_hook_command(text: str) -> list[str]:
    """``--on-role-change``'s CMD as argv; ValueError if it is empty or badly quoted."""
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"--on-role-change {text!r}: {exc}") from None
    if not argv:
        raise ValueError("--on-role-change needs a command")
    return argv


@dataclass(frozen=True)
class RoleChange:
    role: str
    previous: str
    reason: str


class RoleHooks:
    """Queue role changes and run the hook for each, in order, off the replica's path."""

    def __init__(self, command: list[str] | None, timeout_s: float, pair: str) -> None:
        self.command = command
        self.timeout_s = timeout_s
        self.role = "starting"
        self.pair = pair
        self.generation = 0
        self._send, self._receive = trio.open_memory_channel[RoleChange](math.inf)

    def changed(self, role: str, *, generation: int, pair: str, reason: str) -> None:
        """The replica's role is now ``role``: queue its hook (never blocks)."""
        if role == self.role:
            return
        change = RoleChange(role, self.role, reason)
        self.role, self.generation, self.pair = role, generation, pair
        if self.command is not None:
            self._send.send_nowait(change)

    async def run(self) -> None:
        """Run the queued hooks until the queue is closed and empty."""
        async with self._receive:
            async for change in self._receive:
                await self._run_one(change)

    async def _run_one(self, change: RoleChange) -> None:
        assert self.command is not None
        env = {
            **os.environ,
            "FTPROXY_ROLE": change.role,
            "FTPROXY_PREVIOUS_ROLE": change.previous,
            "FTPROXY_PAIR": self.pair,
            "FTPROXY_GENERATION": str(self.generation),
            "FTPROXY_REASON": change.reason,
            "FTPROXY_PID": str(os.getpid()),
        }
        bound = log.bind(hook=self.command[0], to=change.role)
        try:
            with trio.fail_after(self.timeout_s):
                done = await trio.run_process(
                    self.command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    check=False,
                    capture_stdout=False,
                    capture_stderr=True,
                )
        except trio.TooSlowError:  # run_process kills it on cancellation
            bound.error("role_hook_failed", reason=f"still running after {self.timeout_s:g} s")
            return
        except OSError as exc:
            bound.error("role_hook_failed", reason=f"cannot run: {exc.strerror or exc}")
            return
        stderr = done.stderr.decode(errors="replace").strip()
        if done.returncode != 0:
            bound.error(
                "role_hook_failed", reason=f"exit code {done.returncode}", stderr=stderr[-500:]
            )
        else:
            bound.info("role_hook_ran")

    def close(self) -> None:
        self._send.close()


@asynccontextmanager
async def role_hooks(
    command: list[str] | None, timeout_s: float, pair: str
) -> AsyncIterator[RoleHooks]:
    """RoleHooks running for the life of the block; at its end, the queue drains
    (each hook still bounded by its timeout)."""
    hooks = RoleHooks(command, timeout_s, pair)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hooks.run)
        try:
            yield hooks
        finally:
            hooks.close()
