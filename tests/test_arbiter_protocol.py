"""The arbiter's sans-I/O protocol: handshake, requests, framing, errors. No I/O here."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from arbiter._protocol import (
    MAX_FRAME_SIZE,
    MAX_NAME_LENGTH,
    NEED_DATA,
    PROTOCOL_VERSION,
    Authenticated,
    Connection,
    ConnectionClosed,
    Decision,
    Error,
    Event,
    Hello,
    LocalProtocolError,
    Message,
    Proof,
    Query,
    RemoteProtocolError,
    Side,
    State,
    TestAndSet,
    Undecided,
    encode_frame,
)
from ftproxy.core.auth import NONCE_SIZE

SECRET = b"k" * 32
NONCE_C = b"c" * NONCE_SIZE
NONCE_S = b"s" * NONCE_SIZE

Request = TestAndSet | Query


def client(secret: bytes | None = SECRET) -> Connection:
    return Connection(Side.CLIENT, secret, nonce=NONCE_C if secret else None)


def server(secret: bytes | None = SECRET) -> Connection:
    return Connection(Side.SERVER, secret, nonce=NONCE_S if secret else None)


def events(conn: Connection, data: bytes = b"") -> list[Event]:
    """Feed ``data`` and return every event up to NEED_DATA (or the close)."""
    if data:
        conn.receive_data(data)
    found: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return found
        found.append(event)
        if isinstance(event, ConnectionClosed):
            return found


def connected(secret: bytes | None = SECRET) -> tuple[Connection, Connection]:
    """A client and a server that finished the handshake."""
    c, s = client(secret), server(secret)
    assert events(s, c.data_to_send()) == []
    assert events(c, s.data_to_send()) == [Authenticated(secure=secret is not None)]
    assert events(s, c.data_to_send()) == [Authenticated(secure=secret is not None)]
    assert c.state is s.state is State.IDLE
    return c, s


def answer(model: dict[str, str], request: Request) -> Decision | Undecided:
    """What an arbiter holding ``model`` answers (and how it updates it)."""
    if isinstance(request, TestAndSet):
        winner = model.setdefault(request.key, request.candidate)
        return Decision(request.key, winner, winner == request.candidate)
    winner_or_none = model.get(request.key)
    if winner_or_none is None:
        return Undecided(request.key)
    return Decision(request.key, winner_or_none, False)


# --- The happy path ------------------------------------------------------------------


def test_test_and_set_then_query() -> None:
    c, s = connected()
    steps: list[tuple[Request, State, Decision | Undecided]] = [
        (TestAndSet("gen-1", "backup"), State.AWAIT_DECISION, Decision("gen-1", "backup", True)),
        (Query("gen-1"), State.AWAIT_ANSWER, Decision("gen-1", "backup", False)),
        (Query("gen-2"), State.AWAIT_ANSWER, Undecided("gen-2")),
    ]
    for request, waiting, reply in steps:
        assert events(s, c.send(request)) == [request]
        assert c.state is s.state is waiting
        assert events(c, s.send(reply)) == [reply]
        assert c.state is s.state is State.IDLE


def test_insecure_pair_agrees() -> None:
    c, s = connected(None)
    assert not c.secure and not s.secure


def test_client_may_send_its_request_with_its_proof() -> None:
    # data_to_send() is optional before send(): send() puts queued handshake bytes first.
    c, s = client(), server()
    events(s, c.data_to_send())
    assert events(c, s.data_to_send()) == [Authenticated(secure=True)]
    both = c.send(TestAndSet("k", "a"))
    assert events(s, both) == [Authenticated(secure=True), TestAndSet("k", "a")]


def test_close_between_requests_is_a_clean_close() -> None:
    _, s = connected()
    s.receive_data(b"")
    assert events(s) == [ConnectionClosed()]
    assert s.state is State.CLOSED
    assert s.next_event() == ConnectionClosed()  # and stays closed


def test_close_during_the_handshake_is_reported_as_a_close() -> None:
    c = client()
    c.receive_data(b"")
    assert events(c) == [ConnectionClosed()]


# --- Authentication ------------------------------------------------------------------


def test_wrong_secret_is_caught_by_the_client_first() -> None:
    c, s = client(b"x" * 32), server()
    events(s, c.data_to_send())
    with pytest.raises(RemoteProtocolError, match=r"authentication failed.*different secrets"):
        events(c, s.data_to_send())
    assert c.state is State.ERROR
    # The client tells the server why; the server reports that the peer gave up.
    with pytest.raises(
        RemoteProtocolError, match=r"client aborted the connection, saying: .*different secrets"
    ):
        events(s, c.send(Error("authentication failed: different secrets")))
    assert s.state is State.CLOSED


def test_forged_client_proof_is_rejected_by_the_server() -> None:
    s = server()
    events(s, encode_frame(Hello(PROTOCOL_VERSION, NONCE_C, True)))
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        events(s, encode_frame(Proof(b"\0" * 32)))
    assert s.state is State.ERROR


def test_reflected_server_proof_is_rejected() -> None:
    # A peer without the secret echoes the server's own proof back as its proof.
    s = server()
    events(s, encode_frame(Hello(PROTOCOL_VERSION, NONCE_C, True)))
    hello_and_proof = s.data_to_send()
    own_proof = hello_and_proof[len(encode_frame(Hello(PROTOCOL_VERSION, NONCE_S, True))) :]
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        events(s, own_proof)


def test_requests_before_authentication_are_refused() -> None:
    s = server()
    with pytest.raises(RemoteProtocolError, match="unexpected TestAndSet"):
        events(s, encode_frame(TestAndSet("k", "a")))
    c = client()
    with pytest.raises(LocalProtocolError, match="cannot send TestAndSet"):
        c.send(TestAndSet("k", "a"))


@pytest.mark.parametrize(
    ("client_secret", "server_secret", "match"),
    [(None, SECRET, "runs without a secret"), (SECRET, None, "runs with --insecure")],
)
def test_insecure_and_secure_refuse_each_other(
    client_secret: bytes | None, server_secret: bytes | None, match: str
) -> None:
    c, s = client(client_secret), server(server_secret)
    with pytest.raises(RemoteProtocolError, match=match):
        events(s, c.data_to_send())


def test_other_protocol_version_gets_a_clear_error() -> None:
    s = server()
    other = PROTOCOL_VERSION + 1
    with pytest.raises(
        RemoteProtocolError, match=f"version {other}; this side speaks version {PROTOCOL_VERSION}"
    ):
        events(s, encode_frame(Hello(other, NONCE_C, True)))
    # Errors are sticky, and the server may still say why before closing.
    with pytest.raises(RemoteProtocolError, match=f"version {other}"):
        s.next_event()
    c = client()
    with pytest.raises(
        RemoteProtocolError, match="server aborted the connection, saying: unsupported"
    ):
        events(c, s.send(Error("unsupported")))


def test_a_newer_hello_with_more_fields_still_reads_its_version() -> None:
    body = msgspec.msgpack.encode([0, 7, NONCE_C, True, "something new"])
    s = server()
    with pytest.raises(RemoteProtocolError, match="version 7"):
        events(s, len(body).to_bytes(4, "little") + body)


# --- Framing and garbage -------------------------------------------------------------


def test_oversized_frame_is_refused_from_its_length_alone() -> None:
    s = server()
    with pytest.raises(RemoteProtocolError, match="larger than the limit"):
        events(s, (MAX_FRAME_SIZE + 1).to_bytes(4, "little"))


def test_truncated_frame_then_close_is_an_error() -> None:
    s = server()
    frame = client().data_to_send()
    s.receive_data(frame[:-1])
    assert s.next_event() is NEED_DATA
    s.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        s.next_event()


@pytest.mark.parametrize(
    "body",
    [b"\xc1\xc1\xc1", b"\x93\x02\xa1\x80\xa1a"],  # not msgpack; a key that is not UTF-8
    ids=["not-msgpack", "bad-utf8"],
)
def test_undecodable_body_is_an_error(body: bytes) -> None:
    c, s = connected()
    with pytest.raises(RemoteProtocolError, match="malformed message"):
        events(s, c.forge(body))


# --- Replies must answer the request -------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "reply", "match"),
    [
        (TestAndSet("k", "a"), Decision("other", "a", True), "does not match"),
        (TestAndSet("k", "a"), Decision("k", "b", True), "won=True"),
        (TestAndSet("k", "a"), Decision("k", "a", False), "won=False"),
        (Query("k"), Decision("k", "a", True), "query says won=True"),
        (TestAndSet("k", "a"), Undecided("k"), "unexpected Undecided"),
    ],
)
def test_mismatched_reply(request_: Request, reply: Decision | Undecided, match: str) -> None:
    c, s = connected()
    events(s, c.send(request_))
    if isinstance(reply, Decision):
        with pytest.raises(LocalProtocolError, match=match):
            s.send(reply)
    with pytest.raises(RemoteProtocolError, match=match):
        events(c, s.forge(reply))


def test_one_request_at_a_time() -> None:
    c, s = connected()
    with pytest.raises(RemoteProtocolError, match=r"unexpected Query .* AWAIT_DECISION"):
        events(s, c.forge(TestAndSet("k", "a")) + c.forge(Query("k")))
    c.send(TestAndSet("k", "a"))
    with pytest.raises(LocalProtocolError, match="cannot send Query in state AWAIT_DECISION"):
        c.send(Query("k"))


# --- Local misuse --------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        Hello(PROTOCOL_VERSION, NONCE_C, True),
        Proof(b""),
        Decision("k", "a", True),
        Undecided("k"),
    ],
)
def test_client_cannot_send(event: Message) -> None:
    c, _ = connected()
    with pytest.raises(LocalProtocolError):
        c.send(event)  # type: ignore[arg-type]
    assert c.state is State.IDLE  # nothing changed


def test_server_cannot_send_requests() -> None:
    _, s = connected()
    with pytest.raises(LocalProtocolError, match="a server cannot send TestAndSet"):
        s.send(TestAndSet("k", "a"))


@pytest.mark.parametrize(
    "request_", [TestAndSet("", "a"), TestAndSet("k" * (MAX_NAME_LENGTH + 1), "a"), Query("\ud800")]
)
def test_out_of_limits_fields_are_not_sent(request_: Request) -> None:
    c, _ = connected()
    with pytest.raises(LocalProtocolError, match="cannot send"):
        c.send(request_)
    assert c.state is State.IDLE


def test_receive_after_end_of_stream() -> None:
    s = server()
    s.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        s.receive_data(b"more")


# --- Properties ----------------------------------------------------------------------

names = st.sampled_from(["gen-1", "gen-2", "gen-3"])
candidates = st.sampled_from(["primary", "backup", "intruder"])
requests = st.lists(
    st.one_of(st.builds(TestAndSet, names, candidates), st.builds(Query, names)), max_size=8
)


def run(
    conn: Connection, chunks: Iterable[bytes], respond: Callable[[Event], Message | None]
) -> tuple[list[Event], bytes]:
    """Drive one end over ``chunks``; return its events and everything it sent."""
    sent = bytearray(conn.data_to_send())
    seen: list[Event] = []
    for chunk in chunks:
        if not chunk:
            continue  # b"" would mean the end of the stream
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            seen.append(event)
            reply = respond(event)
            if reply is not None:
                sent += conn.send(reply)  # type: ignore[arg-type]
        sent += conn.data_to_send()
    return seen, bytes(sent)


def conversation(script: list[Request]) -> tuple[list[Event], bytes, list[Event], bytes]:
    """Play ``script`` between a client and a server answering from a model."""
    c, s = client(), server()
    todo = list(script)
    model: dict[str, str] = {}

    def client_respond(event: Event) -> Message | None:
        return todo.pop(0) if todo and not isinstance(event, ConnectionClosed) else None

    def server_respond(event: Event) -> Message | None:
        return answer(model, event) if isinstance(event, TestAndSet | Query) else None

    c_events, c_sent = [], bytearray(c.data_to_send())
    s_events, s_sent = [], bytearray()
    pending = bytes(c_sent)
    while pending:
        more, out = run(s, [pending], server_respond)
        s_events += more
        s_sent += out
        more, pending = run(c, [out], client_respond)
        c_events += more
        c_sent += pending
    return c_events, bytes(c_sent), s_events, bytes(s_sent)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


@given(requests, st.lists(st.integers(min_value=0), max_size=20))
def test_any_split_of_a_valid_stream_decodes_the_same(
    script: list[Request], cuts: list[int]
) -> None:
    c_events, c_sent, s_events, s_sent = conversation(script)
    model: dict[str, str] = {}
    todo = list(script)

    # The server, fed the client's bytes in arbitrary pieces, sees the same events
    # and sends the same bytes (its nonce is fixed, so its proof is too).
    seen, sent = run(
        server(),
        split(c_sent, cuts),
        lambda e: answer(model, e) if isinstance(e, TestAndSet | Query) else None,
    )
    assert seen == s_events
    assert sent == s_sent

    # And the other way round.
    seen, sent = run(client(), split(s_sent, cuts), lambda e: todo.pop(0) if todo else None)
    assert seen == c_events
    assert sent == c_sent


@given(requests)
def test_conversation_follows_the_model(script: list[Request]) -> None:
    c_events, _, s_events, _ = conversation(script)
    model: dict[str, str] = {}
    expected = [answer(model, request) for request in script]
    assert [e for e in c_events if not isinstance(e, Authenticated)] == expected
    assert [e for e in s_events if not isinstance(e, Authenticated)] == script
    # Test-and-set semantics: one winner per key, the winner always hears won=True.
    winners: dict[str, str] = {}
    for request, reply in zip(script, expected, strict=True):
        if isinstance(reply, Decision):
            assert winners.setdefault(reply.key, reply.winner) == reply.winner
            if isinstance(request, TestAndSet):
                assert reply.won == (request.candidate == reply.winner)


def feed_expecting_only_remote_errors(conn: Connection, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            if not chunk:
                continue  # b"" would mean the end of the stream
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if event is NEED_DATA or isinstance(event, ConnectionClosed):
                    break
                if isinstance(event, TestAndSet | Query):  # a server must answer to go on
                    conn.send(answer({}, event))
        conn.receive_data(b"")
        while not isinstance(conn.next_event(), ConnectionClosed):
            pass
    except RemoteProtocolError:
        assert conn.state in (State.ERROR, State.CLOSED)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)
framed_garbage = st.lists(
    st.one_of(
        msgpack_values.map(msgspec.msgpack.encode),
        st.tuples(st.integers(0, 6), msgpack_values, msgpack_values).map(
            lambda t: msgspec.msgpack.encode(list(t))
        ),
        st.binary(max_size=64),
    ),
    max_size=5,
).map(lambda bodies: b"".join(len(b).to_bytes(4, "little") + b for b in bodies))


@given(
    st.sampled_from(["server", "client", "authenticated server", "authenticated client"]),
    st.one_of(st.binary(max_size=300), framed_garbage),
    st.lists(st.integers(min_value=0), max_size=10),
)
def test_garbage_raises_only_remote_protocol_error(
    side: str, garbage: bytes, cuts: list[int]
) -> None:
    if side.startswith("authenticated"):
        c, s = connected()
        conn = s if side.endswith("server") else c
    else:
        conn = server() if side == "server" else client()
        conn.data_to_send()
    feed_expecting_only_remote_errors(conn, split(garbage, cuts))


@given(requests, st.data())
def test_corrupted_valid_streams_raise_only_remote_protocol_error(
    script: list[Request], data: st.DataObject
) -> None:
    _, c_sent, _, s_sent = conversation(script)
    for conn, stream in ((server(), c_sent), (client(), s_sent)):
        corrupted = bytearray(stream)
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(corrupted) - 1))
            corrupted[at] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(corrupted)))
        feed_expecting_only_remote_errors(conn, [bytes(corrupted[:cut])])
