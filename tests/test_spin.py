"""The data path's spin-before-sleep (ftproxy.shell.spin) on real pipes: it ends when its own
descriptor is readable, lets a task whose descriptor is ready run meanwhile, and gives up
(the caller sleeps) when nothing comes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing

from ftproxy.shell import spin
from ftproxy.shell.spin import ENV, Spinner


@pytest.fixture
def pipes() -> Iterator[Callable[[], tuple[int, int]]]:
    """Make non-blocking-read pipes; all closed after the test."""
    opened: list[int] = []

    def make() -> tuple[int, int]:
        read, write = os.pipe()
        os.set_blocking(read, False)
        opened.extend((read, write))
        return read, write

    yield make
    for fd in opened:
        os.close(fd)


async def test_spin_ends_when_its_descriptor_is_readable(
    pipes: Callable[[], tuple[int, int]],
) -> None:
    spinner = Spinner(budget_ns=5_000_000_000)  # far longer than the test may take
    read, write = pipes()
    spinner.watch(read)
    os.write(write, b"x")
    assert await spinner.spin(read)
    assert os.read(read, 1) == b"x"


async def test_spin_gives_up_when_nothing_comes(pipes: Callable[[], tuple[int, int]]) -> None:
    spinner = Spinner(budget_ns=1_000_000)
    read, _write = pipes()
    spinner.watch(read)
    assert not await spinner.spin(read)


async def test_another_tasks_descriptor_runs_that_task_during_a_spin(
    pipes: Callable[[], tuple[int, int]],
) -> None:
    spinner = Spinner(budget_ns=5_000_000_000)
    mine, my_write = pipes()
    theirs, their_write = pipes()
    spinner.watch(mine)
    spinner.watch(theirs)
    got: list[bytes] = []

    async def other_task() -> None:
        await trio.lowlevel.wait_readable(theirs)
        got.append(os.read(theirs, 1))
        os.write(my_write, b"m")  # only that task's run ends the spin

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.testing.wait_all_tasks_blocked()
        os.write(their_write, b"t")
        assert await spinner.spin(mine)
    assert got == [b"t"]


async def test_a_set_stop_event_ends_the_spin(pipes: Callable[[], tuple[int, int]]) -> None:
    spinner = Spinner(budget_ns=5_000_000_000)
    mine, _my_write = pipes()
    theirs, their_write = pipes()
    spinner.watch(mine)
    spinner.watch(theirs)
    stop = trio.Event()

    async def ringer() -> None:
        await trio.lowlevel.wait_readable(theirs)
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ringer)
        await trio.testing.wait_all_tasks_blocked()
        os.write(their_write, b"t")
        assert await spinner.spin(mine, stop)
    assert stop.is_set()


async def test_no_budget_never_spins(pipes: Callable[[], tuple[int, int]]) -> None:
    spinner = Spinner(budget_ns=0)
    read, write = pipes()
    spinner.watch(read)
    os.write(write, b"x")
    assert not await spinner.spin(read)  # the caller sleeps on it (and wakes at once)


def test_a_roles_default_budget_gives_way_to_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    unset = Spinner(40_000)
    unset.use_default(150)
    assert unset.budget_ns == 150_000
    monkeypatch.setenv(ENV, "40")  # the user's word wins over a role's default
    chosen = Spinner(40_000)
    chosen.use_default(150)
    assert chosen.budget_ns == 40_000


async def test_a_descriptor_whose_spins_run_out_is_not_spun_for_but_probed(
    pipes: Callable[[], tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never judged contended, whatever else this machine runs: only futility is tested.
    monkeypatch.setattr(spin, "CONTENDED_SHARE", 0.0)
    spinner = Spinner(budget_ns=1_000_000)
    futile, futile_write = pipes()
    other, other_write = pipes()
    spinner.watch(futile)
    spinner.watch(other)
    misses = 0
    while misses < 100 and spinner.spins_for(futile):
        assert not await spinner.spin(futile)  # nothing comes: each spin runs out
        misses += 1
    assert 1 < misses < 100  # one miss alone does not stop the spinning; a run does
    os.write(futile_write, b"x")
    # Readable at once, yet the next waits do not spin (the caller sleeps and wakes
    # at once), except the probe, which finds the byte.
    results = [await spinner.spin(futile) for _ in range(spin.PROBE_EVERY)]
    assert results == [False] * (spin.PROBE_EVERY - 1) + [True]
    # Another descriptor's spins are its own.
    os.write(other_write, b"y")
    assert await spinner.spin(other)


async def test_a_probe_that_catches_its_event_turns_spinning_back_on(
    pipes: Callable[[], tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load changed (50 clients, then one): the descriptor's event comes within the
    budget again, and the first probe that sees it brings the spinning back."""
    monkeypatch.setattr(spin, "CONTENDED_SHARE", 0.0)
    spinner = Spinner(budget_ns=1_000_000)
    read, write = pipes()
    spinner.watch(read)
    while spinner.spins_for(read):
        assert not await spinner.spin(read)
    os.write(write, b"x")
    waits = 1
    while not await spinner.spin(read):  # the waits between probes do not spin
        waits += 1
    assert waits == spin.PROBE_EVERY
    assert spinner.spins_for(read)
    assert os.read(read, 1) == b"x"
    os.write(write, b"y")
    assert await spinner.spin(read)  # every wait spins again
