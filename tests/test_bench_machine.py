"""What a bench run says of the machine: how an idle vCPU waits, among the rest.

On this kind of VM most of a process hop is the hypervisor waking a halted vCPU;
with the guest's halt polling on, a loopback TCP round trip went from 88 to 17 us.
Two runs are comparable only if they say which way they were taken.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.machine import describe, idle_states, idle_summary, stamp, summary


def _sysfs(tmp_path: Path, *, driver: str, governor: str, poll_ns: str | None) -> tuple[Path, Path]:
    cpuidle = tmp_path / "cpuidle"
    cpuidle.mkdir()
    (cpuidle / "current_driver").write_text(driver + "\n")
    (cpuidle / "current_governor_ro").write_text(governor + "\n")
    halt_poll = tmp_path / "guest_halt_poll_ns"
    if poll_ns is not None:
        halt_poll.write_text(poll_ns + "\n")
    return cpuidle, halt_poll


def test_a_vm_with_halt_polling_off_says_so(tmp_path: Path) -> None:
    cpuidle, halt_poll = _sysfs(tmp_path, driver="haltpoll", governor="haltpoll", poll_ns="0")
    idle = idle_states(cpuidle, halt_poll)
    assert idle == {"driver": "haltpoll", "governor": "haltpoll", "guest_halt_poll_ns": 0}
    assert idle_summary(idle) == "cpuidle haltpoll, guest halt polling off"


def test_a_vm_with_halt_polling_on_gives_its_bound(tmp_path: Path) -> None:
    cpuidle, halt_poll = _sysfs(tmp_path, driver="haltpoll", governor="haltpoll", poll_ns="200000")
    assert idle_summary(idle_states(cpuidle, halt_poll)) == (
        "cpuidle haltpoll, guest halt polling up to 200 us"
    )


def test_bare_metal_without_haltpoll_names_only_its_driver(tmp_path: Path) -> None:
    cpuidle, halt_poll = _sysfs(tmp_path, driver="intel_idle", governor="menu", poll_ns=None)
    idle = idle_states(cpuidle, halt_poll)
    assert idle["guest_halt_poll_ns"] is None
    assert idle_summary(idle) == "cpuidle intel_idle"


def test_a_machine_without_cpuidle_leaves_the_summary_as_it_was(tmp_path: Path) -> None:
    idle = idle_states(tmp_path / "absent", tmp_path / "absent-too")
    assert idle == {"driver": None, "governor": None, "guest_halt_poll_ns": None}
    assert idle_summary(idle) == ""


def test_the_summary_of_this_machine_carries_its_idle_facts_and_older_runs_still_read() -> None:
    machine = describe()
    line = summary(machine)
    assert idle_summary(machine["idle"]) in line
    assert f"Python {machine['python']}" in line
    older = {key: value for key, value in machine.items() if key != "idle"}
    assert "cpuidle" not in summary(older)
    assert f"Linux {machine['kernel']}, Python" in summary(older)


def test_every_kind_of_run_is_named_by_its_taken_time_as_before() -> None:
    # One stamp for the full run, breakdown, soak and programs: the saved runs'
    # names, given by each entry point's own formula until now, must come out again.
    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    for name in (
        "2026-12-07T213702Z.json",
        "breakdown-2026-12-06T214800Z.json",
        "soak-2026-12-07T005220Z.json",
        "programs-2026-12-06T212510Z.json",
    ):
        taken = json.loads((results / name).read_text())["taken"]
        kind = name.rsplit("-", 3)[0] + "-" if not name[0].isdigit() else ""
        assert f"{kind}{stamp(taken)}.json" == name, (name, taken)
