"""Spin before sleeping: the data path polls its descriptors for a few microseconds first.

On this kind of machine (virtual CPUs) a process that sleeps and is woken
from another CPU pays ~20-40 us per wake-up, while two processes that poll
hand over in under a microsecond. A request's next event (the guest's frame
after its reply, the backup's ack after an entry) usually comes within tens
of microseconds, so a task that would sleep for it first polls, for at most
``budget_ns``, every descriptor the data path waits on (one epoll set of this
module's: the guest pipe, the log channel, the front's input): its own, which
ends the spin, and the others', whose tasks trio then runs at once.

The budget is per wait and bounded, so an idle replica sleeps as before; a
spin that ran out having had less than 90 % of a CPU (the machine is busy:
polling would only delay whoever else would run) turns spinning off for
100 ms. A descriptor whose spins mostly run out (its event comes later than
the budget: the guest's frame after a batch of 50 clients' requests) is not
spun for, but for one wait in eight that relearns it: a spin that runs out
burns its whole budget for nothing.

FTPROXY_SPIN_US sets the budget (0: never spin). 40 us is the default the
bench chose (``python -m bench breakdown --baseline-env FTPROXY_SPIN_US=0``,
2026-12-07; README, Performance): 1-client SET 1.06x-1.57x at load 1-4;
without the back-off, 0.49x for the output rule at load 8, with it 1.05x-1.15x.
``ftproxy record`` spins up to 150 us (``RECORD_SPIN_US``): no backup shares the
CPUs with it, and its guest's next frame comes ~70 us after the reply, past 40 us.
"""

from __future__ import annotations

import contextlib
import os
import select
import time

import trio

ENV = "FTPROXY_SPIN_US"
DEFAULT_SPIN_US = 40
# A recorder's: 1-client SET 1.23x-1.27x against 40 us at less CPU per request, 50
# clients 0.96x-0.98x (noise); 300 us was worse than 150 (python -m bench breakdown
# --baseline-env FTPROXY_SPIN_US=40 --env FTPROXY_SPIN_US=150, 2026-12-07; README,
# Performance).
RECORD_SPIN_US = 150
# A spin that got less than this share of a CPU saw the machine busy...
CONTENDED_SHARE = 0.9
# ... and spinning stays off this long.
OFF_WHEN_CONTENDED_NS = 100_000_000
# Per descriptor, the share of its recent spins that caught their event (a moving
# average, each spin weighing this much); below FUTILE_SHARE its waits sleep at
# once, except every PROBE_EVERY-th, which spins to see whether that changed.
HIT_WEIGHT = 1 / 8
FUTILE_SHARE = 0.25
PROBE_EVERY = 8


def _budget_from_env() -> int:
    try:
        return max(0, int(os.environ.get(ENV, DEFAULT_SPIN_US))) * 1000
    except ValueError:
        return DEFAULT_SPIN_US * 1000


class Spinner:
    """The descriptors of one process's data path, polled before a task sleeps on one."""

    def __init__(self, budget_ns: int) -> None:
        self.budget_ns = budget_ns
        self._poller = select.epoll()
        self._watched: set[int] = set()
        self._off_until = 0
        self._hit_share: dict[int, float] = {}  # by descriptor; 1.0 until it misses
        self._skipped: dict[int, int] = {}  # waits not spun for since the last probe

    def use_default(self, budget_us: int) -> None:
        """Spin up to ``budget_us`` from now on, unless FTPROXY_SPIN_US says otherwise
        (a process's role chooses its default before its data path starts)."""
        if ENV not in os.environ:
            self.budget_ns = budget_us * 1000

    def watch(self, fd: int) -> None:
        """Poll ``fd`` in every spin from now on (until ``unwatch`` or it is closed)."""
        if not self.budget_ns or fd in self._watched:
            return
        with contextlib.suppress(OSError, ValueError):
            self._poller.register(fd, select.EPOLLIN)
            self._watched.add(fd)

    def unwatch(self, fd: int) -> None:
        if fd in self._watched:
            self._watched.discard(fd)
            self._hit_share.pop(fd, None)
            self._skipped.pop(fd, None)
            with contextlib.suppress(OSError, ValueError):
                self._poller.unregister(fd)

    async def spin(self, fd: int, stop: trio.Event | None = None) -> bool:
        """Poll for up to the budget; True once ``fd`` is readable (or ``stop`` is set),
        False when the budget ran out and the caller should sleep."""
        if not self.budget_ns or fd not in self._watched:
            return False
        now = time.monotonic_ns
        start = now()
        if start < self._off_until or self._futile(fd):
            return False
        cpu_start = time.thread_time_ns()
        end = start + self.budget_ns
        poll = self._poller.poll
        while now() < end:
            ready = poll(0)
            if not ready:
                continue
            if any(ready_fd == fd for ready_fd, _ in ready):
                self._count(fd, hit=True)
                return True
            # Another task's descriptor: let trio run it, then go on polling.
            await trio.lowlevel.checkpoint()
            if stop is not None and stop.is_set():
                self._count(fd, hit=True)
                return True
        self._count(fd, hit=False)
        self._check_contention(start, cpu_start)
        return False

    def spins_for(self, fd: int) -> bool:
        """Whether waits on ``fd`` spin (the probes aside): its recent spins did not
        mostly run out."""
        return self._hit_share.get(fd, 1.0) >= FUTILE_SHARE

    def _futile(self, fd: int) -> bool:
        """Whether this wait on ``fd`` goes without a spin: its spins mostly ran out,
        and this is not a wait that probes."""
        if self.spins_for(fd):
            return False
        skipped = self._skipped.get(fd, 0) + 1
        if skipped >= PROBE_EVERY:
            self._skipped[fd] = 0
            return False
        self._skipped[fd] = skipped
        return True

    def _count(self, fd: int, hit: bool) -> None:
        share = self._hit_share.get(fd, 1.0)
        self._hit_share[fd] = share + ((1.0 if hit else 0.0) - share) * HIT_WEIGHT

    def _check_contention(self, start: int, cpu_start: int) -> None:
        """A spin that ran out while the CPU was taken from us (other processes want
        it: the machine is busy) turns spinning off for a while: polling then only
        delays whoever would have run."""
        wall = time.monotonic_ns() - start
        if time.thread_time_ns() - cpu_start < wall * CONTENDED_SHARE:
            self._off_until = time.monotonic_ns() + OFF_WHEN_CONTENDED_NS

    async def wait_readable(self, fd: int) -> None:
        """Return once ``fd`` is readable (or may be), spinning first. No deadline, so no
        cancel scope: the data path waits here ~3 times per 1-client request, and a
        scope per wait was a measurable share of its Python (cProfile, rule)."""
        if await self.spin(fd):
            return
        await trio.lowlevel.wait_readable(fd)


spinner = Spinner(_budget_from_env())
