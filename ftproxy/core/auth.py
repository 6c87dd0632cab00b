"""Mutual authentication with a shared secret: a sans-I/O HMAC-SHA256 handshake.

Any framed connection (the arbiter's, the log channel) can carry it. Each side
sends a *challenge* (a fresh random nonce, and whether it uses a secret at all),
then a *proof*: an HMAC-SHA256, keyed with the secret, over

    DOMAIN || len(context) || context || role label || client nonce || server nonce

Both nonces make a proof good for one connection only (a recorded proof cannot
be replayed); the role label makes the client's proof differ from the server's,
so a proof reflected back at its sender fails; the context keeps a proof made
for one protocol from being accepted by another that shares the secret. The
secret itself never crosses the wire.

A typical exchange, where the server proves first so that the client never
hands its proof to a peer it has not verified::

    client                                 server
      challenge(nonce_c, secure)   ──▶
                                   ◀──   challenge(nonce_s, secure)
                                   ◀──   proof_s
      verify(proof_s)
      proof_c                      ──▶
                                         verify(proof_c)

Running without a secret ("insecure mode", ``secret=None``) must be chosen on
both sides: a side with a secret refuses a peer without one and vice versa, so
a forgotten ``--secret-file`` fails loudly instead of silently dropping
authentication. In insecure mode nonces and proofs are empty.

Once both proofs are verified, :meth:`Handshake.frame_keys` derives the keys
that seal every later frame (``ftproxy.core.sealing``): HKDF-SHA256 over the secret,
salted with both nonces, one key per direction, so no two connections (and no
two directions) ever share a key.

This module does no I/O except :func:`load_secret`, which reads a secret file.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import secrets
import stat
import struct
from typing import Final

import structlog
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "MIN_SECRET_SIZE",
    "NONCE_SIZE",
    "PROOF_SIZE",
    "AuthenticationError",
    "Handshake",
    "SecretFileError",
    "Side",
    "load_secret",
]

NONCE_SIZE: Final = 32
PROOF_SIZE: Final = hashlib.sha256().digest_size
MIN_SECRET_SIZE: Final = 16

_DOMAIN: Final = b"ftproxy-auth-v1\x00"
_KEY_DOMAIN: Final = b"ftproxy-frame-keys-v1\x00"
FRAME_KEY_SIZE: Final = 32
_CONTEXT_LENGTH: Final = struct.Struct("!H")


class Side(enum.Enum):
    """Which end of a connection this is: the side that opened it, or the side that accepted it."""

    CLIENT = "client"
    SERVER = "server"

    @property
    def peer(self) -> Side:
        """The role of the other end."""
        return Side.SERVER if self is Side.CLIENT else Side.CLIENT


class AuthenticationError(Exception):
    """The peer did not prove that it knows the secret, or the two sides disagree on using one."""


class SecretFileError(Exception):
    """A secret file that cannot be used; the message says which file and why."""


class Handshake:
    """One side of the mutual challenge-response; the caller moves the messages.

    The caller sends :attr:`nonce` and :attr:`secure` as its challenge, hands the
    peer's challenge to :meth:`receive_challenge`, sends :meth:`proof`, and hands
    the peer's proof to :meth:`verify`. Order between the two sides is the
    caller's protocol's business; this object only refuses to make or check a
    proof before it knows both nonces.

    ``secret=None`` selects insecure mode. ``nonce`` exists for tests; leave it
    out to get a fresh random one.
    """

    def __init__(
        self,
        role: Side,
        secret: bytes | None,
        *,
        context: bytes,
        nonce: bytes | None = None,
    ) -> None:
        if secret is not None and not secret:
            raise ValueError("the secret is empty; pass secret=None to run in insecure mode")
        if len(context) > 0xFFFF:
            raise ValueError("the context is longer than 65535 bytes")
        if nonce is None:
            nonce = secrets.token_bytes(NONCE_SIZE) if secret is not None else b""
        elif len(nonce) != (NONCE_SIZE if secret is not None else 0):
            raise ValueError(f"a nonce must be {NONCE_SIZE} bytes (empty in insecure mode)")
        self.role: Final = role
        self._secret = secret
        self._context = context
        self._nonce = nonce
        self._peer_nonce: bytes | None = None
        self._authenticated = False

    @property
    def secure(self) -> bool:
        """Whether this side uses a secret (False: insecure mode)."""
        return self._secret is not None

    @property
    def nonce(self) -> bytes:
        """This side's challenge nonce (empty in insecure mode)."""
        return self._nonce

    @property
    def authenticated(self) -> bool:
        """Whether the peer's proof has been verified."""
        return self._authenticated

    def receive_challenge(self, nonce: bytes, secure: bool) -> None:
        """Take the peer's challenge; raise AuthenticationError when the modes disagree."""
        if self._peer_nonce is not None:
            raise RuntimeError("the peer's challenge was already received")
        if self.secure and not secure:
            raise AuthenticationError(
                "the peer runs without a secret (--insecure) but this side requires one; "
                "give both sides the same --secret-file"
            )
        if not self.secure and secure:
            raise AuthenticationError(
                "the peer requires a shared secret but this side runs with --insecure; "
                "give both sides the same --secret-file"
            )
        expected = NONCE_SIZE if secure else 0
        if len(nonce) != expected:
            raise AuthenticationError(
                f"the peer's challenge nonce is {len(nonce)} bytes; expected {expected}"
            )
        self._peer_nonce = nonce

    def proof(self) -> bytes:
        """This side's proof (empty in insecure mode); needs the peer's challenge first."""
        return self._mac(self.role)

    def verify(self, proof: bytes) -> None:
        """Check the peer's proof; raise AuthenticationError when it is wrong."""
        expected = self._mac(self.role.peer)
        if not hmac.compare_digest(proof, expected):
            if not self.secure:
                raise AuthenticationError("the peer sent a proof, but both sides are insecure")
            raise AuthenticationError(
                "the peer's proof does not match: the two sides have different secrets"
            )
        self._authenticated = True

    def frame_keys(self) -> tuple[bytes, bytes]:
        """This connection's (sending, receiving) keys; only after the peer's proof verified."""
        if not self._authenticated or self._secret is None:
            raise RuntimeError("frame keys exist only once a secure peer has proved the secret")
        client_nonce, server_nonce = self._nonces()
        material = HKDF(
            algorithm=SHA256(),
            length=2 * FRAME_KEY_SIZE,
            salt=client_nonce + server_nonce,
            info=_KEY_DOMAIN + _CONTEXT_LENGTH.pack(len(self._context)) + self._context,
        ).derive(self._secret)
        client_to_server, server_to_client = material[:FRAME_KEY_SIZE], material[FRAME_KEY_SIZE:]
        if self.role is Side.CLIENT:
            return client_to_server, server_to_client
        return server_to_client, client_to_server

    def _nonces(self) -> tuple[bytes, bytes]:
        """(client nonce, server nonce)."""
        if self._peer_nonce is None:
            raise RuntimeError("a proof needs the peer's challenge first")
        if self.role is Side.CLIENT:
            return self._nonce, self._peer_nonce
        return self._peer_nonce, self._nonce

    def _mac(self, role: Side) -> bytes:
        client_nonce, server_nonce = self._nonces()
        if self._secret is None:
            return b""
        message = b"".join(
            [
                _DOMAIN,
                _CONTEXT_LENGTH.pack(len(self._context)),
                self._context,
                role.value.encode("ascii"),
                client_nonce,
                server_nonce,
            ]
        )
        return hmac.digest(self._secret, message, "sha256")


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read a shared secret from a file; raise SecretFileError with the reason when unusable.

    Trailing line endings are dropped, so ``head -c 32 /dev/urandom | base64 > F``
    and an editor-written file work alike. The secret must be at least
    ``MIN_SECRET_SIZE`` bytes. A file that others may read is accepted with a
    ``secret_file_exposed`` warning.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            data = file.read()
    except FileNotFoundError:
        raise SecretFileError(f"secret file {name} does not exist") from None
    except IsADirectoryError:
        raise SecretFileError(f"secret file {name} is a directory") from None
    except OSError as exc:
        raise SecretFileError(f"cannot read secret file {name}: {exc.strerror}") from None
    secret = data.rstrip(b"\r\n")
    if not secret:
        raise SecretFileError(f"secret file {name} is empty")
    if len(secret) < MIN_SECRET_SIZE:
        raise SecretFileError(
            f"secret file {name} holds {len(secret)} bytes; use at least {MIN_SECRET_SIZE} "
            f"(for example: head -c 32 /dev/urandom | base64 > {name})"
        )
    if stat.S_IMODE(mode) & 0o077:
        structlog.get_logger().warning(
            "secret_file_exposed",
            path=name,
            mode=oct(stat.S_IMODE(mode)),
            hint=f"chmod 600 {name}",
        )
    return secret
