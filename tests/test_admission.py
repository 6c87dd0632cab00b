"""ftproxy.shell.admission without processes: the opening's deadline, cap, reserve and log."""

from __future__ import annotations

import resource
import socket

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from ftproxy.shell.admission import Admission, RejectionLog, descriptors_left, serve_with_limits


async def test_an_unproven_connection_is_cancelled_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission("test", opening_timeout=2.0)
    started = trio.current_time()
    with capture_logs() as logs, admission.opening("10.0.0.1:5") as gate:
        await trio.sleep_forever()
    assert gate.refused and trio.current_time() - started == pytest.approx(2.0)
    assert logs[0]["peer"] == "10.0.0.1:5"
    assert "did not finish the opening within 2 s" in logs[0]["reason"]


async def test_a_proven_connection_has_no_deadline_and_leaves_the_cap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission("test", opening_timeout=2.0, max_unproven=1)
    with admission.opening("a") as gate:
        gate.proved()
        assert admission.unproven == 0
        with admission.opening("b") as other:  # the cap counts unproven ones only
            pass
        await trio.sleep(10)
    assert not gate.refused and not other.refused


async def test_past_the_cap_the_oldest_unproven_connection_is_shed() -> None:
    admission = Admission("test", max_unproven=2)
    gates = {}

    async def connection(name: str, task_status: trio.TaskStatus[None]) -> None:
        with admission.opening(name) as gate:
            gates[name] = gate
            task_status.started()
            await trio.sleep_forever()

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            for name in ("old", "middle", "new"):
                await nursery.start(connection, name)
            await trio.testing.wait_all_tasks_blocked()
            assert gates["old"].refused and admission.unproven == 2
            nursery.cancel_scope.cancel()
    assert [entry["peer"] for entry in logs] == ["old"]
    assert "more than 2 connections were unproven" in logs[0]["reason"]


async def test_rejections_are_rate_limited_and_the_rest_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reject = RejectionLog("connection_rejected", port="test", burst=3, period=1.0)
    with capture_logs() as logs:
        for i in range(10):
            reject(f"peer{i}", "go away")
        await trio.sleep(1.0)
        reject("late", "go away")
    assert [e["peer"] for e in logs if e["event"] == "connection_rejected"] == [
        "peer0",
        "peer1",
        "peer2",
        "late",
    ]
    (suppressed,) = [e for e in logs if e["event"] == "rejections_suppressed"]
    assert suppressed["count"] == 7 and reject.total == 11


async def test_the_descriptor_reserve_counts_from_the_soft_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert descriptors_left(soft - 1) == 0
    assert descriptors_left(soft - 65) == 64
    admission = Admission("test", reserve=soft)  # nothing may stay
    a, b = socket.socketpair()
    with capture_logs() as logs:
        assert not admission.admit(a)
    assert a.fileno() == -1  # closed
    assert logs[0]["reason"] == "too few descriptors left"
    b.close()


async def test_openings_run_concurrently(autojump_clock: trio.testing.MockClock) -> None:
    # Two silent connections and then one that proves itself: it is served at once.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    served = trio.Event()

    async def handler(stream: trio.SocketStream, gate) -> None:  # type: ignore[no-untyped-def]
        if await stream.receive_some(10) == b"proof":
            gate.proved()
            served.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_with_limits, listeners, handler, Admission("test"))
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        prover = await trio.open_tcp_stream("127.0.0.1", port)
        started = trio.current_time()
        await prover.send_all(b"proof")
        await served.wait()
        assert trio.current_time() - started < 0.1
        for stream in [*silent, prover]:
            await stream.aclose()
        nursery.cancel_scope.cancel()
