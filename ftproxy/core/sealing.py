"""Frames sealed with an AEAD after the opening, sans I/O.

Once both sides of a secure conversation have proved the secret
(``ftproxy.core.auth``), every further frame body is sealed with
ChaCha20-Poly1305 (``cryptography``) under a key that the opening derived for
this connection and this direction alone. The nonce is the frame's number in
its direction, counted by both sides and never sent, so a frame that was
altered, replayed, reordered, dropped before a later one, or injected fails
to open, and the conversation treats the peer as broken. The body is also
encrypted: nobody on the path reads a client's data.
"""

from __future__ import annotations

import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = ["KEY_SIZE", "TAG_SIZE", "Opener", "SealError", "Sealer"]

KEY_SIZE: Final = 32
TAG_SIZE: Final = 16
_NONCE: Final = struct.Struct("<Q4x")  # the frame counter, zero-padded to 96 bits


class SealError(Exception):
    """A sealed frame did not open: altered, replayed, reordered, injected, or another key."""


class Sealer:
    """Seals one direction's frames, numbering them from 0."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.count = 0

    def seal(self, body: bytes) -> bytes:
        sealed = self._aead.encrypt(_NONCE.pack(self.count), body, None)
        self.count += 1
        return sealed


class Opener:
    """Opens the other direction's frames, expecting them numbered from 0, in order."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.count = 0

    def open(self, sealed: bytes) -> bytes:
        try:
            body = self._aead.decrypt(_NONCE.pack(self.count), sealed, None)
        except InvalidTag:
            raise SealError(
                f"frame {self.count} after the opening failed authentication "
                "(altered, replayed, reordered or injected on the way)"
            ) from None
        self.count += 1
        return body
