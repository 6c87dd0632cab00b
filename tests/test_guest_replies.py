"""The guest's side of the reply pipe: replies read in batches, whatever the reads return.

A replaying supervisor writes replies ahead, so one read of the guest's can end
inside a reply whose start it already holds; the next exit must still find that
reply whole (a stale offset there once made a replaying guest read a reply of
0 bytes and diverge: packet mode under loss, tests/test_packet_failover.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ftproxy.guest import protocol
from ftproxy.guest._runtime import Runtime


@pytest.fixture
def pipes() -> Iterator[tuple[Runtime, int]]:
    """A runtime on real pipes, and the write end of its replies."""
    replies_r, replies_w = os.pipe()
    requests_r, requests_w = os.pipe()
    yield Runtime(reply_fd=replies_r, request_fd=requests_w), replies_w
    for fd in (replies_r, replies_w, requests_r, requests_w):
        os.close(fd)


def reply(result: object) -> bytes:
    return protocol.reply_frame(protocol.ANY_EXIT, 0, 0, protocol.encode_body((0, result)))


@pytest.mark.parametrize(
    "split", [1, protocol.REPLY_HEAD.size, protocol.REPLY_HEAD.size + 7, 30_000]
)
def test_a_reply_split_across_reads_after_another_reply_is_read_whole(
    pipes: tuple[Runtime, int], split: int
) -> None:
    runtime, replies = pipes
    first, second = reply("first"), reply("x" * 40_000)
    os.write(replies, first + second[:split])  # one read takes the first and part of the second
    assert runtime.exit(protocol.KIND_WAIT, ()) == "first"
    os.write(replies, second[split:])
    assert runtime.exit(protocol.KIND_WAIT, ()) == "x" * 40_000


def test_many_replies_in_one_read_come_out_one_per_exit(pipes: tuple[Runtime, int]) -> None:
    runtime, replies = pipes
    os.write(replies, b"".join(reply(n) for n in range(50)))
    assert [runtime.exit(protocol.KIND_WAIT, ()) for _ in range(50)] == list(range(50))
