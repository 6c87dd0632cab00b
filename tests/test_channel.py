"""The log channel protocol without I/O: handshake, streaming, every kind of bad input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftproxy.core.channel import (
    BACKUP,
    CHANNEL_VERSION,
    NEED_DATA,
    PRIMARY,
    Ack,
    Authenticated,
    Channel,
    ConnectionClosed,
    Diverged,
    Entries,
    Error,
    HandedOver,
    Handover,
    Heartbeat,
    Hello,
    Join,
    LocalProtocolError,
    RecordedOutputs,
    RemoteProtocolError,
    State,
    Switchover,
    SwitchoverOutcome,
    Waiting,
    Welcome,
    encode_message,
)
from ftproxy.core.records import Entry, Header, Output, Policy

SECRET = b"a shared secret of enough bytes"
HEADER = Header(1, ["kv.py"], {"PYTHONHASHSEED": "1"}, "/srv", "3.11.7", Policy(200, 1000), 0)


def pump(source: Channel, target: Channel, data: bytes = b"") -> list[object]:
    """Deliver ``data`` plus what ``source`` has queued; return ``target``'s events."""
    target.receive_data(data + source.data_to_send())
    events = []
    while True:
        event = target.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)


def connected(secret: bytes | None = SECRET) -> tuple[Channel, Channel]:
    backup, primary = Channel(BACKUP, secret), Channel(PRIMARY, secret)
    assert pump(backup, primary) == []  # the backup's Hello
    assert pump(primary, backup) == [Authenticated(secure=secret is not None)]
    assert pump(backup, primary) == [Authenticated(secure=secret is not None)]
    assert pump(backup, primary, backup.send(Join(["kv.py"]))) == [Join(["kv.py"])]
    welcome = Welcome("pair", 1, HEADER)
    assert pump(primary, backup, primary.send(welcome)) == [welcome]
    assert backup.state is primary.state is State.STREAMING
    return backup, primary


@pytest.mark.parametrize("secret", [SECRET, None])
def test_handshake_then_streaming(secret: bytes | None) -> None:
    backup, primary = connected(secret)
    batch = Entries([Entry(1, 0, 0, 0, b"boot"), Entry(2, 9, 1, 7, b"wait")])
    assert pump(primary, backup, primary.send(batch)) == [batch]
    assert pump(backup, primary, backup.send(Ack(2, 1))) == [Ack(2, 1)]
    assert pump(backup, primary, backup.send(Heartbeat())) == [Heartbeat()]
    assert pump(primary, backup, primary.send(Heartbeat())) == [Heartbeat()]


def test_a_wrong_secret_is_refused_on_both_sides() -> None:
    backup, primary = Channel(BACKUP, SECRET), Channel(PRIMARY, b"another secret, just as long")
    pump(backup, primary)
    with pytest.raises(RemoteProtocolError, match="different secrets"):
        pump(primary, backup)


def test_insecure_and_secure_sides_refuse_each_other() -> None:
    backup, primary = Channel(BACKUP, None), Channel(PRIMARY, SECRET)
    with pytest.raises(RemoteProtocolError, match="--insecure"):
        pump(backup, primary)


def test_another_version_gets_a_clear_error() -> None:
    primary = Channel(PRIMARY, None)
    with pytest.raises(
        RemoteProtocolError, match=f"version 99; this side speaks version {CHANNEL_VERSION}"
    ):
        pump(primary, primary, encode_message(Hello(99, b"", False)))


def test_the_peer_refusal_is_reported_with_its_reason() -> None:
    backup, primary = Channel(BACKUP, None), Channel(PRIMARY, None)
    pump(backup, primary)
    pump(primary, backup)
    pump(backup, primary)
    pump(backup, primary, backup.send(Join(["other.py"])))
    with pytest.raises(
        RemoteProtocolError,
        match="the primary aborted the connection, saying: runs another program",
    ):
        pump(primary, backup, primary.send(Error("runs another program")))


def test_messages_out_of_turn() -> None:
    backup, primary = connected(None)  # plain, so that a forged frame reaches the table
    with pytest.raises(LocalProtocolError):
        backup.send(Entries([]))  # only the primary ships entries
    with pytest.raises(RemoteProtocolError, match="unexpected Ack from the primary"):
        pump(primary, backup, encode_message(Ack(1, 1)))


def test_a_divergence_is_reported_by_the_backup_and_answered_by_the_primary() -> None:
    backup, primary = connected()
    waiting = Waiting(7, 120, 1, 0xDEADBEEF)
    assert pump(primary, backup, primary.send(waiting)) == [waiting]
    ours = [Output(6, 1, 1 << 30, b"pid 10490\n")]
    diverged = Diverged(7, 120, "divergence at log entry 7 (icount 120)", ours)
    assert pump(backup, primary, backup.send(diverged)) == [diverged]
    theirs = RecordedOutputs(6, [Output(6, 1, 1 << 30, b"pid 10488\n")])
    assert pump(primary, backup, primary.send(theirs)) == [theirs]
    with pytest.raises(LocalProtocolError):
        backup.send(Waiting(1, 1, 1, 1))  # only the primary's guest waits for the backup
    with pytest.raises(LocalProtocolError):
        primary.send(diverged)  # only the backup replays
    backup, primary = connected(None)  # plain, so that a forged frame reaches the table
    with pytest.raises(RemoteProtocolError, match="unexpected RecordedOutputs from the backup"):
        pump(backup, primary, encode_message(theirs))


def test_an_oversized_frame_is_refused_before_its_body() -> None:
    primary = Channel(PRIMARY, None, max_frame_size=100)
    with pytest.raises(RemoteProtocolError, match="larger than the limit"):
        pump(primary, primary, (10_000).to_bytes(4, "little"))


def test_a_close_inside_a_frame_is_an_error_and_a_clean_close_is_not() -> None:
    backup, primary = connected()
    frame = primary.send(Heartbeat())
    backup.receive_data(frame[:-1])
    assert backup.next_event() is NEED_DATA
    backup.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        backup.next_event()
    other_backup, _ = connected()
    other_backup.receive_data(b"")
    assert other_backup.next_event() == ConnectionClosed()


@given(st.binary(min_size=1, max_size=300))
def test_garbage_is_only_ever_a_remote_protocol_error(data: bytes) -> None:
    primary = Channel(PRIMARY, SECRET)
    primary.receive_data(data)
    primary.receive_data(b"")  # then the peer hangs up
    try:
        while not isinstance(primary.next_event(), ConnectionClosed):
            pass
    except RemoteProtocolError:
        pass


@settings(max_examples=50)
@given(st.data())
def test_any_split_of_the_stream_gives_the_same_events(data: st.DataObject) -> None:
    entries = [
        Entries([Entry(i, i * 3, 1, i, data.draw(st.binary(max_size=50)))]) for i in range(1, 6)
    ]
    backup, primary = connected()
    stream = b"".join(primary.send(e) for e in entries)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        if start == end:
            continue  # an empty read means the end of the stream
        backup.receive_data(stream[start:end])
        while (event := backup.next_event()) is not NEED_DATA:
            got.append(event)
    assert got == entries


# -- sealing: every frame after the opening is authenticated and encrypted ----------


def test_secure_frames_are_encrypted_and_insecure_ones_are_plain() -> None:
    secret_data = b"a client's very secret request"
    batch = Entries([Entry(1, 0, 0, 0, secret_data)])
    _, primary = connected()
    assert secret_data not in primary.send(batch)
    _, plain = connected(None)
    assert secret_data in plain.send(batch)


def tampered(frames: list[bytes], how: str) -> bytes:
    """The primary's frames as a man in the middle rewrites them."""
    first, second, third = frames
    if how == "flip":
        flipped = bytearray(second)
        flipped[len(flipped) // 2] ^= 0x01
        return first + bytes(flipped) + third
    if how == "drop":
        return first + third
    if how == "replay":
        return first + second + second
    if how == "reorder":
        return first + third + second
    if how == "inject_plain":
        return first + encode_message(Entries([Entry(2, 1, 1, 0, b"forged")])) + second
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip", "drop", "replay", "reorder", "inject_plain"])
def test_a_tampered_stream_is_refused_as_the_peers_fault(how: str) -> None:
    backup, primary = connected()
    frames = [primary.send(Entries([Entry(i, i, 1, 0, b"x" * 40)])) for i in (1, 2, 3)]
    backup.receive_data(tampered(frames, how))
    assert backup.next_event() == Entries([Entry(1, 1, 1, 0, b"x" * 40)])
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        while backup.next_event() is not NEED_DATA:
            pass
    assert backup.state is State.ERROR


def test_a_frame_from_another_connection_or_reflected_is_refused() -> None:
    backup, primary = connected()
    _, other_primary = connected()
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        pump(other_primary, backup, other_primary.send(Heartbeat()))
    backup, primary = connected()
    # The backup's own frame sent back to it: the other direction's key does not open it.
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        pump(primary, backup, backup.send(Heartbeat()))


def test_a_refused_proof_is_still_explained_to_the_client() -> None:
    # A primary that refuses the backup's proof cannot derive the backup's keys,
    # so its Error comes plain as the first frame after the backup's opening.
    backup, primary = Channel(BACKUP, SECRET), Channel(PRIMARY, SECRET)
    pump(backup, primary)
    assert pump(primary, backup) == [Authenticated(secure=True)]
    with pytest.raises(RemoteProtocolError, match="aborted the connection, saying: bad proof"):
        pump(primary, backup, encode_message(Error("bad proof")))
    # Anything else plain is not taken: only an Error, and only first.
    backup, primary = Channel(BACKUP, SECRET), Channel(PRIMARY, SECRET)
    pump(backup, primary)
    pump(primary, backup)
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        pump(primary, backup, encode_message(Welcome("pair", 1, HEADER)))


@pytest.mark.parametrize("secret", [SECRET, None])
def test_before_the_proof_frames_are_small(secret: bytes | None) -> None:
    primary = Channel(PRIMARY, secret)
    with pytest.raises(RemoteProtocolError, match="larger than the limit of 4096"):
        pump(primary, primary, (60 * 1024 * 1024).to_bytes(4, "little"))
    backup, primary = connected(secret)
    big = Entries([Entry(1, 0, 0, 0, b"y" * 100_000)])
    assert pump(primary, backup, primary.send(big)) == [big]


@settings(max_examples=100)
@given(st.binary(min_size=1, max_size=300))
def test_garbage_after_the_opening_is_only_ever_a_remote_protocol_error(data: bytes) -> None:
    backup, _ = connected()
    backup.receive_data(data)
    backup.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        while not isinstance(backup.next_event(), ConnectionClosed):
            pass


def test_a_handover_and_its_answer_stream_like_any_message() -> None:
    backup, primary = connected()
    handover = Handover(7, 120, 1, 0xABC)
    assert pump(primary, backup, primary.send(handover)) == [handover]
    assert pump(backup, primary, backup.send(HandedOver(2, 7))) == [HandedOver(2, 7)]
    # Only the primary hands over, only the backup answers.
    with pytest.raises(LocalProtocolError):
        backup.send(Handover(7, 120, 1, 0))
    with pytest.raises(LocalProtocolError):
        primary.send(HandedOver(2, 7))


def test_a_control_client_asks_for_a_switchover_instead_of_joining() -> None:
    client, primary = Channel(BACKUP, SECRET), Channel(PRIMARY, SECRET)
    pump(client, primary)
    pump(primary, client)
    pump(client, primary)
    assert pump(client, primary, client.send(Switchover())) == [Switchover()]
    assert client.state is primary.state is State.AWAIT_OUTCOME
    outcome = SwitchoverOutcome(done=False, refused=True, reason="no backup is attached")
    client.receive_data(primary.send(outcome))
    assert client.next_event() == outcome
    assert client.next_event() == ConnectionClosed()  # the conversation is over
    assert client.state is primary.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(Join(["kv.py"]))


def test_a_switchover_request_before_authenticating_is_refused() -> None:
    client, primary = Channel(BACKUP, SECRET), Channel(PRIMARY, SECRET)
    pump(client, primary)
    with pytest.raises(RemoteProtocolError):
        pump(client, primary, encode_message(Switchover()))
