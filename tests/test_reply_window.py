"""The supervisor's window of replies written ahead of the guest's requests (replay).

Sans I/O: what ``fill`` says to write, and what ``requested`` says about each exit,
for a log of known entries; the guest's side of it (a reply naming the exit it
answers) is checked on real processes in tests/test_record_replay.py.
"""

from __future__ import annotations

import pytest

from ftproxy.core.records import Entry
from ftproxy.guest import protocol
from ftproxy.shell.supervisor import GuestFailure, ReplyWindow


def entries(count: int, size: int = 10) -> list[Entry]:
    return [Entry(seq, 100 * seq, protocol.KIND_WAIT, seq, bytes([seq % 256]) * size) for seq in
            range(1, count + 1)]  # fmt: skip


def known_from(log: list[Entry]):  # type: ignore[no-untyped-def]
    return lambda seq: log[seq - 1] if 0 < seq <= len(log) else None


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """The reply frames in ``data``: (icount, kind, digest, body) each."""
    out = []
    head = protocol.REPLY_HEAD
    while data:
        length, icount, kind, digest = head.unpack_from(data)
        out.append((icount, kind, digest, data[head.size : head.size + length]))
        data = data[head.size + length :]
    return out


FRAME = protocol.REPLY_HEAD.size + 10


def test_fills_up_to_the_byte_limit_in_order_each_reply_naming_its_exit() -> None:
    log = entries(10)
    window = ReplyWindow(known_from(log), limit_bytes=3 * FRAME + 5)
    written = frames(window.fill())
    assert [(e.icount, e.kind, e.digest, e.reply) for e in log[:3]] == written
    assert window.written == 3 and window.bytes == 3 * FRAME
    assert window.fill() == b""  # full: nothing more until the guest asks


def test_a_reply_counts_until_the_guest_asks_for_the_next_exit() -> None:
    log = entries(10)
    window = ReplyWindow(known_from(log), limit_bytes=2 * FRAME)
    window.fill()
    assert window.requested(1, log[0].reply) is True  # written ahead: not again
    assert window.fill() == b""  # reply 1 may still be in the pipe
    assert window.requested(2, log[1].reply) is True
    assert [f[0] for f in frames(window.fill())] == [300]  # reply 1 was read: room for 3
    assert window.bytes == 2 * FRAME


def test_exits_past_the_window_are_answered_when_they_come() -> None:
    log = entries(2)
    window = ReplyWindow(known_from(log), limit_bytes=10 * FRAME)
    assert len(frames(window.fill())) == 2
    assert window.requested(1, log[0].reply) and window.requested(2, log[1].reply)
    # The log has no entry 3 yet (a backup's guest is ahead of its primary, or goes live):
    assert window.fill() == b""
    assert window.requested(3, b"from the world") is False
    log.extend(entries(4)[2:])
    assert [f[0] for f in frames(window.fill())] == [400]  # then on from 4


def test_a_reply_bigger_than_the_window_is_not_written_ahead() -> None:
    log = [*entries(1), Entry(2, 200, protocol.KIND_WAIT, 0, b"x" * 1000), *entries(3)[2:]]
    window = ReplyWindow(known_from(log), limit_bytes=500)
    assert len(frames(window.fill())) == 1
    assert window.requested(1, log[0].reply)
    assert window.requested(2, log[1].reply) is False  # the supervisor writes it now
    assert [f[0] for f in frames(window.fill())] == [300]


def test_no_known_replies_means_no_window() -> None:
    window = ReplyWindow(None, limit_bytes=1 << 20)
    assert window.fill() == b""
    assert window.requested(1, b"a") is False and window.requested(2, b"b") is False


def test_stopped_it_writes_nothing_more() -> None:
    log = entries(10)
    window = ReplyWindow(known_from(log), limit_bytes=FRAME)
    window.fill()
    window.stop()
    window.requested(1, log[0].reply)
    window.requested(2, log[1].reply)
    assert window.fill() == b""


def test_a_mode_answering_other_than_what_was_written_ahead_is_caught() -> None:
    log = entries(3)
    window = ReplyWindow(known_from(log), limit_bytes=10 * FRAME)
    window.fill()
    with pytest.raises(GuestFailure, match="exit 1 was answered other than the reply"):
        window.requested(1, b"another reply")


def test_an_entry_offered_for_the_wrong_exit_is_caught() -> None:
    log = entries(3)
    window = ReplyWindow(lambda seq: log[0], limit_bytes=10 * FRAME)
    with pytest.raises(GuestFailure, match="entry 1 was offered for exit 2"):
        window.fill()  # entry 1 for exit 1, then entry 1 again for exit 2
