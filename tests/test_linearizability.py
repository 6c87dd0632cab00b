"""The soak's linearizability checker on known good and known bad histories.

Good histories come from a real sequential execution: operations are applied one
by one at their linearization points, and each one's recorded interval is
stretched around its point (so concurrent clients overlap); some operations get
no reply (pending), and of those some took effect and some did not. Bad ones
are mutations that no order can explain: a read of a value never written, a
read of a value overwritten before the read began, two INCRs answering the same
value, a counter read lower than the INCRs completed before it.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.linearizability import (
    GET,
    INCR,
    SET,
    Counter,
    Operation,
    Register,
    check,
    check_key,
)

ROOT = Path(__file__).resolve().parent.parent


def op(
    kind: str,
    invoked: float,
    completed: float | None,
    result: str | int | None = None,
    value: str | None = None,
    key: str = "reg:a",
    client: int = 0,
) -> Operation:
    return Operation(client, key, kind, value, invoked, completed, result)


def reg(*ops: Operation) -> bool:
    return check_key("reg:a", ops, Register()).linearizable


def ctr(*ops: Operation) -> bool:
    return check_key("ctr:a", [replace(o, key="ctr:a") for o in ops], Counter()).linearizable


# --- hand-written histories ------------------------------------------------------------


def test_sequential_register_history_is_linearizable() -> None:
    assert reg(
        op(GET, 0, 1, None),
        op(SET, 2, 3, "OK", "x"),
        op(GET, 4, 5, "x"),
        op(SET, 6, 7, "OK", "y"),
        op(GET, 8, 9, "y"),
    )


def test_concurrent_reads_may_see_either_side_of_a_write() -> None:
    # The write spans both reads, which overlap: one sees the old value, one the new.
    assert reg(op(SET, 0, 10, "OK", "x"), op(GET, 1, 3, "x"), op(GET, 2, 4, None))
    # Old then new one after the other is fine; new then old is not.
    assert reg(op(SET, 0, 10, "OK", "x"), op(GET, 1, 2, None), op(GET, 3, 4, "x"))
    assert not reg(op(SET, 0, 10, "OK", "x"), op(GET, 1, 2, "x"), op(GET, 3, 4, None))


def test_read_of_a_value_never_written_is_a_violation() -> None:
    verdict = check_key("reg:a", [op(SET, 0, 1, "OK", "x"), op(GET, 2, 3, "z")], Register())
    assert not verdict.linearizable
    assert verdict.stuck_at is not None and verdict.stuck_at["result"] == "z"
    assert verdict.states == ["x"]


def test_stale_read_after_a_completed_write_is_a_violation() -> None:
    assert not reg(op(SET, 0, 1, "OK", "x"), op(SET, 2, 3, "OK", "y"), op(GET, 4, 5, "x"))
    # Overlapping the second write, the old value is fine.
    assert reg(op(SET, 0, 1, "OK", "x"), op(SET, 2, 5, "OK", "y"), op(GET, 4, 6, "x"))


def test_pending_write_may_or_may_not_have_taken_effect() -> None:
    taken = (op(SET, 0, 1, "OK", "x"), op(SET, 2, None, value="y"), op(GET, 5, 6, "y"))
    not_taken = (op(SET, 0, 1, "OK", "x"), op(SET, 2, None, value="y"), op(GET, 5, 6, "x"))
    assert reg(*taken) and reg(*not_taken)
    # Once observed, it cannot be un-observed by a later read.
    assert not reg(*taken, op(GET, 7, 8, "x"))
    # Nor seen before it was invoked.
    assert not reg(op(GET, 0, 1, "y"), op(SET, 2, None, value="y"))


def test_counter_history_and_its_violations() -> None:
    good = (op(INCR, 0, 1, 1), op(INCR, 2, 4, 2), op(GET, 3, 5, "1"), op(GET, 6, 7, "2"))
    assert ctr(*good)
    assert ctr(op(GET, 0, 1, None), op(INCR, 2, 3, 1))
    # Going backwards: a read lower than one completed before it.
    assert not ctr(*good, op(GET, 8, 9, "1"))
    # A lost INCR: two acknowledged INCRs, a later read sees one.
    assert not ctr(op(INCR, 0, 1, 1), op(INCR, 2, 3, 2), op(GET, 4, 5, "1"))
    # Two INCRs cannot both answer 1, concurrent or not.
    assert not ctr(op(INCR, 0, 3, 1), op(INCR, 1, 2, 1))


def test_pending_incrs_count_only_where_observed() -> None:
    pending = [op(INCR, 0.5 + i, None) for i in range(30)]
    # Any number of them may have taken effect: 0, 7, all 30.
    for seen in (0, 7, 30):
        assert ctr(op(INCR, 0, 1, 1), *pending, op(GET, 40, 41, str(seen + 1)))
    # ... but never more than were invoked before the read.
    assert not ctr(op(INCR, 0, 1, 1), *pending, op(GET, 40, 41, "32"))
    # A pending INCR invoked after a read cannot explain it.
    assert not ctr(op(GET, 0, 1, "1"), op(INCR, 2, None))


def test_errors_name_the_operation_and_keys_are_independent() -> None:
    history = [
        op(SET, 0, 1, "OK", "x", key="reg:1"),
        op(GET, 2, 3, "x", key="reg:1"),
        op(SET, 0, 1, "OK", "x", key="reg:2"),
        op(GET, 2, 3, "x", key="reg:1"),
        op(GET, 2, 3, "q", key="reg:2", client=7),
    ]
    verdict = check(history)
    assert not verdict.linearizable
    assert [k.key for k in verdict.violations] == ["reg:2"]
    report = verdict.as_dict()
    assert report["operations"] == 5 and report["keys"] == 2
    assert report["violations"][0]["stuck_at"]["client"] == 7


# --- generated histories ----------------------------------------------------------------


@st.composite
def executions(draw: st.DrawFn, counter: bool) -> list[Operation]:
    """A history from a real sequential execution of one object, intervals stretched."""
    n = draw(st.integers(1, 60))
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    state: str | int | None = 0 if counter else None
    ops: list[Operation] = []
    key = "ctr:k" if counter else "reg:k"
    for point in range(n):
        t = float(point)
        write = rng.random() < 0.5
        kind = (INCR if write else GET) if counter else (SET if write else GET)
        value = f"v{point}" if kind == SET else None
        pending = rng.random() < 0.15
        took_effect = not pending or rng.random() < 0.5
        result: str | int | None
        if kind == SET:
            if took_effect:
                state = value
            result = "OK"
        elif kind == INCR:
            assert isinstance(state, int)
            if took_effect:
                state += 1
            result = state
        else:
            result = (str(state) if state else None) if counter else state
        invoked = t - rng.uniform(0, 3)
        completed = None if pending else t + rng.uniform(0, 3)
        ops.append(
            Operation(point % 5, key, kind, value, invoked, completed, None if pending else result)
        )
    return ops


@settings(max_examples=300, deadline=None)
@given(executions(counter=False))
def test_real_register_executions_are_linearizable(history: list[Operation]) -> None:
    verdict = check(history)
    assert verdict.linearizable, verdict.as_dict()


@settings(max_examples=300, deadline=None)
@given(executions(counter=True))
def test_real_counter_executions_are_linearizable(history: list[Operation]) -> None:
    verdict = check(history)
    assert verdict.linearizable, verdict.as_dict()


def _end(history: list[Operation]) -> float:
    return max(max(o.invoked, o.completed or o.invoked) for o in history) + 1


@settings(max_examples=200, deadline=None)
@given(executions(counter=False), st.integers(0, 10**6))
def test_a_read_of_a_value_never_written_is_found(history: list[Operation], pick: int) -> None:
    reads = [i for i, o in enumerate(history) if o.kind == GET and not o.pending]
    if not reads:
        history.append(op(GET, _end(history), _end(history) + 1, None, key="reg:k"))
        reads = [len(history) - 1]
    i = reads[pick % len(reads)]
    history[i] = replace(history[i], result="never-written")
    assert not check(history).linearizable


@settings(max_examples=200, deadline=None)
@given(executions(counter=False), st.integers(0, 10**6))
def test_a_stale_read_is_found(history: list[Operation], pick: int) -> None:
    # SET s1 completed before a completed SET s2 began: after both, s1's value is stale.
    done = [o for o in history if o.kind == SET and not o.pending]
    stale = [a for a in done if any(b.invoked > (a.completed or 0) for b in done)]
    if not stale:
        end = _end(history)
        history += [
            op(SET, end, end + 1, "OK", "s1", key="reg:k"),
            op(SET, end + 2, end + 3, "OK", "s2", key="reg:k"),
        ]
        stale = [history[-2]]
    old = stale[pick % len(stale)]
    end = _end(history)
    history.append(op(GET, end, end + 1, old.value, key="reg:k"))
    assert not check(history).linearizable


@settings(max_examples=200, deadline=None)
@given(executions(counter=True), st.integers(0, 10**6))
def test_a_counter_going_backwards_or_losing_an_incr_is_found(
    history: list[Operation], pick: int
) -> None:
    acked = sum(1 for o in history if o.kind == INCR and not o.pending)
    if acked == 0:
        end = _end(history)
        pending = sum(1 for o in history if o.kind == INCR)
        # An INCR after everything answers at least 1, at most 1 + the pending ones.
        history.append(op(INCR, end, end + 1, 1 + pick % (pending + 1), key="ctr:k"))
        acked = 1
    # After everything, fewer than the acknowledged INCRs: a lost write.
    end = _end(history)
    lower = pick % acked
    history.append(op(GET, end, end + 1, str(lower) if lower else None, key="ctr:k"))
    assert not check(history).linearizable


@settings(max_examples=200, deadline=None)
@given(executions(counter=True), st.integers(0, 10**6))
def test_two_incrs_answering_the_same_value_are_found(history: list[Operation], pick: int) -> None:
    incrs = [i for i, o in enumerate(history) if o.kind == INCR and not o.pending]
    if len(incrs) < 2:
        return
    a, b = random.Random(pick).sample(incrs, 2)
    history[b] = replace(history[b], result=history[a].result)
    assert not check(history).linearizable


# --- scale and the command ------------------------------------------------------------


def _soak_like(keys: int, per_key: int, clients: int, seed: int) -> list[Operation]:
    """Many overlapping clients on a few keys, a pending op every 50: a soak's shape."""
    rng = random.Random(seed)
    history: list[Operation] = []
    for k in range(keys):
        counter = k % 2 == 1
        key = f"ctr:{k}" if counter else f"reg:{k}"
        state: str | int | None = 0 if counter else None
        for point in range(per_key):
            t = point * 0.001
            kind = rng.choice((INCR, GET) if counter else (SET, GET))
            value = f"{k}-{point}" if kind == SET else None
            pending = point % 50 == 25
            result: str | int | None
            if kind == SET:
                state, result = value, "OK"
            elif kind == INCR:
                assert isinstance(state, int)
                state += 1
                result = state
            else:
                result = (str(state) if state else None) if counter else state
            span = 0.001 * clients
            history.append(
                Operation(
                    point % clients,
                    key,
                    kind,
                    value,
                    t - rng.uniform(0, span),
                    None if pending else t + rng.uniform(0, span),
                    None if pending else result,
                )
            )
    return history


@pytest.mark.timeout(120)
def test_tens_of_thousands_of_operations_are_checked() -> None:
    history = _soak_like(keys=4, per_key=10_000, clients=4, seed=1)
    verdict = check(history)
    assert verdict.linearizable
    assert verdict.as_dict()["operations"] == 40_000
    # And the same history with one read made stale is not.
    i = next(
        i
        for i, o in enumerate(history)
        if o.kind == GET and o.key == "reg:0" and i > 9_000 and o.result
    )
    history[i] = replace(history[i], result="0-1")
    verdict = check(history)
    assert [k.key for k in verdict.violations] == ["reg:0"]


def test_the_command_checks_a_saved_history(tmp_path: Path) -> None:
    good = [op(SET, 0, 1, "OK", "x"), op(GET, 2, 3, "x")]
    path = tmp_path / "history.json"
    path.write_text(json.dumps([o.as_dict() for o in good]))
    done = subprocess.run(
        [sys.executable, "-m", "bench.linearizability", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["linearizable"] is True
    path.write_text(json.dumps([o.as_dict() for o in [*good, op(GET, 4, 5, "y")]]))
    done = subprocess.run(
        [sys.executable, "-m", "bench.linearizability", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert json.loads(done.stdout)["violations"][0]["stuck_at"]["result"] == "y"
    path.write_text("not json")
    done = subprocess.run(
        [sys.executable, "-m", "bench.linearizability", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "cannot read" in done.stderr
