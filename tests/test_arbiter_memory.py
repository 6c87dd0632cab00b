"""The built-in arbiter's server and client loops on an in-memory stream, in-process.

Both sides take any ``trio.abc.Stream``: here the client's ``converse`` and the
server's connection handler talk over ``trio.testing.memory_stream_pair``, with a
real store on disk, the real protocol and its handshake.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio
import trio.testing

from arbiter import Decision, RemoteProtocolError, Store, TestAndSet, Undecided
from arbiter._client import converse
from arbiter._protocol import Query, Request
from arbiter._server import _handle_connection
from ftproxy.shell.admission import Gate, RejectionLog

SECRET = b"arbiter-test-secret-0123456789"


async def ask(store: Store, request: Request, secret: bytes = SECRET) -> Decision | Undecided:
    """One question from a client to a server, each at one end of a memory stream pair."""
    client_end, server_end = trio.testing.memory_stream_pair()
    rejected = RejectionLog("peer_rejected", port="arbiter", level="error")
    gate = Gate("memory-client", math.inf, lambda gate: None)
    answers: list[Decision | Undecided] = []
    errors: list[RemoteProtocolError] = []

    async def client() -> None:
        async with client_end:
            try:
                answers.append(await converse(client_end, request, secret, "memory-server"))
            except RemoteProtocolError as exc:
                errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: _handle_connection(
                server_end, gate, store=store, secret=SECRET, rejected=rejected, peer="c"
            )
        )
        nursery.start_soon(client)
    if errors:
        raise errors[0]
    assert gate.proven
    return answers[0]


async def test_the_first_candidate_wins_and_every_later_one_hears_its_name(
    tmp_path: Path,
) -> None:
    with Store.open(tmp_path) as store:
        assert await ask(store, Query("gen-1")) == Undecided("gen-1")
        assert await ask(store, TestAndSet("gen-1", "backup")) == Decision("gen-1", "backup", True)
        assert await ask(store, TestAndSet("gen-1", "primary")) == Decision(
            "gen-1", "backup", False
        )
        assert await ask(store, TestAndSet("gen-1", "backup")) == Decision("gen-1", "backup", True)
        assert await ask(store, Query("gen-1")) == Decision("gen-1", "backup", False)
    with Store.open(tmp_path) as reopened:  # the decision is on disk
        assert reopened.get("gen-1") == "backup"


async def test_a_wrong_secret_is_a_remote_error_naming_the_arbiter(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store, pytest.raises(RemoteProtocolError, match="memory-server"):
        await ask(store, TestAndSet("gen-1", "backup"), secret=b"wrong-secret-0123456789")
    with Store.open(tmp_path) as store:
        assert store.get("gen-1") is None
