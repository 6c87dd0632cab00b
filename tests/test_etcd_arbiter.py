"""etcd as the arbiter, asked from trio: real etcd processes, never a mock.

The same answers as the built-in arbiter (first candidate wins for good, a winner
asking again is told it won), one transaction per test-and-set, the endpoints
tried in turn, quorum loss reported as unavailability, wrong credentials and
certificates as refusals, and every call bounded so that the event loop and
the heartbeats go on.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
import trio
from etcd_harness import BlackHole, enable_auth, needs_etcd, stored_winner

import arbiter
from arbiter import ArbiterRefused, ArbiterTiming, ArbiterUnavailable, Decision, Undecided

pytestmark = needs_etcd

# The bounds a replica with the default 500 ms peer timeout uses.
TIMING = ArbiterTiming.for_peer_timeout(0.5)


def connect(address: str, **settings: str) -> arbiter.Arbiter:
    parsed = arbiter.parse_arbiter(address, arbiter.EtcdSettings(**settings))
    return arbiter.connect(parsed, None, timing=TIMING)


async def test_the_first_candidate_wins_for_good_and_asking_again_is_answered(etcd) -> None:
    cluster = etcd(1)
    arb = connect(cluster.address)
    assert arb.kind == "etcd"
    assert await arb.query("pair/generation/1") == Undecided("pair/generation/1")
    first = await arb.test_and_set("pair/generation/1", "backup@h:1")
    assert first == Decision("pair/generation/1", "backup@h:1", True)
    # The winner asking again (its reply was lost, say) is told it won.
    assert (await arb.test_and_set("pair/generation/1", "backup@h:1")).won
    second = await arb.test_and_set("pair/generation/1", "primary@h:2")
    assert second == Decision("pair/generation/1", "backup@h:1", False)
    assert await arb.query("pair/generation/1") == Decision(
        "pair/generation/1", "backup@h:1", False
    )
    # The key layout the README documents, read by etcd's own client.
    assert stored_winner(cluster, "pair/generation/1") == "backup@h:1"
    assert (await arb.test_and_set("pair/generation/2", "primary@h:2")).won


async def test_concurrent_candidates_agree_on_exactly_one_winner(etcd) -> None:
    cluster = etcd(3)
    decisions: list[Decision] = []

    async def candidate(name: str) -> None:
        # Each candidate its own client, as each replica is.
        decisions.append(await connect(cluster.address).test_and_set("race/generation/1", name))

    async with trio.open_nursery() as nursery:
        for index in range(12):
            nursery.start_soon(candidate, f"replica-{index}")
    winners = {d.winner for d in decisions}
    assert len(winners) == 1, winners
    assert sum(d.won for d in decisions) == 1
    assert stored_winner(cluster, "race/generation/1") in winners


async def test_one_member_down_of_three_changes_nothing(etcd) -> None:
    cluster = etcd(3)
    # Its first endpoint is the dead member's: the client goes on to the next.
    cluster.members[0].kill()
    arb = connect(cluster.address)
    assert (await arb.test_and_set("k/generation/1", "a")).won
    assert not (await arb.test_and_set("k/generation/1", "b")).won


async def test_quorum_lost_is_unavailable_and_a_member_back_answers(etcd) -> None:
    cluster = etcd(3)
    arb = connect(cluster.address)
    assert isinstance(await arb.query("q/generation/1"), Undecided)
    cluster.members[0].kill()
    cluster.members[1].kill()
    with pytest.raises(ArbiterUnavailable, match="no etcd endpoint answered"):
        await arb.test_and_set("q/generation/1", "backup")
    with pytest.raises(ArbiterUnavailable):
        await arb.query("q/generation/1")
    cluster.members[1].start()
    cluster.wait_healthy(members=[cluster.members[1], cluster.members[2]])
    # The request that timed out may have been committed since: either way the
    # candidate is told it won, and the key holds it.
    decision = await arbiter.ask_until_answered(
        arb, lambda: arb.test_and_set("q/generation/1", "backup"), TIMING
    )
    assert decision.won
    assert stored_winner(cluster, "q/generation/1") == "backup"


async def test_a_frozen_etcd_never_stalls_the_event_loop(etcd) -> None:
    cluster = etcd(1)
    arb = connect(cluster.address)
    await arb.query("warm/generation/1")
    cluster.members[0].freeze()
    gaps: list[float] = []
    done = trio.Event()

    async def heartbeat() -> None:
        last = trio.current_time()
        while not done.is_set():
            await trio.sleep(0.01)
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat)
        started = trio.current_time()
        with pytest.raises(ArbiterUnavailable, match="within"):
            await arb.test_and_set("frozen/generation/1", "backup")
        elapsed = trio.current_time() - started
        done.set()
    cluster.members[0].thaw()
    # The call gave up after its bound (TIMING.answer_s), not etcd's own 7 s...
    assert elapsed < TIMING.answer_s + 1.0, elapsed
    # ... and a 10 ms ticker kept ticking all along (a blocked loop would show one gap).
    assert len(gaps) > 20
    assert max(gaps) < 0.5, max(gaps)


@pytest.mark.parametrize("kind", ["builtin", "etcd"])
async def test_a_black_holed_arbiter_costs_a_fraction_of_the_peer_timeout(
    kind: str, black_hole: BlackHole
) -> None:
    address = black_hole.address if kind == "builtin" else f"etcd://{black_hole.address}"
    arb = connect(address)
    started = trio.current_time()
    with pytest.raises(ArbiterUnavailable, match=f"within {TIMING.connect_s:g} s"):
        await arb.test_and_set("hole/generation/1", "backup")
    # connect_s is a quarter of the 500 ms peer timeout, where it used to be 5 s.
    assert trio.current_time() - started < 0.5


async def test_a_black_holed_endpoint_is_passed_over_for_the_next(
    etcd, black_hole: BlackHole
) -> None:
    cluster = etcd(1)
    arb = connect(f"etcd://{black_hole.address},{cluster.members[0].endpoint}")
    assert (await arb.test_and_set("pass/generation/1", "backup")).won
    # The endpoint that answered is asked first from now on.
    with trio.fail_after(TIMING.connect_s):
        assert (await arb.query("pass/generation/1")) == Decision(
            "pass/generation/1", "backup", False
        )


async def test_a_silent_arbiter_is_bounded_too() -> None:
    # Connects (the kernel accepts), then nothing: the answer bound applies.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"etcd://127.0.0.1:{port}"):
            arb = connect(address)
            started = trio.current_time()
            with pytest.raises(ArbiterUnavailable):
                await arb.test_and_set("silent/generation/1", "backup")
            assert trio.current_time() - started < TIMING.answer_s + 1.0


async def test_wrong_credentials_are_refused_with_a_clear_error(etcd, tmp_path: Path) -> None:
    cluster = etcd(1)
    password = enable_auth(cluster, tmp_path)
    good = connect(cluster.address, user="ftproxy", password_file=str(password))
    assert (await good.test_and_set("auth/generation/1", "backup")).won
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    bad = connect(cluster.address, user="ftproxy", password_file=str(wrong))
    with pytest.raises(ArbiterRefused, match="invalid user ID or password"):
        await bad.test_and_set("auth/generation/1", "intruder")
    anonymous = connect(cluster.address)
    with pytest.raises(ArbiterRefused, match="--etcd-user"):
        await anonymous.query("auth/generation/1")
    # A user etcd knows, without the role that may touch ftproxy/.
    root = ["--user", "root:root-password-1"]
    assert cluster.etcdctl(*root, "user", "add", "stranger:stranger-pw").returncode == 0
    stranger_password = tmp_path / "stranger"
    stranger_password.write_text("stranger-pw\n")
    stranger_password.chmod(0o600)
    stranger = connect(cluster.address, user="stranger", password_file=str(stranger_password))
    with pytest.raises(ArbiterRefused, match="permission denied"):
        await stranger.test_and_set("auth/generation/1", "stranger")
    # Only the right user's decision is stored (read back as etcd's root).
    assert stored_winner(cluster, "auth/generation/1", *root) == "backup"


async def test_tls_with_client_certificates(etcd, tmp_path: Path) -> None:
    cluster = etcd(1, tls=True)
    tls = etcd.client_tls
    assert cluster.address.startswith("etcds://")
    arb = connect(cluster.address, ca=str(tls.ca), cert=str(tls.cert), key=str(tls.key))
    assert (await arb.test_and_set("tls/generation/1", "backup")).won
    # No client certificate: the member refuses it. Under TLS 1.3 that comes after
    # the handshake, as an alert or, racing our request, as a reset: either way
    # nothing is decided, and the message says what to check.
    bare = connect(cluster.address, ca=str(tls.ca))
    with pytest.raises(
        (ArbiterRefused, ArbiterUnavailable), match=r"certificate required|--etcd-cert"
    ):
        await bare.query("tls/generation/1")
    # A CA that did not sign the member's certificate: we refuse the member.
    import trustme

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    stranger = connect(cluster.address, ca=str(other), cert=str(tls.cert), key=str(tls.key))
    with pytest.raises(ArbiterRefused, match="certificate"):
        await stranger.query("tls/generation/1")
    # Plain HTTP to a TLS member: it hangs up, as a dying member would; the
    # reason says what to check.
    plain = connect(f"etcd://{cluster.members[0].endpoint}")
    with pytest.raises(ArbiterUnavailable, match="write etcds://"):
        await plain.query("tls/generation/1")


async def test_a_tls_member_that_died_is_unavailable_not_refused(etcd) -> None:
    cluster = etcd(1, tls=True)
    tls = etcd.client_tls
    arb = connect(cluster.address, ca=str(tls.ca), cert=str(tls.cert), key=str(tls.key))
    await arb.query("k/generation/1")
    cluster.members[0].kill()
    with pytest.raises(ArbiterUnavailable):
        await arb.test_and_set("k/generation/1", "backup")


async def test_a_member_that_fails_tls_is_passed_over_for_the_next(etcd) -> None:
    stranger = etcd(1, tls=True)  # its certificate is signed by a CA we do not trust
    secure = etcd(1, tls=True)
    tls = etcd.client_tls  # secure's CA and client certificate
    files = {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)}
    both = f"etcds://{stranger.members[0].endpoint},{secure.members[0].endpoint}"
    assert (await connect(both, **files).test_and_set("next/generation/1", "backup")).won
    # When no member will talk TLS with us, that is a refusal, not an outage.
    alone = connect(f"etcds://{stranger.members[0].endpoint}", **files)
    with pytest.raises(ArbiterRefused, match="TLS with etcd"):
        await alone.query("next/generation/1")


async def test_tls_to_a_plain_member_says_what_to_check(etcd) -> None:
    plain = etcd(1)
    arb = connect(f"etcds://{plain.members[0].endpoint}")
    # It hangs up on the handshake, as a dying member would: keep asking, and say why.
    with pytest.raises(ArbiterUnavailable, match="etcd://"):
        await arb.query("plain/generation/1")


async def test_a_tls_hello_answered_with_a_reset_says_what_to_check() -> None:
    # A plain member hangs up on our hello; with the hello still unread that is a reset,
    # not an EOF (what a loaded machine turned the test above into): the same advice.
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    async def reset_the_hello() -> None:
        conn, _ = await listener.accept()
        with conn:
            await conn.recv(1)  # the rest of the hello stays unread
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reset_the_hello)
        arb = connect(f"etcds://127.0.0.1:{port}")
        with pytest.raises(ArbiterUnavailable, match=r"Connection reset.*write etcd://"):
            await arb.query("reset/generation/1")
    listener.close()
