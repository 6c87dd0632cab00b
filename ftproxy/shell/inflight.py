"""What a primary has shipped to its backup and not yet had acknowledged.

Both primaries use it, the first pair's (``ftproxy.shell.primary``) and a
re-protected one's (``ftproxy.shell.reprotect``): an idle channel is where an
entry may be sent at once, from the exit that logged it, and each batch's ack
gives the log channel's round trip that /status and /metrics report.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

from ftproxy.core.channel import Entries
from ftproxy.core.records import Entry
from ftproxy.core.replication import Replica
from ftproxy.guest import _trace
from ftproxy.shell.link import LogLink
from ftproxy.shell.status import StatusBoard


class InFlight:
    """The batches sent and not acknowledged, oldest first."""

    def __init__(self, board: StatusBoard) -> None:
        self._board = board
        self._batches: deque[tuple[int, float]] = deque()  # (last seq of a batch, sent at)

    def __bool__(self) -> bool:
        return bool(self._batches)

    def sent(self, last_seq: int, now: float) -> None:
        self._batches.append((last_seq, now))

    def send_now(self, link: LogLink, batch: list[Entry], replica: Replica[Any]) -> bool:
        """Send ``batch`` from where the caller stands, without waiting, if ``link`` has
        no other send under way: True once sent (and counted in flight; what the socket
        did not take waits on the link, ``LogLink.pending``), False if nothing was."""
        if _trace.stamp is not None:
            _trace.stamp(_trace.SHIP_STARTED, batch[-1].seq)
        try:
            if not link.send_now(Entries(batch)):
                return False
        except trio.ClosedResourceError:
            return False  # the ship task finds out and reports it
        now = trio.current_time()
        self.sent(batch[-1].seq, now)
        replica.sent(now)
        if _trace.stamp is not None:
            _trace.stamp(_trace.ENTRY_SHIPPED, batch[-1].seq)
        return True

    def acked(self, received: int, now: float, lag_s: float) -> None:
        """The backup holds every entry up to ``received``: the round trips of the
        batches that covers, and the lag it had before this ack."""
        batches, rtt = self._batches, self._board.channel_rtt_ms
        while batches and batches[0][0] <= received:
            _, sent_at = batches.popleft()
            rtt.add((now - sent_at) * 1000)
        self._board.lag_ms.add(lag_s * 1000)

    def clear(self) -> None:
        self._batches.clear()
