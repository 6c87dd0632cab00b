"""A planned switchover, the primary's side: hold the guest, drain, hand over, retire.

One implementation for every kind of primary: the first primary of a pair
(``ftproxy.shell.primary``, its backup joined before the guest booted) and a
re-protected one, whichever shell serves it (a primary that went on alone, a
backup that went live, ``ftproxy run``'s first node), whose backup joined
through ``ftproxy.shell.reprotect``. The shell routes its guest's exits through
``answer`` and says which log channel leads to its caught-up backup
(``attach``); the channel's owner passes on ``HandedOver`` (``took_over``) and
the arbiter's verdict after a loss (``arbitrated``).

Handing over: the guest is held at its next exit (a wait for input not yet
woken is interrupted before it logs anything; an exit already under way
finishes, and its entry is shipped and drained like any other); once the
backup holds and has replayed every entry and no output waits, ``Handover``
goes with that exit's (icount, kind, digest), and from then on this replica
releases nothing. ``HandedOver`` means the backup won the arbiter and serves:
the shell retires (exit 0).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import trio

from ftproxy.core.channel import HandedOver, Handover, SwitchoverOutcome, Waiting
from ftproxy.core.replication import Replica, ReplicaRole
from ftproxy.guest import protocol
from ftproxy.shell.link import LogLink
from ftproxy.shell.status import StatusBoard
from ftproxy.shell.supervisor import Exit
from ftproxy.shell.sync import Doorbell
from ftproxy.shell.world import WorldAnswers

# How long a switchover waits for the backup to hold and replay every entry before
# it gives up and the primary goes on (the guest is held meanwhile: keep it short).
HANDOVER_DRAIN_TIMEOUT_S = 5.0


class PlannedSwitchover:
    """One replica's planned switchovers, from the moment it may be a primary."""

    def __init__(
        self,
        *,
        replica: Replica[tuple[Any, ...]],
        acked: Doorbell,
        board: StatusBoard,
        role_changed: Callable[[str, str], None],
        bound_log: Any,
    ) -> None:
        self.replica = replica
        self.acked = acked  # rung at each ack and role change: what the drain waits on
        self.board = board
        self.role_changed = role_changed
        self.log = bound_log
        self.nursery: trio.Nursery | None = None  # where a switchover runs (the shell's)
        # The log channel to the caught-up backup, and what ends it as lost.
        self.link: LogLink | None = None
        self._lose: Callable[[str], None] = lambda reason: None
        # The exit the guest waits at (a primary announces it to its backup when idle).
        self.waiting: Waiting | None = None
        self._hold = False
        self._hold_lifted = trio.Event()
        self._parked = False  # the guest waits at an exit that will not be answered
        self._answering: trio.CancelScope | None = None  # a wait for input, to interrupt
        self._outcome: trio.Event | None = None  # set once the outcome is known
        self._result: list[SwitchoverOutcome] = []
        self._signals = 0  # SIGINT and SIGTERM so far

    def attach(self, link: LogLink, lose: Callable[[str], None]) -> None:
        """``link`` leads to the backup that holds the whole log; ``lose`` ends it as lost."""
        self.link, self._lose = link, lose

    def detach(self) -> None:
        self.link, self._lose = None, lambda reason: None

    # -- the guest's exits ------------------------------------------------------

    async def answer(self, seq: int, exit: Exit, world: WorldAnswers) -> bytes:
        """The world's answer to this exit, unless a switchover holds the guest here: a
        wait for input not yet woken is interrupted before it logs anything (other
        exits, and a wait already woken, finish: the next one is held)."""
        self.waiting = Waiting(seq, exit.icount, exit.kind, exit.digest)
        try:
            while True:
                if self._hold:
                    self._parked = True
                    self.acked.ring()
                    try:
                        await self._hold_lifted.wait()
                    finally:
                        self._parked = False
                    continue
                with trio.CancelScope() as scope:
                    self._answering = scope if exit.kind == protocol.KIND_WAIT else None
                    try:
                        return await world.answer(seq, exit)
                    finally:
                        self._answering = None
                # Cancelled by _hold_guest (nothing was logged): hold here.
        finally:
            self.waiting = None

    def _hold_guest(self) -> None:
        self._hold = True
        self._hold_lifted = trio.Event()
        if self._answering is not None:
            self._answering.cancel()

    def _lift_hold(self) -> None:
        self._hold = False
        self._hold_lifted.set()

    # -- asking, and the outcome ------------------------------------------------

    def refusal(self) -> str:
        """Why a switchover cannot start now ("" if it can)."""
        replica = self.replica
        if self._outcome is not None:
            return "a switchover is already under way"
        if replica.role is ReplicaRole.LIVE and replica.catching_up:
            catch_up = self.board.catch_up() or {}
            return (
                f"the backup {catch_up.get('peer', '')} is still catching up (it holds "
                f"{catch_up.get('acked_seq', 0)} of {replica.logged} entries); try again "
                "once /status says protected"
            )
        if replica.role is ReplicaRole.LIVE:
            return "this replica serves alone: there is no backup to hand the service to"
        if replica.role is not ReplicaRole.PRIMARY or self.link is None:
            return f"this replica is {replica.role.value}, not a primary with its backup"
        return ""

    async def ask(self) -> SwitchoverOutcome:
        """Hand the service to the backup; the outcome once known (never raises)."""
        reason = self.refusal()
        if reason:
            self.log.warning("switchover_refused", reason=reason)
            return SwitchoverOutcome(done=False, refused=True, reason=reason)
        assert self.nursery is not None
        done = self._outcome = trio.Event()
        result = self._result = []
        self.nursery.start_soon(self._hand_over)
        await done.wait()
        return result[0]

    def _ended(self, *, done: bool, refused: bool, reason: str) -> None:
        if self._outcome is None or self._outcome.is_set():
            return
        self._result.append(SwitchoverOutcome(done, refused, reason))
        (self.log.info if done else self.log.warning)(
            "switchover_finished" if done else "switchover_failed", reason=reason
        )
        self._outcome.set()
        self._outcome = None

    async def _hand_over(self) -> None:
        replica, link, lose = self.replica, self.link, self._lose
        assert link is not None
        replica.ask_handover()
        self.log.info(
            "switchover_started", peer=link.peer, logged_seq=replica.logged, acked=replica.received
        )
        self._hold_guest()
        with trio.move_on_after(HANDOVER_DRAIN_TIMEOUT_S):
            while replica.role is ReplicaRole.HANDING_OVER and not (
                self._parked and replica.drained()
            ):
                await self.acked.wait()
        if replica.role is not ReplicaRole.HANDING_OVER:
            return  # the backup was lost: arbitrated() ends the switchover
        waiting = self.waiting
        if not (self._parked and replica.drained()) or waiting is None:
            replica.abort_handover()
            self._lift_hold()
            entries, _, _ = replica.lag(trio.current_time())
            self._ended(
                done=False,
                refused=True,
                reason=f"the backup did not hold and replay every entry within "
                f"{HANDOVER_DRAIN_TIMEOUT_S:g} s ({replica.logged - replica.received} not "
                f"acknowledged, {entries} not replayed); the primary goes on as before",
            )
            return
        handover = Handover(replica.logged, waiting.icount, waiting.kind, waiting.digest)
        replica.handover_sent()  # before it goes: from here on nothing is released
        self.log.info("handover_sent", seq=handover.seq, icount=handover.icount)
        try:
            await link.send(handover)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            lose(link.why_broken("sending the Handover"))

    # -- what the backup's channel says ------------------------------------------

    def took_over(self, event: HandedOver) -> bool:
        """HandedOver: the backup won the arbiter and serves; True if this replica is done
        (the caller ends the channel, not as a loss), False if the backup was lost for
        saying it out of turn."""
        if self.replica.role is not ReplicaRole.RETIRING:
            self._lose(f"the backup said HandedOver as {self.replica.role.value}")
            return False
        self.replica.handed_over()
        peer = self.link.peer if self.link is not None else self.board.peer_address
        self.board.peer_state = "handed_over"
        self.log.info("role_changed", to="handed_over", generation=event.generation, seq=event.seq)
        self.role_changed("handed_over", f"the backup {peer} serves now")
        self._ended(
            done=True,
            refused=False,
            reason=f"the backup {peer} serves now (generation {event.generation}, from log "
            f"entry {event.seq + 1})",
        )
        return True

    def arbitrated(self, won: bool) -> None:
        """The backup was lost and the arbiter decided: a switchover under way ends."""
        if not self._hold:
            return
        if won:
            self._lift_hold()
            self._ended(
                done=False,
                refused=False,
                reason="the backup was lost during the switchover; this replica won the "
                "arbiter and serves alone",
            )
        else:
            self._ended(
                done=False,
                refused=False,
                reason="the log channel to the backup broke during the switchover, and "
                "the backup had claimed the pair at the arbiter: it should serve now "
                "(check its /status)",
            )

    # -- signals -----------------------------------------------------------------

    def signalled(
        self, signum: int, on_sigterm: str, deliver: Callable[[int], None], kill: Callable[[], None]
    ) -> None:
        """A serving replica's SIGINT, SIGTERM or SIGUSR1. SIGUSR1, and a first SIGTERM
        with --on-sigterm leave, hand the service to the backup; otherwise the first
        signal reaches the guest as a logged signal (``deliver``), a second one kills it."""
        if signum == signal.SIGUSR1 or (
            signum == signal.SIGTERM and on_sigterm == "leave" and not self._signals
        ):
            if signum == signal.SIGTERM:
                self._signals += 1
            assert self.nursery is not None
            self.nursery.start_soon(self._leave_pair, signum, deliver)
            return
        self._signals += 1
        if self._signals == 1:
            self.log.info("signal_forwarded", signal=signal.Signals(signum).name)
            deliver(signum)
        else:
            kill()

    async def _leave_pair(self, signum: int, deliver: Callable[[int], None]) -> None:
        """A SIGTERM that cannot hand over stops the service, as --on-sigterm stop does."""
        name = signal.Signals(signum).name
        self.log.info("switchover_requested", signal=name)
        result = await self.ask()
        if result.done or signum != signal.SIGTERM:
            return
        self.log.warning("leave_failed_stopping", signal=name, reason=result.reason)
        deliver(signum)
