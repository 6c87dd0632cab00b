"""Virtual entropy: a deterministic random bit generator seeded from the log.

At boot the supervisor hands the guest 32 bytes of real entropy (logged, so the
backup gets the same). Every random byte after that, ``os.urandom``,
``secrets``, ``uuid4``, the ``random`` module and new ``random.Random()``
instances, comes from BLAKE2b in counter mode keyed with that seed: as good as
the kernel's generator to the program, and identical on both replicas.
"""

from __future__ import annotations

import hashlib
import random as _random
from typing import Any

from ftproxy.guest._runtime import Runtime

_BLOCK = 64


class Entropy:
    """BLAKE2b(key=seed) over a 128-bit counter."""

    def __init__(self, runtime: Runtime, seed: bytes) -> None:
        self._runtime = runtime
        self._seed = seed
        self._counter = 0
        self._pool = b""

    def urandom(self, size: int) -> bytes:
        if size < 0:
            raise ValueError("negative argument not allowed")
        self._runtime.tick()
        while len(self._pool) < size:
            block = hashlib.blake2b(
                self._counter.to_bytes(16, "little"), key=self._seed, digest_size=_BLOCK
            ).digest()
            self._counter += 1
            self._pool += block
        out, self._pool = self._pool[:size], self._pool[size:]
        return out

    def getrandom(self, size: int, flags: int = 0) -> bytes:
        return self.urandom(size)


def install_random(entropy: Entropy) -> None:
    """Seed the module-level generator and make unseeded instances draw from ``entropy``."""
    real_seed = _random.Random.seed

    def seed(self: _random.Random, a: Any = None, version: int = 2) -> None:
        if a is None:
            a = int.from_bytes(entropy.urandom(32), "big")
        real_seed(self, a, version)

    _random.Random.seed = seed  # type: ignore[method-assign]
    _random._urandom = entropy.urandom  # type: ignore[attr-defined]
    # random.seed is a method bound to the original seed at import: rebind it.
    instance = _random._inst
    _random.seed = instance.seed
    instance.seed()
