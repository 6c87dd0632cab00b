"""A caught-up backup's batched replay, in-process under trio's autojump clock.

The backup acknowledges each entry the moment it reads it (the primary's held
outputs wait for that), but its guest replays from the first entry after a pause
only once REPLAY_DELAY_S has passed or REPLAY_BATCH_ENTRIES have come, so the
guest and the supervisor wake once per batch. A lost primary ends the wait at
once. Driven through ``Backup.answer`` (the supervisor's side) and a real link on
a memory stream pair; virtual time makes the delays exact.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from test_link import HEADER, linked
from test_shell_timing import options

from ftproxy.core.channel import Ack, Entries, Heartbeat, Protected
from ftproxy.core.records import Entry
from ftproxy.guest.protocol import KIND_WAIT, encode_reply, wait_result
from ftproxy.shell.backup import REPLAY_BATCH_ENTRIES, REPLAY_DELAY_S, Backup
from ftproxy.shell.link import LogLink
from ftproxy.shell.logstore import LogStore
from ftproxy.shell.supervisor import Exit


def exit_at(seq: int) -> Exit:
    return Exit(100 * seq, KIND_WAIT, (), seq)


def entry_for(seq: int) -> Entry:
    """The entry that answers ``exit_at(seq)``: a wait that ended with nothing to report
    after ``seq`` ms (the clock's gain makes each reply distinct)."""
    exit = exit_at(seq)
    reply = encode_reply(seq * 1_000_000, 0, wait_result([]))
    return Entry(seq, exit.icount, exit.kind, exit.digest, reply)


class Guest:
    """The replaying guest's exits, one after another: when each was answered, and with what."""

    def __init__(self, backup: Backup) -> None:
        self.backup = backup
        self.answered: list[tuple[int, float, bytes]] = []

    async def run(self, count: int) -> None:
        for seq in range(1, count + 1):
            reply = await self.backup.answer(seq, exit_at(seq))
            self.answered.append((seq, trio.current_time(), reply))


async def replaying_backup() -> tuple[LogLink, Backup]:
    """The primary's end of a link, and the backup on its other end (its guest: a test's)."""
    primary_link, backup_link, welcome = await linked()
    return primary_link, Backup(options(), backup_link, welcome, LogStore(HEADER))


async def acks(link: LogLink, found: list[tuple[float, Ack]]) -> None:
    """Every ack the primary's end reads, with when (heartbeats are passed over)."""
    while True:
        event = await link.next_event()
        if isinstance(event, Ack):
            found.append((trio.current_time(), event))
        else:
            assert isinstance(event, Heartbeat), event


async def test_entries_are_acked_on_receipt_and_replayed_together_after_the_delay(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary_link, backup = await replaying_backup()
    guest = Guest(backup)
    found: list[tuple[float, Ack]] = []
    spacing = REPLAY_DELAY_S / 5
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backup.receive)
        nursery.start_soon(backup.send_acks)
        nursery.start_soon(acks, primary_link, found)
        nursery.start_soon(guest.run, 3)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        sent_at = []
        for seq in (1, 2, 3):
            sent_at.append(trio.current_time())
            await primary_link.send(Entries([entry_for(seq)]))
            await trio.sleep(spacing)
        assert guest.answered == []  # still gathering: the first entry came < the delay ago
        with trio.fail_after(REPLAY_DELAY_S):
            while not any(ack.replayed == 3 for _, ack in found):
                await trio.sleep(spacing / 10)
        nursery.cancel_scope.cancel()
    # Receipt: one ack per entry, each when its entry was read (no waiting for replay).
    receipts = [(when, ack.received) for when, ack in found if ack.replayed == 0]
    assert receipts == [
        (pytest.approx(when), seq) for when, seq in zip(sent_at, (1, 2, 3), strict=True)
    ]
    # Replay: the batch of three, all at once, REPLAY_DELAY_S after the first arrived.
    assert [seq for seq, _, _ in guest.answered] == [1, 2, 3]
    assert [when for _, when, _ in guest.answered] == [pytest.approx(start + REPLAY_DELAY_S)] * 3
    assert [reply for _, _, reply in guest.answered] == [entry_for(s).reply for s in (1, 2, 3)]
    # One replay ack covers the batch.
    assert [ack for _, ack in found if ack.replayed] == [Ack(3, 3)]
    assert backup.replica.replayed == 3 and backup.store.last_seq == 3


async def test_a_full_batch_replays_at_once_without_waiting_out_the_delay(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary_link, backup = await replaying_backup()
    guest = Guest(backup)
    count = REPLAY_BATCH_ENTRIES
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backup.receive)
        nursery.start_soon(backup.send_acks)
        nursery.start_soon(guest.run, count)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await primary_link.send(Entries([entry_for(seq) for seq in range(1, count + 1)]))
        await trio.testing.wait_all_tasks_blocked()  # no virtual time passes meanwhile
        nursery.cancel_scope.cancel()
    assert [seq for seq, _, _ in guest.answered] == list(range(1, count + 1))
    assert [when for _, when, _ in guest.answered] == [start] * count


async def test_the_replies_ahead_are_the_gathered_entries_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary_link, backup = await replaying_backup()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backup.receive)
        nursery.start_soon(backup.send_acks)
        await primary_link.send(Entries([entry_for(seq) for seq in (1, 2, 3)]))
        await trio.testing.wait_all_tasks_blocked()
        assert backup.replica.received == 3
        assert [backup.reply_ahead(seq) for seq in (1, 2, 3)] == [entry_for(s) for s in (1, 2, 3)]
        assert backup.reply_ahead(4) is None  # not here yet: the supervisor asks again later
        assert await backup.answer(1, exit_at(1)) == entry_for(1).reply
        assert backup.reply_ahead(1) is None and backup.reply_ahead(2) == entry_for(2)
        nursery.cancel_scope.cancel()


async def test_a_lost_primary_ends_the_wait_and_the_gathered_entries_replay_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary_link, backup = await replaying_backup()
    guest = Guest(backup)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backup.receive)
        nursery.start_soon(backup.send_acks)
        nursery.start_soon(guest.run, 2)
        # Protected: it holds the whole log, so on losing the primary it replays what it
        # has (and would go live; the guest here stops at the entries it has).
        await primary_link.send(Protected(backup.options.generation, 0))
        await trio.testing.wait_all_tasks_blocked()
        await primary_link.send(Entries([entry_for(1), entry_for(2)]))
        await trio.sleep(REPLAY_DELAY_S / 10)
        assert guest.answered == []
        lost_at = trio.current_time()
        await primary_link.aclose()  # the primary is gone: no more entries will come
        await trio.testing.wait_all_tasks_blocked()  # no virtual time passes meanwhile
        nursery.cancel_scope.cancel()
    assert backup.peer_gone.is_set()
    assert [(seq, when) for seq, when, _ in guest.answered] == [(1, lost_at), (2, lost_at)]
