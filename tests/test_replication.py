"""The replication core without I/O: roles, the output gate, lag, deadlines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ftproxy.core.replication import (
    TRANSITIONS,
    Event,
    LocalProtocolError,
    OutputGate,
    Replica,
    ReplicaRole,
    Timing,
)

PRIMARY_SIDE = (ReplicaRole.PRIMARY, ReplicaRole.HANDING_OVER, ReplicaRole.RETIRING)
TIMING = Timing(heartbeat_s=0.05, peer_timeout_s=0.5, max_lag_s=0.1, max_lag_bytes=1000)


def primary(now: float = 0.0) -> Replica[str]:
    return Replica(ReplicaRole.PRIMARY, now, TIMING)


def test_an_output_waits_for_the_ack_of_the_entry_it_follows() -> None:
    r = primary()
    r.entry_logged(1, 10, 0.0)
    r.entry_logged(2, 10, 0.0)
    assert r.output(2, "reply") == []
    assert r.ack_received(1, 0, 0.01) == []
    assert r.ack_received(2, 0, 0.02) == ["reply"]
    assert r.output(2, "after the ack") == ["after the ack"]


def test_outputs_leave_in_emission_order() -> None:
    r = primary()
    for seq in (1, 2, 3):
        r.entry_logged(seq, 1, 0.0)
    assert r.output(1, "a") == [] and r.output(2, "b") == [] and r.output(3, "c") == []
    assert r.ack_received(3, 0, 0.01) == ["a", "b", "c"]


def test_an_ack_for_an_entry_that_does_not_exist_is_refused() -> None:
    r = primary()
    r.entry_logged(1, 1, 0.0)
    with pytest.raises(LocalProtocolError):
        r.ack_received(2, 0, 0.01)


def test_winning_releases_every_held_output_and_losing_releases_none() -> None:
    won, lost = primary(), primary()
    for r in (won, lost):
        r.entry_logged(1, 1, 0.0)
        r.output(1, "held")
        r.handle(Event.PEER_LOST)
        assert r.output(1, "while arbitrating") == []
    assert won.won() == ["held", "while arbitrating"]
    assert won.role is ReplicaRole.LIVE and won.output(1, "live") == ["live"]
    assert lost.lost() == 2
    assert lost.role is ReplicaRole.HALTED and lost.output(1, "halted") == []


def test_an_ack_after_a_long_silence_releases_nothing() -> None:
    r = primary()
    r.entry_logged(1, 1, 0.0)
    assert r.output(1, "held") == []
    # The primary was stopped for longer than the timeout; the backup may be live.
    assert r.ack_received(1, 1, 0.9) == []
    assert r.role is ReplicaRole.ARBITRATING
    assert r.lost() == 1


def test_silence_past_the_timeout_means_the_peer_is_dead() -> None:
    r = primary(now=10.0)
    assert not r.peer_dead(10.4)
    assert r.next_deadline() == pytest.approx(10.05)
    assert r.heartbeat_due(10.05)
    r.heard(10.3)
    assert not r.peer_dead(10.7)
    assert r.peer_dead(10.8)


def test_lag_past_the_bound_stops_input_until_the_backup_replays() -> None:
    r = primary()
    r.entry_logged(1, 600, 0.0)
    r.entry_logged(2, 600, 0.01)
    assert r.lag(0.05) == (2, 1200, pytest.approx(0.05))
    assert r.lag_exceeded(0.05)  # bytes
    r.ack_received(2, 1, 0.06)
    assert r.lag(0.06) == (1, 600, pytest.approx(0.05))
    assert not r.lag_exceeded(0.06)
    assert r.lag_exceeded(0.2)  # time
    r.ack_received(2, 2, 0.2)
    assert r.lag(0.2) == (0, 0, 0.0)


def test_transitions_not_in_the_table_are_refused() -> None:
    for role in ReplicaRole:
        for event in Event:
            r = primary()
            r.role = role
            if (role, event) in TRANSITIONS:
                assert r.handle(event) is TRANSITIONS[role, event]
            else:
                with pytest.raises(LocalProtocolError):
                    r.handle(event)


def test_bad_timing_is_refused() -> None:
    with pytest.raises(ValueError):
        Timing(heartbeat_s=0.5, peer_timeout_s=0.5)


@given(st.lists(st.tuples(st.integers(0, 5), st.text(max_size=3)), max_size=30))
def test_the_gate_releases_exactly_the_acknowledged_prefix(items: list[tuple[int, str]]) -> None:
    gate: OutputGate[tuple[int, str]] = OutputGate()
    seq = 0
    held: list[tuple[int, str]] = []
    for step, text in items:
        seq += step
        gate.hold(seq, (seq, text))
        held.append((seq, text))
    released = gate.ack(seq // 2)
    assert released == [h for h in held if h[0] <= seq // 2]
    assert gate.release_all() == [h for h in held if h[0] > seq // 2]


def drained_handover() -> Replica[str]:
    r = primary()
    r.entry_logged(1, 10, 0.0)
    assert r.output(1, "before") == []
    r.ask_handover()
    assert r.role is ReplicaRole.HANDING_OVER
    # The exit answered as the handover began may still log its entry.
    r.entry_logged(2, 10, 0.01)
    assert r.output(2, "made before the hold") == []
    assert not r.drained()
    with pytest.raises(LocalProtocolError):
        r.handover_sent()
    assert r.ack_received(2, 1, 0.02) == ["before", "made before the hold"]
    assert not r.drained()  # received, not yet replayed
    r.ack_received(2, 2, 0.03)
    assert r.drained()
    return r


def test_a_handover_waits_for_every_entry_acked_and_replayed_then_releases_nothing() -> None:
    r = drained_handover()
    r.handover_sent()
    assert r.role is ReplicaRole.RETIRING
    assert r.output(2, "after the handover") == []
    with pytest.raises(LocalProtocolError):
        r.entry_logged(3, 1, 0.04)
    assert r.heartbeat_due(0.1) and not r.peer_dead(0.1)
    r.handed_over()
    assert r.role is ReplicaRole.HANDED_OVER and r.output(2, "gone") == []
    assert r.next_deadline() == float("inf")


def test_a_handover_that_does_not_drain_is_aborted_and_the_primary_goes_on() -> None:
    r = primary()
    r.entry_logged(1, 10, 0.0)
    r.ask_handover()
    r.abort_handover()
    assert r.role is ReplicaRole.PRIMARY
    assert r.output(1, "held") == [] and r.ack_received(1, 0, 0.01) == ["held"]


def test_a_backup_lost_during_a_handover_is_arbitrated_as_at_a_failover() -> None:
    for sent in (False, True):
        r = drained_handover()
        if sent:
            r.handover_sent()
        assert r.peer_dead(0.6)
        assert r.ack_received(2, 2, 0.6) == []  # after the timeout: arbitrate first
        assert r.role is ReplicaRole.ARBITRATING
        assert r.won() == [] and r.role is ReplicaRole.LIVE


def test_only_a_primary_hands_over_and_a_backup_claims_through_the_arbiter() -> None:
    for role in (ReplicaRole.BACKUP, ReplicaRole.LIVE):
        with pytest.raises(LocalProtocolError):
            Replica(role, 0.0, TIMING).ask_handover()
    b: Replica[str] = Replica(ReplicaRole.BACKUP, 0.0, TIMING)
    b.handover_received()
    assert b.role is ReplicaRole.ARBITRATING
    assert b.won() == [] and b.output(0, "live") == ["live"]


class PrimaryMachine(RuleBasedStateMachine):
    """Random histories of a primary: the output rule and the halting rule always hold."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.replica: Replica[int] = primary()
        self.emitted: list[tuple[int, int]] = []  # (seq it follows, id)
        self.sent: list[int] = []
        self.acked = 0
        self.halted_at: int | None = None
        self.retired_at: int | None = None  # outputs sent when Handover went

    def _send(self, outputs: list[int]) -> None:
        if self.replica.role is ReplicaRole.HALTED:
            assert outputs == []
        self.sent.extend(outputs)

    @rule(dt=st.floats(0, 0.3))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.replica.role in (ReplicaRole.PRIMARY, ReplicaRole.HANDING_OVER))
    @rule(size=st.integers(1, 400))
    def log_an_entry(self, size: int) -> None:
        self.replica.entry_logged(self.replica.logged + 1, size, self.now)

    @precondition(lambda self: self.replica.role is not ReplicaRole.HALTED)
    @rule()
    def emit_an_output(self) -> None:
        ident = len(self.emitted)
        self.emitted.append((self.replica.logged, ident))
        self._send(self.replica.output(self.replica.logged, ident))

    @precondition(lambda self: self.replica.role in PRIMARY_SIDE and self.replica.logged)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        received = data.draw(st.integers(self.acked, self.replica.logged))
        replayed = data.draw(st.integers(0, received))
        self.acked = received
        self._send(self.replica.ack_received(received, replayed, self.now))

    @precondition(lambda self: self.replica.role in PRIMARY_SIDE)
    @rule()
    def lose_the_peer(self) -> None:
        self.replica.handle(Event.PEER_LOST)

    @precondition(lambda self: self.replica.role is ReplicaRole.PRIMARY)
    @rule()
    def ask_for_a_handover(self) -> None:
        self.replica.ask_handover()

    @precondition(lambda self: self.replica.role is ReplicaRole.HANDING_OVER)
    @rule()
    def abort_the_handover(self) -> None:
        self.replica.abort_handover()

    @precondition(lambda self: self.replica.drained())
    @rule()
    def send_the_handover(self) -> None:
        self.replica.handover_sent()
        self.retired_at = len(self.sent)
        with pytest.raises(LocalProtocolError):
            self.replica.entry_logged(self.replica.logged + 1, 1, self.now)

    @precondition(lambda self: self.replica.role is ReplicaRole.RETIRING)
    @rule()
    def the_backup_took_over(self) -> None:
        self.replica.handed_over()

    @precondition(lambda self: self.replica.role is ReplicaRole.ARBITRATING)
    @rule(won=st.booleans())
    def arbiter_answers(self, won: bool) -> None:
        if won:
            self._send(self.replica.won())
        else:
            self.replica.lost()
            self.halted_at = len(self.sent)

    @invariant()
    def only_acknowledged_or_solo_outputs_left(self) -> None:
        for ident in self.sent:
            seq, _ = self.emitted[ident]
            assert seq <= self.acked or self.replica.role is ReplicaRole.LIVE

    @invariant()
    def outputs_leave_in_order_and_once(self) -> None:
        assert self.sent == sorted(set(self.sent))

    @invariant()
    def a_halted_replica_sends_nothing_more(self) -> None:
        if self.halted_at is not None:
            assert len(self.sent) == self.halted_at

    @invariant()
    def nothing_leaves_after_the_handover_unless_this_replica_won(self) -> None:
        if self.retired_at is not None and self.replica.role is not ReplicaRole.LIVE:
            assert len(self.sent) == self.retired_at


TestPrimaryMachine = PrimaryMachine.TestCase
