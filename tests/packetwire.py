"""An in-process Ethernet for packet-mode guests: no root, no interface, no kernel.

``StackWire`` stands where the packet front would (``ftproxy.shell.world.Front``): the
frames the guest transmits go into a client ``NetStack`` in the test's process,
and the client's frames come back to the guest as EV_FRAME events. A test then
runs a real guest process under a real supervisor, drives TCP from the client
stack, and can drop frames on purpose with a seeded generator.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import trio

from ftproxy.guest import protocol as p
from ftproxy.netstack import NetStack
from ftproxy.shell.sync import Doorbell

CLIENT_MAC = b"\x02\x00\x0a\xc8\x00\x0a"
CLIENT_IP = "10.200.0.10"


def now_ns() -> int:
    return int(trio.current_time() * 1e9)


class StackWire:
    """The guest's frames to a client stack and back, through one trio task."""

    def __init__(self, doorbell: Doorbell, *, drop_rate: float = 0.0, seed: int = 0) -> None:
        self._doorbell = doorbell
        rng = random.Random(seed)
        self.client = NetStack(CLIENT_MAC, CLIENT_IP, 24, random32=lambda: rng.getrandbits(32))
        self._drop = random.Random(seed + 1)
        self.drop_rate = drop_rate
        self.inbox: list[bytes] = []
        self.input_bytes = 0
        self.frames_to_guest = 0
        self.frames_from_guest = 0
        self.dropped = 0
        self._changed = trio.Event()
        self.closed = False

    # -- the front's side (ftproxy.shell.world.Front) ---------------------------------

    def ready(self, readable: list[int], writable: list[int]) -> bool:
        return bool(self.inbox)

    input_fd = None

    def pump(self) -> None:
        pass

    def collect(
        self, readable: list[int], writable: list[int], pressured: list[int]
    ) -> tuple[bytes, bytes, list[Any]]:
        frames, self.inbox = self.inbox, []
        self.input_bytes += sum(map(len, frames))
        self.frames_to_guest += len(frames)
        return b"", b"", [(p.EV_FRAME, frame) for frame in frames]

    def apply(self, message: tuple[Any, ...]) -> None:
        if message[0] != p.OP_FRAME:
            raise ValueError(f"a {p.OP_NAMES.get(message[0])} output in packet mode")
        self.frames_from_guest += 1
        if self._lost():
            return
        self.client.receive_frame(message[2], now_ns())
        self._move_client_frames()

    def close_all(self) -> None:
        self.closed = True

    # -- the client's side ------------------------------------------------------

    def _lost(self) -> bool:
        if self.drop_rate and self._drop.random() < self.drop_rate:
            self.dropped += 1
            return True
        return False

    def _move_client_frames(self) -> None:
        moved = False
        for frame in self.client.take_frames():
            if not self._lost():
                self.inbox.append(frame)
                moved = True
        if moved:
            self._doorbell.ring()
        self._changed.set()
        self._changed = trio.Event()

    def poke(self) -> None:
        """The test used the client stack: send what it queued."""
        self._move_client_frames()

    async def run_timers(self) -> None:
        """Fire the client stack's timers (retransmissions) on trio's clock; runs forever."""
        while True:
            deadline = self.client.next_deadline()
            with trio.move_on_at(float("inf") if deadline is None else deadline / 1e9):
                await self._changed.wait()
            self.client.on_time(now_ns())
            self._move_client_frames()

    async def until(self, condition: Callable[[], bool], timeout: float = 20.0) -> None:
        """Wait until ``condition()`` holds, re-checked whenever frames move."""
        with trio.fail_after(timeout):
            while not condition():
                await self._changed.wait()
