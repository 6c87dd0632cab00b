"""What every arbiter answers, whoever implements it, and how a replica keeps asking.

An :class:`Arbiter` decides test-and-set on keys: the first candidate to ask
wins a key for good, and asking again gets the same answer (a candidate that
lost the reply to its own winning request and asks again is told it won).
Two implementations exist: the built-in server's client
(:class:`~arbiter.BuiltinArbiter`) and etcd (:class:`~arbiter.EtcdArbiter`);
:func:`arbiter.connect` picks one from the ``--arbiter`` address. The
replication core only ever sees this interface.

Failures come in two kinds. :class:`ArbiterUnavailable`: nobody answered in
time (down, unreachable, etcd without a quorum); whether a test-and-set was
decided is unknown, and asking again is safe. :class:`ArbiterRefused`: the
arbiter answered and will not serve us (wrong secret or credentials, a
certificate it does not trust, not an arbiter at all); asking again does not
cure that.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

import structlog
import trio

from arbiter._protocol import Decision, Undecided

__all__ = [
    "DEFAULT_TIMEOUT",
    "Arbiter",
    "ArbiterRefused",
    "ArbiterTiming",
    "ArbiterUnavailable",
    "ask_until_answered",
]

DEFAULT_TIMEOUT: Final = 5.0
LOG_EVERY_S: Final = 1.0  # arbiter_unreachable, at most this often while retrying

logger = structlog.get_logger()

T = TypeVar("T")


class ArbiterUnavailable(Exception):
    """The arbiter could not be reached, or did not answer in time."""


class ArbiterRefused(Exception):
    """The arbiter answered but refuses to serve us; retrying does not cure it."""


class Arbiter(Protocol):
    """A test-and-set service, as a replica sees it."""

    @property
    def kind(self) -> str:
        """``builtin`` or ``etcd``: which implementation answers (for logs and reports)."""
        ...

    def describe(self) -> str:
        """The arbiter's address as a user wrote it, without credentials (for logs)."""
        ...

    async def test_and_set(self, key: str, candidate: str) -> Decision:
        """Make ``candidate`` the winner of ``key`` unless someone already is.

        ``won`` is True when ``candidate`` is (or already was) the winner.
        Raises :class:`ArbiterUnavailable` or :class:`ArbiterRefused`.
        """
        ...

    async def query(self, key: str) -> Decision | Undecided:
        """Whether ``key`` was decided, and for whom (``won`` is always False)."""
        ...


@dataclass(frozen=True)
class ArbiterTiming:
    """How long one question may take, and how long to pause between questions.

    ``connect_s`` bounds opening a connection (an unreachable, black-holed host
    costs this much, not a TCP connect's minutes); ``answer_s`` bounds one
    question from the connect to the answer (per etcd endpoint). Between failed
    questions the pause doubles from ``first_backoff_s`` up to ``max_backoff_s``.
    """

    connect_s: float = DEFAULT_TIMEOUT
    answer_s: float = DEFAULT_TIMEOUT
    first_backoff_s: float = 0.05
    max_backoff_s: float = 2.0

    @classmethod
    def for_peer_timeout(cls, peer_timeout_s: float) -> ArbiterTiming:
        """Bounds on the scale of the failover budget (the peer timeout).

        A failover already waited ``peer_timeout_s`` for the peer; the arbiter may
        add a fraction of that, not seconds: a connect gets a quarter of it, and
        the pause between questions at most a quarter too, so the replica asks
        again within that much of the arbiter's return. A question that did
        connect gets longer (``4 x``, at least 1 s, at most 5 s): an etcd
        transaction needs a Raft round and an fsync, and one that never gets
        time to finish would never decide anything.
        """
        quarter = peer_timeout_s / 4
        return cls(
            connect_s=min(max(quarter, 0.05), DEFAULT_TIMEOUT),
            answer_s=min(max(4 * peer_timeout_s, 1.0), DEFAULT_TIMEOUT),
            first_backoff_s=min(0.05, max(quarter, 0.01)),
            max_backoff_s=min(max(quarter, 0.01), 2.0),
        )


async def ask_until_answered(
    arbiter: Arbiter,
    question: Callable[[], Awaitable[T]],
    timing: ArbiterTiming,
    **context: object,
) -> T:
    """``await question()`` (a question to ``arbiter``), asked again while it is unavailable.

    A failure is followed by a pause (see :class:`ArbiterTiming`) and logged as
    ``arbiter_unreachable`` (with ``context``, e.g. the key): the first one, then
    at most one every :data:`LOG_EVERY_S`, since the pauses are short. Only an
    answer, :class:`ArbiterRefused` or cancellation ends it.
    """
    backoff = timing.first_backoff_s
    attempt = 1
    logged_at: float | None = None
    while True:
        try:
            return await question()
        except ArbiterUnavailable as exc:
            now = trio.current_time()
            if logged_at is None or now - logged_at >= LOG_EVERY_S:
                logged_at = now
                logger.warning(
                    "arbiter_unreachable",
                    arbiter=arbiter.describe(),
                    **context,
                    attempt=attempt,
                    reason=str(exc),
                    retry_in=backoff,
                )
        await trio.sleep(backoff)
        backoff = min(backoff * 2, timing.max_backoff_s)
        attempt += 1
