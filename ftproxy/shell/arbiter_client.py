"""A replica's side of the arbiter: test-and-set on its pair's generation keys."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import structlog

import arbiter
from ftproxy.shell.exits import Halted
from ftproxy.shell.options import ReplicaOptions

log = structlog.get_logger()

T = TypeVar("T")


def generation_key(pair: str, generation: int) -> str:
    return f"{pair}/generation/{generation}"


LOG_ADDRESS_MARK = " log="


def candidate_name(role: str, log_listen: tuple[str, int] | None = None) -> str:
    """Who asks the arbiter; with the log address a new backup would join it at."""
    name = f"{role}@{socket.gethostname()}:{os.getpid()}"
    if log_listen is not None:
        name += f"{LOG_ADDRESS_MARK}{log_listen[0]}:{log_listen[1]}"
    return name


def log_address_of(candidate: str) -> tuple[str, int] | None:
    """The log address a winner recorded with its win (None if it recorded none)."""
    _, mark, address = candidate.rpartition(LOG_ADDRESS_MARK)
    if not mark:
        return None
    try:
        return arbiter.parse_address(address)
    except ValueError:
        return None


@dataclass(frozen=True)
class LiveReplica:
    """The replica the arbiter names as live for a pair: the winner of its last decided key."""

    generation: int
    winner: str

    @property
    def log_address(self) -> tuple[str, int] | None:
        return log_address_of(self.winner)


class ArbiterClient:
    """Test-and-set on the pair's generation key, retried while the arbiter is down.

    Whichever arbiter answers (``options.arbiter``: built-in or etcd), the answers
    mean the same; retries are paced on the peer timeout's scale. An arbiter that
    refuses this replica (wrong secret or credentials) halts it: asking again
    would not cure that, and acting alone without an answer is never allowed.
    """

    def __init__(self, options: ReplicaOptions, role: str) -> None:
        # Any arbiter.Arbiter; the free functions arbiter.query() etc. accept it too.
        self.address = options.arbiter
        self.secret = options.secret
        self.timing = arbiter.ArbiterTiming.for_peer_timeout(options.timing.peer_timeout_s)
        self.pair = options.pair
        self.key = generation_key(options.pair, options.generation)
        self.candidate = candidate_name(role, options.log_listen)
        self.state = "idle"

    def set_generation(self, generation: int) -> None:
        """The pair moved on to ``generation`` (re-protection): arbitrate on its key."""
        self.key = generation_key(self.pair, generation)

    async def find_live(self) -> LiveReplica | None:
        """The winner of the pair's highest decided generation (None: nobody ever won).

        Generations are decided in order (a pair of generation N+1 forms only
        around the winner of N), so the scan stops at the first undecided key
        past the first decided one; a pair started with the explicit form
        begins at generation 1, one started by ``ftproxy run`` at 0.
        """
        found: LiveReplica | None = None
        generation = 0
        while True:
            key = generation_key(self.pair, generation)
            answer = await self._ask(partial(self.address.query, key), key=key)
            self.state = "idle"
            if isinstance(answer, arbiter.Decision):
                found = LiveReplica(generation, answer.winner)
            elif found is not None or generation >= 1:
                return found
            generation += 1

    async def claim_boot(self) -> arbiter.Decision:
        """Ask to be the pair's first replica: generation 0's winner boots the guest alone.

        Two nodes started at once both ask; the arbiter lets exactly one win.
        """
        self.state = "asking"
        key = generation_key(self.pair, 0)
        decision = await self._ask(partial(self.address.test_and_set, key, self.candidate), key=key)
        self.state = "won" if decision.won else "lost"
        log.info(
            "arbiter_decided",
            key=key,
            winner=decision.winner,
            won=decision.won,
            arbiter=self.address.kind,
        )
        return decision

    async def check_undecided(self) -> None:
        """Refuse to serve a generation the arbiter already decided (retrying while down)."""
        answer = await self._ask(lambda: self.address.query(self.key))
        self.state = "idle"
        if isinstance(answer, arbiter.Decision):
            raise Halted(
                f"generation {self.key} was already decided (won by {answer.winner}); "
                "a new pair needs a new --generation (or --pair)"
            )

    async def test_and_set(self) -> bool:
        """Ask for the right to act alone; True if this replica won it."""
        self.state = "asking"
        decision = await self._ask(lambda: self.address.test_and_set(self.key, self.candidate))
        self.state = "won" if decision.won else "lost"
        log.info(
            "arbiter_decided",
            key=self.key,
            winner=decision.winner,
            won=decision.won,
            arbiter=self.address.kind,
        )
        return decision.won

    async def _ask(self, question: Callable[[], Awaitable[T]], key: str | None = None) -> T:
        """``question()`` (about ``key``, by default this replica's generation key) until
        the arbiter answers; Halted if it refuses us."""

        async def asked() -> T:
            try:
                return await question()
            except arbiter.ArbiterUnavailable:
                self.state = "unreachable"  # for /status, until an answer comes
                raise

        try:
            return await arbiter.ask_until_answered(
                self.address, asked, self.timing, key=key or self.key, candidate=self.candidate
            )
        except (arbiter.ArbiterRefused, arbiter.RemoteProtocolError) as exc:
            raise Halted(
                f"the arbiter {self.address.describe()} refused this replica: {exc}"
            ) from None
