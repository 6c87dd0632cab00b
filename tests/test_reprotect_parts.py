"""The pieces of re-protection without a pair: the core's catch-up rules, the log store
and its data dir, and the arbiter lookups of ``ftproxy run`` (against a real arbiter)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import arbiter
from ftproxy.core.records import Entry, Header, Output, Policy
from ftproxy.core.replication import (
    CATCH_UP_SILENCE_S,
    CATCH_UP_SLACK_ENTRIES,
    LocalProtocolError,
    Replica,
    ReplicaRole,
    Timing,
)
from ftproxy.guest import protocol as p
from ftproxy.log.file import read_log
from ftproxy.shell.arbiter_client import ArbiterClient, generation_key, log_address_of
from ftproxy.shell.logstore import DataDirError, LogStore, LogStoreError, open_data_dir
from ftproxy.shell.options import ReplicaOptions
from ftproxy.shell.world import new_header, output_record

TIMING = Timing(heartbeat_s=0.05, peer_timeout_s=0.5, max_lag_s=0.1, max_lag_bytes=1000)


def live_with(entries: int) -> Replica[str]:
    r: Replica[str] = Replica(ReplicaRole.LIVE, 0.0, TIMING)
    for seq in range(1, entries + 1):
        r.entry_logged(seq, 10, 0.0)
    return r


# -- the core ----------------------------------------------------------------------


def test_a_live_replica_releases_at_once_while_a_joiner_catches_up() -> None:
    r = live_with(5)
    r.joiner_attached(1.0)
    assert r.output(5, "reply") == ["reply"]
    assert not r.caught_up()
    r.ack_received(5, 0, 1.1)
    assert r.catch_up_behind() is False  # 5 unreplayed: within the slack
    assert r.caught_up()


def test_a_joiner_is_caught_up_only_with_every_entry_and_nearly_all_replayed() -> None:
    r = live_with(CATCH_UP_SLACK_ENTRIES + 10)
    r.joiner_attached(0.0)
    r.ack_received(r.logged, 0, 0.1)
    assert not r.caught_up() and r.catch_up_behind()
    r.ack_received(r.logged, 10, 0.2)
    assert r.caught_up() and not r.catch_up_behind()
    r.entry_logged(r.logged + 1, 10, 0.3)  # one more entry logged: not yet
    assert not r.caught_up()


def test_once_protected_outputs_wait_for_the_new_backup_again() -> None:
    r = live_with(3)
    r.joiner_attached(0.0)
    r.ack_received(3, 1, 0.1)
    r.protect(0.1, [(2, 10), (3, 10)])
    assert r.role is ReplicaRole.PRIMARY
    assert r.lag(0.1)[:2] == (2, 20)  # the joiner's replay lag, counted from now
    r.entry_logged(4, 10, 0.2)
    assert r.output(4, "held") == []
    assert r.ack_received(4, 3, 0.3) == ["held"]


def test_protecting_before_the_joiner_caught_up_is_refused() -> None:
    r = live_with(3)
    r.joiner_attached(0.0)
    r.ack_received(2, 2, 0.1)
    with pytest.raises(LocalProtocolError):
        r.protect(0.1, [])


def test_a_silent_joiner_is_noticed_and_dropped_the_replica_stays_live() -> None:
    r = live_with(3)
    assert r.next_deadline() == float("inf")  # alone, nobody to watch
    r.joiner_attached(1.0)
    # Catching up, it protects nothing: its silence is judged on the longer bound.
    assert r.silence_limit_s == CATCH_UP_SILENCE_S > TIMING.peer_timeout_s
    assert r.next_deadline() == 1.0 + TIMING.heartbeat_s
    r.sent(1.0 + CATCH_UP_SILENCE_S)
    assert r.next_deadline() == 1.0 + CATCH_UP_SILENCE_S
    assert not r.peer_dead(1.0 + TIMING.peer_timeout_s)
    assert not r.peer_dead(0.9 + CATCH_UP_SILENCE_S) and r.peer_dead(1.0 + CATCH_UP_SILENCE_S)
    r.joiner_detached()
    assert r.role is ReplicaRole.LIVE and not r.peer_dead(10.0)
    assert r.output(3, "still released") == ["still released"]


def test_once_protected_the_new_backup_is_judged_on_the_peer_timeout_again() -> None:
    r = live_with(3)
    r.joiner_attached(0.0)
    r.ack_received(3, 3, 0.1)
    r.protect(0.1, [])
    assert r.silence_limit_s == TIMING.peer_timeout_s
    assert not r.peer_dead(0.5) and r.peer_dead(0.1 + TIMING.peer_timeout_s)


def test_a_joiner_judges_the_live_replica_on_the_long_bound_until_protected() -> None:
    joiner: Replica[str] = Replica(ReplicaRole.BACKUP, 0.0, TIMING)
    assert joiner.awaiting_protection and joiner.silence_limit_s == CATCH_UP_SILENCE_S
    assert not joiner.peer_dead(TIMING.peer_timeout_s) and joiner.peer_dead(CATCH_UP_SILENCE_S)
    joiner.protection_received()  # from here it may go live: the peer timeout again
    assert joiner.silence_limit_s == TIMING.peer_timeout_s
    assert joiner.peer_dead(TIMING.peer_timeout_s)


def test_only_a_live_replica_takes_a_joiner_and_one_at_a_time() -> None:
    backup: Replica[str] = Replica(ReplicaRole.BACKUP, 0.0, TIMING)
    with pytest.raises(LocalProtocolError):
        backup.joiner_attached(0.0)
    r = live_with(1)
    r.joiner_attached(0.0)
    with pytest.raises(LocalProtocolError):
        r.joiner_attached(0.1)


# -- the log store -----------------------------------------------------------------


def header() -> Header:
    return new_header(["kv.py"], {}, Policy(p.DEFAULT_EXIT_EVERY, p.DEFAULT_CLOCK_STEP_NS))


def entry(seq: int) -> Entry:
    return Entry(seq, seq * 10, p.KIND_WAIT, 0, b"reply %d" % seq)


def test_the_store_writes_a_log_that_reads_back_with_outputs_in_place(tmp_path: Path) -> None:
    path = open_data_dir(tmp_path / "d", "kv")
    assert path is not None
    store = LogStore(header(), path)
    store.append_entry(entry(1))
    store.append_output(output_record(1, (p.OP_SEND, 7, b"+OK\r\n")))
    store.append_entry(entry(2))
    store.close()
    contents = read_log(path)
    assert [type(r) for r in contents.records] == [Entry, Output, Entry]
    assert contents.entries == 2 and store.last_seq == 2 and store.bytes == 14


def test_entries_out_of_order_are_a_local_error(tmp_path: Path) -> None:
    store = LogStore(header())
    store.append_entry(entry(1))
    with pytest.raises(LogStoreError):
        store.append_entry(entry(3))


def test_a_data_dir_names_its_pair_and_keeps_the_previous_log(tmp_path: Path) -> None:
    data = tmp_path / "d"
    first = open_data_dir(data, "kv")
    assert first is not None
    first.write_bytes(b"an earlier run")
    assert open_data_dir(data, "kv") == first
    assert (data / "previous.ftlog").read_bytes() == b"an earlier run"
    with pytest.raises(DataDirError, match="holds the log of pair 'kv', not 'payments'"):
        open_data_dir(data, "payments")


def test_a_failed_write_is_reported_and_the_store_goes_on_in_memory() -> None:
    store = LogStore(header(), Path("/dev/full"))  # every write: ENOSPC
    for seq in range(1, 4):
        store.append_entry(entry(seq))
    store.flush()
    assert store.error is not None and "the disk is full" in store.error
    assert not store.on_disk
    store.append_entry(entry(4))  # memory still takes it, for the next joiner
    assert store.last_seq == 4


# -- ftproxy run's lookups at a real arbiter ---------------------------------------


def options(port: int, log_port: int) -> ReplicaOptions:
    return ReplicaOptions(
        argv=["kv.py"],
        arbiter=arbiter.connect(("127.0.0.1", port), None),
        secret=None,
        pair="kv",
        log_listen=("127.0.0.1", log_port),
    )


async def test_two_nodes_claiming_at_once_one_boots_and_both_find_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    port = await nursery.start(arbiter.serve, "127.0.0.1", 0, tmp_path / "arb", None)
    a, b = ArbiterClient(options(port, 7100), "node"), ArbiterClient(options(port, 7101), "node")
    assert await a.find_live() is None
    decisions: list[arbiter.Decision] = []

    async def claim(client: ArbiterClient) -> None:
        decisions.append(await client.claim_boot())

    async with trio.open_nursery() as both:
        both.start_soon(claim, a)
        both.start_soon(claim, b)
    assert sorted(d.won for d in decisions) == [False, True]
    live = await b.find_live()
    assert live is not None and live.generation == 0
    assert live.log_address in (("127.0.0.1", 7100), ("127.0.0.1", 7101))
    # Generation 2 decided later (after a re-protection and a failover): it is the live one.
    for generation, winner in ((1, "backup@h:1 log=10.0.0.2:7100"), (2, "live@h:2 log=h3:7")):
        await arbiter.test_and_set(
            ("127.0.0.1", port), generation_key("kv", generation), winner, None
        )
    live = await a.find_live()
    assert live is not None and live.generation == 2 and live.log_address == ("h3", 7)


def test_a_winner_without_a_log_address_has_none() -> None:
    assert log_address_of("primary@host:12") is None
    assert log_address_of("backup@host:12 log=10.0.0.1:7100") == ("10.0.0.1", 7100)
