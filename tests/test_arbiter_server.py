"""The arbiter's trio server and client, in process on 127.0.0.1, and ``python -m arbiter``.

Where a test depends on time passing (retries, timeouts), it runs on trio's
autojump clock, so virtual seconds pass instantly and in a fixed order.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, MutableMapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
import trio
import trio.testing
from structlog.testing import capture_logs
from support import free_port

from arbiter import (
    ArbiterUnavailable,
    Connection,
    Decision,
    Query,
    RemoteProtocolError,
    Side,
    StoreCorruptError,
    StoreError,
    TestAndSet,
    Undecided,
    query,
    serve,
    test_and_set,
    test_and_set_retrying,
)
from arbiter.__main__ import main
from arbiter._protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Authenticated,
    Error,
    Event,
    Hello,
    Message,
    Proof,
    encode_frame,
)
from arbiter._server import IDLE_TIMEOUT
from arbiter._store import FILE_NAME
from ftproxy.shell.admission import OPENING_TIMEOUT_S
from ftproxy.tools.procs import Proc

SECRET = b"arbiter-test-secret-0123456789"
LOCAL = "127.0.0.1"


async def start(
    nursery: trio.Nursery, data_dir: Path, secret: bytes | None = SECRET, port: int = 0
) -> int:
    bound: int = await nursery.start(serve, LOCAL, port, data_dir, secret)
    return bound


@pytest.fixture
async def port(nursery: trio.Nursery, tmp_path: Path) -> int:
    """An arbiter serving from a fresh data directory until the test ends."""
    return await start(nursery, tmp_path / "data")


# --- A raw connection, kept open across requests --------------------------------------


class Session:
    """One client connection driven by hand (``test_and_set`` opens one per call)."""

    def __init__(self, stream: trio.SocketStream, conn: Connection) -> None:
        self.stream = stream
        self.conn = conn

    @classmethod
    async def open(cls, port: int, secret: bytes | None = SECRET) -> Session:
        session = cls(await trio.open_tcp_stream(LOCAL, port), Connection(Side.CLIENT, secret))
        assert isinstance(await session.next_event(), Authenticated)
        return session

    async def next_event(self) -> Event:
        while True:
            event = self.conn.next_event()
            if data := self.conn.data_to_send():
                await self.stream.send_all(data)
            if event is not NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def ask(self, request: TestAndSet | Query) -> Event:
        await self.stream.send_all(self.conn.send(request))
        return await self.next_event()


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


def decode_frames(data: bytes) -> list[Message]:
    decoder = msgspec.msgpack.Decoder(Message)
    messages = []
    while data:
        length = int.from_bytes(data[:4], "little")
        messages.append(decoder.decode(data[4 : 4 + length]))
        data = data[4 + length :]
    return messages


def events_named(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[Any]:
    return [entry for entry in logs if entry["event"] == name]


# --- Test-and-set over the network ---------------------------------------------------


async def test_racing_candidates_exactly_one_wins(port: int) -> None:
    decisions: list[Decision] = []

    async def contend(candidate: str) -> None:
        decisions.append(await test_and_set((LOCAL, port), "gen-1", candidate, SECRET))

    async with trio.open_nursery() as nursery:
        for candidate in ["primary", "backup", "third", "fourth"]:
            nursery.start_soon(contend, candidate)
    assert sum(decision.won for decision in decisions) == 1
    winners = {decision.winner for decision in decisions}
    assert len(winners) == 1


async def test_winner_is_idempotent_and_loser_learns_the_winner(port: int) -> None:
    address = (LOCAL, port)
    assert await test_and_set(address, "gen-1", "backup", SECRET) == Decision(
        "gen-1", "backup", True
    )
    assert await test_and_set(address, "gen-1", "backup", SECRET) == Decision(
        "gen-1", "backup", True
    )
    assert await test_and_set(address, "gen-1", "primary", SECRET) == Decision(
        "gen-1", "backup", False
    )


async def test_query(port: int) -> None:
    address = (LOCAL, port)
    assert await query(address, "gen-1", SECRET) == Undecided("gen-1")
    await test_and_set(address, "gen-1", "primary", SECRET)
    assert await query(address, "gen-1", SECRET) == Decision("gen-1", "primary", False)


async def test_several_requests_on_one_connection(port: int) -> None:
    session = await Session.open(port)
    assert await session.ask(TestAndSet("gen-1", "a")) == Decision("gen-1", "a", True)
    assert await session.ask(TestAndSet("gen-1", "b")) == Decision("gen-1", "a", False)
    assert await session.ask(Query("gen-2")) == Undecided("gen-2")
    await session.stream.aclose()


async def test_insecure_pair_works(nursery: trio.Nursery, tmp_path: Path) -> None:
    port = await start(nursery, tmp_path, secret=None)
    decision = await test_and_set((LOCAL, port), "gen-1", "backup", None)
    assert decision.won


async def test_decision_survives_a_restart(tmp_path: Path) -> None:
    for candidate, expected in [("backup", True), ("primary", False), ("backup", True)]:
        async with trio.open_nursery() as nursery:
            port = await start(nursery, tmp_path)
            decision = await test_and_set((LOCAL, port), "gen-1", candidate, SECRET)
            assert decision == Decision("gen-1", "backup", expected)
            nursery.cancel_scope.cancel()


async def test_corrupt_store_fails_the_start(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"not a store")
    with pytest.raises(StoreCorruptError, match="not an arbiter store"):
        await start(nursery, tmp_path)


async def test_failed_store_write_stops_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with capture_logs() as logs, pytest.raises(ExceptionGroup) as failure:
        async with trio.open_nursery() as nursery:
            port = await start(nursery, tmp_path)
            monkeypatch.setattr(os, "fsync", broken_fsync)
            with pytest.raises(ArbiterUnavailable):
                await test_and_set((LOCAL, port), "gen-1", "backup", SECRET)
    assert failure.group_contains(StoreError, match="cannot record a decision")
    assert events_named(logs, "store_failed")


# --- Authentication and bad peers ----------------------------------------------------


async def test_wrong_secret_is_rejected_and_the_server_keeps_serving(port: int) -> None:
    with capture_logs() as logs:
        with pytest.raises(RemoteProtocolError, match="different secrets"):
            await test_and_set((LOCAL, port), "gen-1", "intruder", b"wrong-secret-0123456789")
        await trio.testing.wait_all_tasks_blocked()
        (rejected,) = events_named(logs, "peer_rejected")
        assert "different secrets" in rejected["reason"]
        assert rejected["log_level"] == "error"
    decision = await test_and_set((LOCAL, port), "gen-1", "backup", SECRET)
    assert decision.won  # the intruder decided nothing


async def test_forged_proof_is_rejected(port: int) -> None:
    stream = await trio.open_tcp_stream(LOCAL, port)
    await stream.send_all(encode_frame(Hello(PROTOCOL_VERSION, b"n" * 32, True)))
    with capture_logs() as logs:
        # The server proves itself first; the forger cannot, and sends zeros.
        await stream.send_all(encode_frame(Proof(b"\0" * 32)))
        messages = decode_frames(await read_to_eof(stream))
    assert [type(m) for m in messages] == [Hello, Proof, Error]
    assert isinstance(messages[-1], Error)
    assert "authentication failed" in messages[-1].reason
    assert events_named(logs, "peer_rejected")


async def test_insecure_client_is_refused_by_a_secure_server(port: int) -> None:
    with pytest.raises(RemoteProtocolError, match=r"server aborted.*runs without a secret"):
        await query((LOCAL, port), "gen-1", None)


async def test_secure_client_refuses_an_insecure_server(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    port = await start(nursery, tmp_path, secret=None)
    with pytest.raises(RemoteProtocolError, match="runs with --insecure"):
        await query((LOCAL, port), "gen-1", SECRET)


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"\xff" * 64, "larger than the limit"),
        (b"\x04\0\0\0\xc1\xc1\xc1\xc1", "malformed message"),
        (b"\x06\0\0\0\x93\x02\xa1\x80\xa1a", "malformed message"),
        (
            encode_frame(Hello(PROTOCOL_VERSION + 1, b"n" * 32, True)),
            f"version {PROTOCOL_VERSION + 1}",
        ),
        (encode_frame(TestAndSet("gen-1", "sneaky")), "unexpected TestAndSet"),
    ],
    ids=["oversized", "not-msgpack", "bad-utf8", "newer-version", "request-before-hello"],
)
async def test_garbage_closes_only_that_connection(port: int, garbage: bytes, reason: str) -> None:
    bystander = await Session.open(port)
    stream = await trio.open_tcp_stream(LOCAL, port)
    with capture_logs() as logs:
        await stream.send_all(garbage)
        messages = decode_frames(await read_to_eof(stream))
    assert isinstance(messages[-1], Error)
    assert reason in messages[-1].reason
    (rejected,) = events_named(logs, "peer_rejected")
    assert reason in rejected["reason"]
    # The connection that behaved is still served, and so are new ones.
    assert await bystander.ask(TestAndSet("gen-1", "backup")) == Decision("gen-1", "backup", True)
    assert await query((LOCAL, port), "gen-1", SECRET) == Decision("gen-1", "backup", False)
    await bystander.stream.aclose()


async def test_truncated_frame_is_rejected(port: int) -> None:
    stream = await trio.open_tcp_stream(LOCAL, port)
    with capture_logs() as logs:
        await stream.send_all(encode_frame(Hello(PROTOCOL_VERSION, b"n" * 32, True))[:-3])
        await stream.send_eof()
        messages = decode_frames(await read_to_eof(stream))
    assert isinstance(messages[-1], Error)
    (rejected,) = events_named(logs, "peer_rejected")
    assert "inside a frame" in rejected["reason"]


async def test_a_silent_stranger_is_closed_after_the_opening_timeout(
    autojump_clock: trio.testing.MockClock, port: int
) -> None:
    stream = await trio.open_tcp_stream(LOCAL, port)
    connected_at = trio.current_time()
    with capture_logs() as logs:
        assert await read_to_eof(stream) == b""
        await trio.testing.wait_all_tasks_blocked()  # the server logs after it closed
    assert trio.current_time() - connected_at == pytest.approx(OPENING_TIMEOUT_S)
    (rejected,) = events_named(logs, "peer_rejected")
    assert "did not finish the opening within 2 s" in rejected["reason"]
    assert rejected["peer"].startswith(f"{LOCAL}:")


async def test_an_authenticated_idle_peer_is_disconnected(
    autojump_clock: trio.testing.MockClock, port: int
) -> None:
    session = await Session.open(port)
    authenticated_at = trio.current_time()
    with capture_logs() as logs:
        data = await read_to_eof(session.stream)
    assert trio.current_time() - authenticated_at == pytest.approx(IDLE_TIMEOUT)
    session.conn.receive_data(data)  # sealed, like every frame after the opening
    with pytest.raises(RemoteProtocolError, match="saying: idle for too long"):
        session.conn.next_event()
    assert events_named(logs, "peer_timed_out")


# --- The client when the arbiter is away ---------------------------------------------


async def test_unreachable_arbiter() -> None:
    with pytest.raises(ArbiterUnavailable, match="cannot connect"):
        await test_and_set((LOCAL, free_port()), "gen-1", "backup", SECRET)


async def test_silent_arbiter_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async def accept_and_ignore(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, accept_and_ignore, 0, host=LOCAL))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(ArbiterUnavailable, match=r"did not answer within 2\.5 s"):
            await test_and_set((LOCAL, port), "gen-1", "backup", SECRET, timeout=2.5)
        nursery.cancel_scope.cancel()


async def test_arbiter_hanging_up_is_unavailable() -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, hang_up, 0, host=LOCAL))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(ArbiterUnavailable, match=r"closed the connection|lost the connection"):
            await test_and_set((LOCAL, port), "gen-1", "backup", SECRET)
        nursery.cancel_scope.cancel()


async def test_retrying_client_wins_once_the_arbiter_comes_up(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    port = free_port()
    decisions: list[tuple[float, Decision]] = []
    answered = trio.Event()

    async def ask() -> None:
        decision = await test_and_set_retrying(
            (LOCAL, port), "gen-1", "backup", SECRET, initial_backoff=0.1, max_backoff=1.0
        )
        decisions.append((trio.current_time(), decision))
        answered.set()

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            # Virtual time: attempts at 0, 0.1, 0.3, 0.7, 1.5 and 2.5 find nobody.
            await trio.sleep(3.0)
            assert not decisions
            await start(nursery, tmp_path, port=port)
            await answered.wait()
            nursery.cancel_scope.cancel()  # the server
    ((when, decision),) = decisions
    assert decision == Decision("gen-1", "backup", True)
    assert when == pytest.approx(3.5)  # the first attempt after the start wins
    failures = events_named(logs, "arbiter_unreachable")
    # Logged the first time, then at most once a second: attempts 1 (t=0), 5 (1.5), 6 (2.5).
    assert [failure["attempt"] for failure in failures] == [1, 5, 6]
    assert [failure["retry_in"] for failure in failures] == [0.1, 1.0, 1.0]
    assert all(failure["log_level"] == "warning" for failure in failures)


async def test_retrying_client_stops_when_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    with trio.move_on_after(60) as scope:
        await test_and_set_retrying((LOCAL, free_port()), "gen-1", "backup", SECRET)
    assert scope.cancelled_caught


async def test_retrying_client_does_not_retry_a_wrong_secret(port: int) -> None:
    with pytest.raises(RemoteProtocolError):
        await test_and_set_retrying((LOCAL, port), "gen-1", "backup", b"wrong-secret-0123456789")


# --- python -m arbiter ---------------------------------------------------------------


def launch(name: str, data_dir: Path, secret_file: Path) -> tuple[Proc, int]:
    """Start ``python -m arbiter`` on port 0; return it and the port it logged (its
    output in files ``name.*`` beside ``data_dir``)."""
    command = [
        sys.executable,
        "-m",
        "arbiter",
        "--listen",
        f"{LOCAL}:0",
        "--data-dir",
        str(data_dir),
        "--secret-file",
        str(secret_file),
    ]
    process = Proc(name, command, data_dir.parent)
    try:
        entry = process.wait_for_event("arbiter_listening", timeout=20)
    except (TimeoutError, RuntimeError) as exc:
        process.stop()
        raise AssertionError(f"the arbiter did not start: {exc}") from None
    assert entry["host"] == LOCAL
    return process, int(entry["port"])


async def test_module_survives_sigkill(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    secret_file.chmod(0o600)
    data_dir = tmp_path / "data"

    process, port = launch("arbiter-1", data_dir, secret_file)
    try:
        decision = await test_and_set((LOCAL, port), "gen-1", "backup", SECRET)
        assert decision.won
    finally:
        process.signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL

    process, port = launch("arbiter-2", data_dir, secret_file)
    try:
        assert await query((LOCAL, port), "gen-1", SECRET) == Decision("gen-1", "backup", False)
        decision = await test_and_set((LOCAL, port), "gen-1", "primary", SECRET)
        assert decision == Decision("gen-1", "backup", False)
        process.signal(signal.SIGINT)
        assert process.wait() == 0
    finally:
        process.stop()


async def run_module(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "arbiter", *args], capture_stderr=True, check=False
    )


def test_main_refuses_to_start_without_a_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--listen", f"{LOCAL}:0", "--data-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert "refusing to start without --secret-file" in capsys.readouterr().err


@pytest.fixture
def keep_structlog_config() -> Iterator[None]:
    """main() configures structlog for the process; put the test session's back."""
    config = structlog.get_config()
    yield
    structlog.configure(**config)


@pytest.mark.usefixtures("keep_structlog_config")
def test_main_refuses_an_unusable_secret_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--listen", f"{LOCAL}:0", "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--secret-file", str(tmp_path / "missing")])
    assert exit_.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--secret-file", str(tmp_path / "missing"), "--insecure"])
    assert exit_.value.code == 2


async def test_module_reports_a_corrupt_store(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"not a store")
    result = await run_module("--listen", f"{LOCAL}:0", "--data-dir", str(tmp_path), "--insecure")
    assert result.returncode == 5  # cannot start
    (line,) = result.stderr.splitlines()[-1:]
    entry = json.loads(line)
    assert entry["event"] == "arbiter_failed"
    assert entry["reason"].startswith(f"--data-dir {tmp_path}: ")
    assert "not an arbiter store" in entry["reason"]
