"""The client threads of a load generator: started together, stopped together.

The loads of bench/ and tests/ (soak's history, failover's writers, the tests'
INCR/SET load) each run ``count`` closed-loop clients in daemon threads until
their stop event is set.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

STOP_TIMEOUT_S = 30.0  # a client blocked on a dead connection gives up by then


def start_clients(count: int, client: Callable[[int], object]) -> list[threading.Thread]:
    """Run ``client(index)`` for index 0 .. count-1, each in a daemon thread."""
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


def stop_clients(
    stop: threading.Event, threads: Sequence[threading.Thread], timeout: float = STOP_TIMEOUT_S
) -> None:
    """Set ``stop`` and wait for every client to see it (each at most ``timeout``)."""
    stop.set()
    for thread in threads:
        thread.join(timeout=timeout)


def reply_gap(requests: Iterable[tuple[float, float | None]], moment: float) -> float | None:
    """The gap in service across ``moment`` (a kill, say), from (sent, replied) times:
    the last reply to a request sent before it -> the first reply to one sent after.
    0 when the two overlap (the old server still answered requests sent after the
    moment, before the kill took effect); None without replies on both sides."""
    before: list[float] = []
    after: list[float] = []
    for sent, replied in requests:  # once: ``requests`` may be a generator
        if replied is not None and sent != moment:
            (before if sent < moment else after).append(replied)
    if not before or not after:
        return None
    return max(0.0, min(after) - max(before))
