"""Virtual timers: a heap ordered by (deadline, arming sequence number).

Ties fire in the order the timers were armed, so the firing order is a function
of the calls made, never of object identity. A timer re-armed later than its
queued entry keeps that entry as a lower bound (no heap growth for the common
"restart the retransmission timer on every ACK" pattern); when the entry comes
due it is pushed again at the timer's real deadline.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class Timer:
    """One restartable deadline with a callback ``fire(now_ns)``."""

    __slots__ = ("_queue", "_queued_at", "_queued_seq", "callback", "deadline")

    def __init__(self, queue: TimerQueue, callback: Callable[[int], None]) -> None:
        self._queue = queue
        self.callback = callback
        self.deadline: int | None = None
        self._queued_at: int | None = None
        self._queued_seq = -1

    @property
    def armed(self) -> bool:
        return self.deadline is not None

    def arm(self, deadline: int) -> None:
        self.deadline = deadline
        if self._queued_at is None or deadline < self._queued_at:
            self._queue._push(self, deadline)

    def cancel(self) -> None:
        self.deadline = None


class TimerQueue:
    """The stack's timers; ``next_deadline`` and ``run`` are exact and deterministic."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Timer]] = []
        self._seq = 0

    def new_timer(self, callback: Callable[[int], None]) -> Timer:
        return Timer(self, callback)

    def _push(self, timer: Timer, when: int) -> None:
        self._seq += 1
        timer._queued_at = when
        timer._queued_seq = self._seq
        heapq.heappush(self._heap, (when, self._seq, timer))

    def _settle(self) -> None:
        """Drop stale or cancelled heap tops and re-queue early ones, until the top is exact."""
        heap = self._heap
        while heap:
            when, seq, timer = heap[0]
            if seq != timer._queued_seq:
                heapq.heappop(heap)
                continue
            if timer.deadline is None:
                heapq.heappop(heap)
                timer._queued_at = None
                continue
            if timer.deadline != when:
                heapq.heappop(heap)
                timer._queued_at = None
                self._push(timer, timer.deadline)
                continue
            return

    def next_deadline(self) -> int | None:
        self._settle()
        return self._heap[0][0] if self._heap else None

    def run(self, now_ns: int) -> int:
        """Fire every timer due at ``now_ns``, earliest first; returns how many fired."""
        fired = 0
        while True:
            self._settle()
            if not self._heap or self._heap[0][0] > now_ns:
                return fired
            _when, _seq, timer = heapq.heappop(self._heap)
            timer._queued_at = None
            timer.deadline = None
            fired += 1
            timer.callback(now_ns)
