"""Silence is judged after reading what arrived (ftproxy.replica.ReplicaShell.watch), in-process.

A replica that was itself stopped resumes with its peer's frames waiting in
its socket and its peer deadline already past: it must read them before it
judges the silence. ``time.sleep`` stands in for SIGSTOP here: it stops the
whole event loop, as a stopped process is stopped.
"""

from __future__ import annotations

import socket
import time

import trio

from ftproxy.channel import BACKUP, NEED_DATA, PRIMARY, Channel, Heartbeat, Join, Welcome
from ftproxy.link import LogLink
from ftproxy.replica import ReplicaOptions, ReplicaShell
from ftproxy.replication import Role, Timing
from ftproxy.wire import Header, Policy

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
    """Stop the loop past the peer deadline with heartbeats waiting; True if the peer
    was declared dead."""
    mine, theirs = socket.socketpair()
    ours = trio.socket.from_stdlib_socket(mine)
    backup, primary = streaming_pair()
    link = LogLink(trio.SocketStream(ours), primary)
    options = ReplicaOptions(argv=["kv.py"], arbiter=("127.0.0.1", 9), secret=None, timing=TIMING)
    shell = ReplicaShell(options, Role.PRIMARY, link)

    async def receive() -> None:
        while True:
            await link.next_event()
            shell.replica.heard(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        nursery.start_soon(shell.watch)
        await trio.sleep(TIMING.heartbeat_s)
        theirs.send(backup.send(Heartbeat()))  # no checkpoint: it waits unread, while
        time.sleep(TIMING.peer_timeout_s * 1.5)  # stopped: no checkpoint, nothing runs
        await trio.sleep(TIMING.heartbeat_s / 2)
        dead = shell.peer_gone.is_set()
        nursery.cancel_scope.cancel()
    theirs.close()
    return dead


async def test_a_stopped_replica_reads_its_peers_frames_before_judging_the_silence() -> None:
    declared = [await one_stall() for _ in range(20)]
    assert not any(declared), f"declared dead in {sum(declared)} of 20 stalls"
