"""Silence is judged after reading what arrived (shell.replica.ReplicaShell.watch), in-process.

A replica that was itself stopped resumes with its peer's frames waiting in
its socket and its peer deadline already past: it must read them before it
judges the silence. ``time.sleep`` stands in for SIGSTOP here: it stops the
whole event loop, as a stopped process is stopped.
"""

from __future__ import annotations

import socket
import time

import trio
import trio.testing

from ftproxy.core.channel import BACKUP, NEED_DATA, PRIMARY, Channel, Heartbeat, Join, Welcome
from ftproxy.core.records import Header, Policy
from ftproxy.core.replication import ReplicaRole, Timing
from ftproxy.shell.link import LogLink
from ftproxy.shell.options import ReplicaOptions
from ftproxy.shell.replica import ReplicaShell

TIMING = Timing(heartbeat_s=0.02, peer_timeout_s=0.1)
HEADER = Header(2, ["kv.py"], {}, "/", "3.11", Policy(200, 1000), 0)


def streaming_pair() -> tuple[Channel, Channel]:
    backup, primary = Channel(BACKUP, None), Channel(PRIMARY, None)
    for source, target in ((backup, primary), (primary, backup), (backup, primary)):
        target.receive_data(source.data_to_send())
        while target.next_event() is not NEED_DATA:
            pass
    primary.receive_data(backup.send(Join(["kv.py"])))
    primary.next_event()
    backup.receive_data(primary.send(Welcome("pair", 1, HEADER)))
    backup.next_event()
    return backup, primary


async def one_stall() -> bool:
    """Stop the loop past the peer deadline with a heartbeat waiting; True if the peer
    was declared dead before that heartbeat was read."""
    mine, theirs = socket.socketpair()
    ours = trio.socket.from_stdlib_socket(mine)
    backup, primary = streaming_pair()
    link = LogLink(trio.SocketStream(ours), primary)
    options = ReplicaOptions(argv=["kv.py"], arbiter=("127.0.0.1", 9), secret=None, timing=TIMING)
    shell = ReplicaShell(options, ReplicaRole.PRIMARY, link)
    read = trio.Event()
    dead_before_read: list[bool] = []

    async def receive() -> None:
        await link.next_event()
        dead_before_read.append(shell.peer_gone.is_set())
        shell.replica.heard(trio.current_time())
        read.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        nursery.start_soon(shell.watch)
        await trio.testing.wait_all_tasks_blocked()
        theirs.send(backup.send(Heartbeat()))  # no checkpoint: it waits unread, while
        time.sleep(TIMING.peer_timeout_s * 1.5)  # stopped: no checkpoint, nothing runs
        await read.wait()
        nursery.cancel_scope.cancel()
    theirs.close()
    return dead_before_read[0]


async def test_a_stopped_replica_reads_its_peers_frames_before_judging_the_silence() -> None:
    declared = [await one_stall() for _ in range(20)]
    assert not any(declared), f"declared dead in {sum(declared)} of 20 stalls"
