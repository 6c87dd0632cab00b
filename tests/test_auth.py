"""The shared-secret handshake (ftproxy.core.auth): mutual proofs, mode agreement, secret files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from ftproxy.core.auth import (
    MIN_SECRET_SIZE,
    NONCE_SIZE,
    PROOF_SIZE,
    AuthenticationError,
    Handshake,
    SecretFileError,
    Side,
    load_secret,
)

SECRET = b"s" * 32
OTHER = b"o" * 32
CONTEXT = b"test"


def exchange_challenges(client: Handshake, server: Handshake) -> None:
    client.receive_challenge(server.nonce, server.secure)
    server.receive_challenge(client.nonce, client.secure)


def pair(
    client_secret: bytes | None = SECRET, server_secret: bytes | None = SECRET
) -> tuple[Handshake, Handshake]:
    client = Handshake(Side.CLIENT, client_secret, context=CONTEXT)
    server = Handshake(Side.SERVER, server_secret, context=CONTEXT)
    return client, server


def test_same_secret_both_sides_verify() -> None:
    client, server = pair()
    exchange_challenges(client, server)
    client.verify(server.proof())
    server.verify(client.proof())
    assert client.authenticated and server.authenticated
    assert len(client.nonce) == NONCE_SIZE
    assert len(client.proof()) == PROOF_SIZE


def test_different_secrets_fail_both_ways() -> None:
    client, server = pair(SECRET, OTHER)
    exchange_challenges(client, server)
    with pytest.raises(AuthenticationError, match="different secrets"):
        client.verify(server.proof())
    with pytest.raises(AuthenticationError, match="different secrets"):
        server.verify(client.proof())
    assert not client.authenticated and not server.authenticated


def test_reflected_proof_fails() -> None:
    # A peer without the secret echoes the other side's own proof back to it.
    # The role label makes a server's proof useless as a client's, and vice versa.
    client, server = pair()
    exchange_challenges(client, server)
    with pytest.raises(AuthenticationError):
        server.verify(server.proof())
    with pytest.raises(AuthenticationError):
        client.verify(client.proof())


def test_proof_is_bound_to_both_nonces() -> None:
    client, server = pair()
    exchange_challenges(client, server)
    recorded = client.proof()
    # A new connection (fresh server nonce) does not accept a recorded proof.
    _, server2 = pair()
    server2.receive_challenge(client.nonce, True)
    with pytest.raises(AuthenticationError):
        server2.verify(recorded)


def test_context_separates_protocols() -> None:
    nonce_c, nonce_s = b"c" * NONCE_SIZE, b"s" * NONCE_SIZE
    client = Handshake(Side.CLIENT, SECRET, context=b"log-channel", nonce=nonce_c)
    server = Handshake(Side.SERVER, SECRET, context=b"arbiter", nonce=nonce_s)
    exchange_challenges(client, server)
    with pytest.raises(AuthenticationError):
        server.verify(client.proof())


def test_fixed_nonces_make_proofs_reproducible() -> None:
    nonce_c, nonce_s = b"c" * NONCE_SIZE, b"s" * NONCE_SIZE
    proofs = []
    for _ in range(2):
        client = Handshake(Side.CLIENT, SECRET, context=CONTEXT, nonce=nonce_c)
        client.receive_challenge(nonce_s, True)
        proofs.append(client.proof())
    assert proofs[0] == proofs[1]


def test_secure_side_refuses_an_insecure_peer() -> None:
    client, server = pair(None, SECRET)
    with pytest.raises(AuthenticationError, match=r"runs without a secret \(--insecure\)"):
        server.receive_challenge(client.nonce, client.secure)
    with pytest.raises(AuthenticationError, match="runs with --insecure"):
        client.receive_challenge(server.nonce, server.secure)


def test_both_insecure_agree_with_empty_proofs() -> None:
    client, server = pair(None, None)
    assert client.nonce == b"" and not client.secure
    exchange_challenges(client, server)
    assert client.proof() == b""
    client.verify(server.proof())
    server.verify(client.proof())
    with pytest.raises(AuthenticationError):
        server.verify(b"x" * PROOF_SIZE)


def test_wrong_nonce_length_is_refused() -> None:
    _, server = pair()
    with pytest.raises(AuthenticationError, match="nonce is 3 bytes"):
        server.receive_challenge(b"abc", True)


def test_misuse_is_a_runtime_error() -> None:
    client, _ = pair()
    with pytest.raises(RuntimeError, match="peer's challenge first"):
        client.proof()
    with pytest.raises(ValueError, match="secret=None"):
        Handshake(Side.CLIENT, b"", context=CONTEXT)


@given(st.binary(max_size=64))
def test_a_guessed_proof_fails(guess: bytes) -> None:
    client, server = pair()
    exchange_challenges(client, server)
    with pytest.raises(AuthenticationError):
        server.verify(guess)


# --- load_secret -------------------------------------------------------------------


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def test_load_secret_strips_the_line_ending(tmp_path: Path) -> None:
    path = write(tmp_path / "secret", b"0123456789abcdef0123\n")
    assert load_secret(path) == b"0123456789abcdef0123"


def test_load_secret_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="does not exist"):
        load_secret(tmp_path / "nope")


def test_load_secret_directory(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="is a directory"):
        load_secret(tmp_path)


def test_load_secret_empty_file(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="is empty"):
        load_secret(write(tmp_path / "secret", b"\n"))


def test_load_secret_too_short(tmp_path: Path) -> None:
    short = b"x" * (MIN_SECRET_SIZE - 1)
    with pytest.raises(SecretFileError, match=f"holds {MIN_SECRET_SIZE - 1} bytes"):
        load_secret(write(tmp_path / "secret", short))


def test_load_secret_warns_when_others_may_read(tmp_path: Path) -> None:
    path = write(tmp_path / "secret", SECRET, mode=0o644)
    with capture_logs() as logs:
        assert load_secret(path) == SECRET
    assert [entry["event"] for entry in logs] == ["secret_file_exposed"]
    with capture_logs() as logs:
        load_secret(write(path, SECRET, mode=0o600))
    assert logs == []
