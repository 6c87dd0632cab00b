"""A linearizability checker for key-value histories: Wing & Gong's search, Lowe's cache.

A history is a list of operations, each with the moment its client invoked it,
the moment the reply came (None: it never came: the connection broke or the
reply was an error, so the operation may or may not have taken effect) and the
reply. The history is linearizable if there is one total order of the
operations (every completed one, and any subset of the pending ones) that
respects real time (an operation that completed before another was invoked
comes first) and in which every reply is the one a sequential object gives.

Keys are independent objects (P-compositionality: the history is linearizable
if and only if every key's sub-history is), so the check runs key by key. Per
key, the search is the one of Wing & Gong as refined by Lowe and by Porcupine:
a doubly linked list of call and return entries in time order, a depth-first
search that linearizes a call whose model step is legal and backtracks at a
return whose operation is not yet linearized, and a cache of (linearized set,
model state) pairs already explored, which makes it fast on real histories.

Pending operations never return, so they may take effect anywhere after their
invocation, or never (taking effect after the last completed operation is the
same as never). Two reductions keep them cheap, both exact:

- a pending GET has no effect and nothing observed it: it is dropped;
- registers: a pending SET whose value no GET returned is dropped; one whose
  value was read must have taken effect before the first of those reads
  completed, which becomes its completion (values must be unique per key, as
  the soak's are; otherwise pending SETs stay as they are);
- counters: pending INCRs with no reply are interchangeable, so they are taken
  in invocation order only (an earlier one is always usable where a later one
  is), which keeps the search from trying every subset of them.

``python -m bench.linearizability HISTORY.json`` checks a saved history.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

SET, GET, INCR = "set", "get", "incr"


@dataclass(frozen=True)
class Operation:
    """One client operation on one key, as the client saw it."""

    client: int
    key: str
    kind: str  # SET, GET or INCR
    value: str | None  # the value a SET writes
    invoked: float  # seconds (any monotonic clock shared by every client)
    completed: float | None  # None: pending (no reply, or an error reply)
    result: str | int | None = None  # SET: "OK"; GET: the value or None; INCR: the new value

    @property
    def pending(self) -> bool:
        return self.completed is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Operation:
        return cls(**data)


State = Any  # hashable


class Model(Protocol):
    """A sequential object: its initial state, and one step of an operation."""

    name: str

    def init(self) -> State: ...

    def step(self, state: State, op: Operation) -> tuple[bool, State]:
        """(whether ``op``'s reply is legal in ``state``, the state after it).

        A pending operation has no reply: any is legal.
        """
        ...

    def prepare(self, ops: list[Operation]) -> list[Operation]:
        """The exact reductions of this model's pending operations (module docstring)."""
        ...


class Register:
    """A register: SET writes a value (reply OK), GET reads the last one (None at first)."""

    name = "register"

    def init(self) -> State:
        return None

    def step(self, state: State, op: Operation) -> tuple[bool, State]:
        if op.kind == SET:
            return (op.pending or op.result == "OK"), op.value
        if op.kind == GET:
            return (op.pending or op.result == state), state
        return False, state

    def prepare(self, ops: list[Operation]) -> list[Operation]:
        ops = [op for op in ops if not (op.pending and op.kind == GET)]
        values = [op.value for op in ops if op.kind == SET]
        if len(values) != len(set(values)):
            return ops  # not unique: no reduction is exact
        first_read: dict[Any, float] = {}
        for op in ops:
            if op.kind == GET and op.completed is not None:
                seen = first_read.get(op.result, math.inf)
                first_read[op.result] = min(seen, op.completed)
        out = []
        for op in ops:
            if op.kind == SET and op.pending:
                read_at = first_read.get(op.value)
                if read_at is None:
                    continue  # never observed: as if it never took effect
                op = replace(op, completed=max(read_at, op.invoked), result="OK")
            out.append(op)
        return out


class Counter:
    """A counter: INCR adds one and replies the new value; GET reads it (None while 0)."""

    name = "counter"

    def init(self) -> State:
        return 0

    def step(self, state: State, op: Operation) -> tuple[bool, State]:
        if op.kind == INCR:
            return (op.pending or op.result == state + 1), state + 1
        if op.kind == GET:
            if op.pending:
                return True, state
            read = op.result
            return (read == state or (read is None and state == 0) or read == str(state)), state
        return False, state

    def prepare(self, ops: list[Operation]) -> list[Operation]:
        return [op for op in ops if not (op.pending and op.kind == GET)]


def model_by_prefix(key: str) -> Model:
    """The soak's convention: keys ``ctr:...`` are counters, every other key a register."""
    return Counter() if key.startswith("ctr:") else Register()


@dataclass
class KeyVerdict:
    """The check of one key's sub-history."""

    key: str
    model: str
    operations: int
    pending: int
    linearizable: bool
    explored: int  # search steps taken
    # When not linearizable: the operation no order could place, and what was around it.
    stuck_at: dict[str, Any] | None = None
    concurrent: list[dict[str, Any]] = field(default_factory=list)
    states: list[Any] = field(default_factory=list)


@dataclass
class Verdict:
    """The check of a whole history, key by key."""

    keys: list[KeyVerdict]

    @property
    def linearizable(self) -> bool:
        return all(k.linearizable for k in self.keys)

    @property
    def violations(self) -> list[KeyVerdict]:
        return [k for k in self.keys if not k.linearizable]

    def as_dict(self) -> dict[str, Any]:
        return {
            "linearizable": self.linearizable,
            "keys": len(self.keys),
            "operations": sum(k.operations for k in self.keys),
            "pending": sum(k.pending for k in self.keys),
            "explored": sum(k.explored for k in self.keys),
            "violations": [asdict(k) for k in self.violations],
        }


class _Entry:
    """A call or return entry of the doubly linked list the search lifts and unlifts."""

    __slots__ = ("index", "is_call", "match", "next", "op", "prev")

    def __init__(self, index: int, op: Operation | None, is_call: bool) -> None:
        self.index = index
        self.op = op
        self.is_call = is_call
        self.match: _Entry | None = None  # a call's return entry (None: pending)
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


def _build(ops: Sequence[Operation], skip: set[int]) -> _Entry:
    """The entries in time order behind a head sentinel; at equal times calls first
    (the looser order: the recorded interval always contains the real one)."""
    events: list[tuple[float, int, int, bool]] = []
    for i, op in enumerate(ops):
        if i in skip:
            continue
        events.append((op.invoked, 0, i, True))
        if op.completed is not None:
            events.append((op.completed, 1, i, False))
    events.sort()
    head = _Entry(-1, None, False)
    calls: dict[int, _Entry] = {}
    last = head
    for _, _, i, is_call in events:
        entry = _Entry(i, ops[i], is_call)
        if is_call:
            calls[i] = entry
        else:
            calls[i].match = entry
        entry.prev, last.next = last, entry
        last = entry
    return head


def _lift(entry: _Entry) -> None:
    assert entry.prev is not None
    entry.prev.next = entry.next
    if entry.next is not None:
        entry.next.prev = entry.prev
    ret = entry.match
    if ret is not None:
        assert ret.prev is not None
        ret.prev.next = ret.next
        if ret.next is not None:
            ret.next.prev = ret.prev


def _unlift(entry: _Entry) -> None:
    ret = entry.match
    if ret is not None:
        assert ret.prev is not None
        ret.prev.next = ret
        if ret.next is not None:
            ret.next.prev = ret
    assert entry.prev is not None
    entry.prev.next = entry
    if entry.next is not None:
        entry.next.prev = entry


def _mark(low: int, rest: int, index: int) -> tuple[int, int]:
    """(low, rest) with ``index`` added (see check_key)."""
    rest |= 1 << (index - low)
    while rest & 1:
        rest >>= 1
        low += 1
    return low, rest


def check_key(key: str, ops: Sequence[Operation], model: Model) -> KeyVerdict:
    """Whether one key's sub-history is linearizable with respect to ``model``."""
    prepared = sorted(model.prepare(list(ops)), key=lambda op: op.invoked)
    verdict = KeyVerdict(
        key=key,
        model=model.name,
        operations=len(ops),
        pending=sum(1 for op in ops if op.pending),
        linearizable=True,
        explored=0,
    )
    # Interchangeable pending INCRs stay out of the list: at each point only the
    # earliest unused one is a candidate, tried once every listed call has been.
    spare = [i for i, op in enumerate(prepared) if op.pending and op.kind == INCR]
    head = _build(prepared, skip=set(spare))
    next_spare = 0
    remaining = sum(1 for op in prepared if not op.pending)
    state = model.init()
    # The linearized set as (low, rest): every index below ``low`` is in it, and
    # bit i of ``rest`` says whether ``low + i`` is. The search linearizes mostly
    # in invocation order, so ``rest`` stays a small number however long the
    # history: the cache's keys stay small (exact, not hashed).
    low, rest = 0, 0
    cache: set[tuple[int, int, State]] = set()
    stack: list[tuple[_Entry | None, State, int, int]] = []
    deepest = -1
    stuck: _Entry | None = None
    entry = head.next
    steps = 0
    while remaining:
        assert entry is not None  # a return entry always precedes the end while any remain
        steps += 1
        if entry.is_call:
            op = entry.op
            assert op is not None
            legal, after = model.step(state, op)
            if legal:
                marked = _mark(low, rest, entry.index)
                if (*marked, after) not in cache:
                    cache.add((*marked, after))
                    stack.append((entry, state, low, rest))
                    state, (low, rest) = after, marked
                    if entry.match is not None:
                        remaining -= 1
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
            continue
        # The first return entry: every call before it has been tried here.
        assert entry.op is not None and entry.op.completed is not None
        if next_spare < len(spare) and prepared[spare[next_spare]].invoked <= entry.op.completed:
            legal, after = model.step(state, prepared[spare[next_spare]])
            marked = _mark(low, rest, spare[next_spare])
            if legal and (*marked, after) not in cache:
                cache.add((*marked, after))
                stack.append((None, state, low, rest))
                state, (low, rest) = after, marked
                next_spare += 1
                entry = head.next
                continue
        if len(stack) > deepest:
            deepest, stuck = len(stack), entry
            verdict.states = [state]
        elif len(stack) == deepest and len(verdict.states) < 10 and state not in verdict.states:
            verdict.states.append(state)
        popped: _Entry | None = None
        while stack and popped is None:
            popped, state, low, rest = stack.pop()
            if popped is None:  # a spare INCR, tried last: nothing is left to try here
                next_spare -= 1
        if popped is None:
            break
        if popped.match is not None:
            remaining += 1
        _unlift(popped)
        entry = popped.next
    verdict.explored = steps
    if remaining:
        verdict.linearizable = False
        assert stuck is not None and stuck.op is not None
        verdict.stuck_at = stuck.op.as_dict()
        verdict.concurrent = _concurrent(prepared, stuck.op)
        verdict.states = verdict.states[:10]
    else:
        verdict.states = []
    return verdict


def _concurrent(ops: Sequence[Operation], op: Operation, limit: int = 12) -> list[dict[str, Any]]:
    """Operations overlapping ``op`` in time (or just before it), for the report."""
    assert op.completed is not None
    near = [
        o
        for o in ops
        if o is not op
        and o.invoked <= op.completed
        and (o.completed is None or o.completed >= op.invoked - 0.5)
    ]
    return [o.as_dict() for o in near[-limit:]]


def check(
    history: Iterable[Operation], model_of: Callable[[str], Model] = model_by_prefix
) -> Verdict:
    """Check a whole history, key by key (each key its own object)."""
    by_key: dict[str, list[Operation]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    return Verdict([check_key(key, ops, model_of(key)) for key, ops in sorted(by_key.items())])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.linearizability", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("history", type=Path, help="a JSON list of operations")
    args = parser.parse_args(argv)
    try:
        raw = json.loads(args.history.read_text())
        history = [Operation.from_dict(item) for item in raw]
    except (OSError, ValueError, TypeError) as exc:
        print(f"linearizability: cannot read {args.history}: {exc}", file=sys.stderr)
        return 2
    verdict = check(history)
    print(json.dumps(verdict.as_dict(), indent=1))
    return 0 if verdict.linearizable else 1


if __name__ == "__main__":
    sys.exit(main())
