"""``--arbiter`` addresses, the arbiter's timing, and the one interface over both arbiters."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import arbiter
from arbiter import (
    ArbiterAddressError,
    ArbiterTiming,
    BuiltinAddress,
    EtcdAddress,
    EtcdSettings,
    parse_arbiter,
)


def test_host_port_is_the_builtin_arbiter() -> None:
    assert parse_arbiter("127.0.0.1:7000") == BuiltinAddress(("127.0.0.1", 7000))
    assert parse_arbiter("[::1]:7000") == BuiltinAddress(("::1", 7000))
    assert str(parse_arbiter("[::1]:7000")) == "[::1]:7000"


def test_etcd_addresses_name_every_endpoint_and_their_settings() -> None:
    parsed = parse_arbiter("etcd://a:2379,b:2379,[::1]:2379")
    assert parsed == EtcdAddress((("a", 2379), ("b", 2379), ("::1", 2379)))
    assert str(parsed) == "etcd://a:2379,b:2379,[::1]:2379"
    tls = parse_arbiter("etcds://ftproxy@a:1?ca=/c.pem&cert=/me.pem&key=/me.key")
    assert tls == EtcdAddress(
        (("a", 1),), True, EtcdSettings("/c.pem", "/me.pem", "/me.key", "ftproxy")
    )
    assert str(tls) == "etcds://ftproxy@a:1"  # no file names, and never a password
    flags = EtcdSettings(user="u", password_file="/p")
    assert parse_arbiter("etcd://a:1", flags) == EtcdAddress((("a", 1),), False, flags)


@pytest.mark.parametrize(
    ("text", "settings", "expected"),
    [
        ("etcd://a:1,b", None, "'b' is not HOST:PORT"),
        ("etcd://a:1,", None, "an empty endpoint"),
        ("etcd://a:1,b;c:2", None, "'b;c:2' is not HOST:PORT"),
        ("etcd:/a:1", None, "expected HOST:PORT (the built-in arbiter) or etcd://"),
        ("consul://a:1", None, "unknown scheme consul://"),
        ("etcd://a:1/v3", None, "no path"),
        ("etcd://a:1?ca=/x", None, "write etcds://"),
        ("etcds://a:1?cert=/x", None, "needs its key"),
        ("etcd://a:1?password-file=/p", None, "without a user"),
        ("etcd://a:1?user=u&user=v", None, "given twice"),
        ("etcd://a:1?user=", None, "has no value"),
        ("etcd://u@a:1", EtcdSettings(user="v"), "give one of them"),
        ("a:1", EtcdSettings(ca="/c"), "--etcd-ca goes with an etcd arbiter"),
        ("etcd://u:secret@a:1", None, "a password never goes in the address"),
    ],
)
def test_malformed_addresses_say_what_is_wrong(
    text: str, settings: EtcdSettings | None, expected: str
) -> None:
    with pytest.raises(ArbiterAddressError) as caught:
        parse_arbiter(text, settings)
    assert expected in str(caught.value)
    assert "secret" not in str(caught.value)
    assert str(caught.value).startswith("--")  # names the flag


def test_connect_reads_the_files_and_refuses_unusable_ones(tmp_path: Path) -> None:
    missing = tmp_path / "none"
    with pytest.raises(ArbiterAddressError, match="--etcd-password-file"):
        arbiter.connect(parse_arbiter(f"etcd://u@a:1?password-file={missing}"), None)
    with pytest.raises(ArbiterAddressError, match="--etcd-ca"):
        arbiter.connect(parse_arbiter(f"etcds://a:1?ca={missing}"), None)
    with pytest.raises(ArbiterAddressError, match="needs a password"):
        arbiter.connect(parse_arbiter("etcd://u@a:1"), None)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ArbiterAddressError, match="empty"):
        arbiter.connect(parse_arbiter(f"etcd://u@a:1?password-file={empty}"), None)
    assert arbiter.connect("127.0.0.1:1", None).kind == "builtin"
    assert arbiter.connect(("127.0.0.1", 1), None).describe() == "127.0.0.1:1"
    assert arbiter.connect("etcd://a:1,b:2", None).describe() == "etcd://a:1,b:2"


def test_timing_is_on_the_peer_timeouts_scale() -> None:
    default = ArbiterTiming.for_peer_timeout(0.5)
    assert default.connect_s == 0.125 and default.max_backoff_s == 0.125
    assert default.answer_s == 2.0 and default.first_backoff_s == 0.05
    fast = ArbiterTiming.for_peer_timeout(0.1)
    assert fast.connect_s == 0.05 and fast.max_backoff_s == 0.025 and fast.answer_s == 1.0
    assert fast.first_backoff_s <= fast.max_backoff_s
    slow = ArbiterTiming.for_peer_timeout(30.0)
    assert slow.connect_s == 5.0 and slow.answer_s == 5.0 and slow.max_backoff_s == 2.0


async def test_the_free_functions_ask_any_arbiter(tmp_path: Path) -> None:
    """Code written against arbiter.test_and_set(address, ...) works with an Arbiter too."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(arbiter.serve, "127.0.0.1", 0, tmp_path / "store", None)
        builtin = arbiter.connect(f"127.0.0.1:{port}", None)
        decision = await arbiter.test_and_set(builtin, "k/generation/1", "me", None)
        assert decision.won
        assert await arbiter.query(builtin, "k/generation/1", None) == arbiter.Decision(
            "k/generation/1", "me", False
        )
        again = await arbiter.test_and_set_retrying(builtin, "k/generation/1", "you", None)
        assert again == arbiter.Decision("k/generation/1", "me", False)
        # The address form is unchanged.
        by_address = await arbiter.query(("127.0.0.1", port), "k/generation/1", None)
        assert isinstance(by_address, arbiter.Decision) and by_address.winner == "me"
        nursery.cancel_scope.cancel()


async def test_a_refusal_is_not_retried(tmp_path: Path) -> None:
    secret = b"s" * 32
    async with trio.open_nursery() as nursery:
        port = await nursery.start(arbiter.serve, "127.0.0.1", 0, tmp_path / "store", secret)
        wrong = arbiter.connect(f"127.0.0.1:{port}", b"w" * 32)
        with pytest.raises(arbiter.ArbiterRefused, match="different secrets"):
            await arbiter.ask_until_answered(
                wrong, lambda: wrong.query("k/generation/1"), ArbiterTiming()
            )
        nursery.cancel_scope.cancel()
