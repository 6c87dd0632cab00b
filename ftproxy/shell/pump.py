"""The byte pump between a trio stream and a sans-I/O session (``ftproxy.core.session``):
the log channel's link and the arbiter's client and server all turn bytes into the
session's next event the same way, so that loop lives here once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal, Protocol, TypeVar

from ftproxy.core.session import NEED_DATA, _NeedData

E_co = TypeVar("E_co", covariant=True)


class SansIOSession(Protocol[E_co]):
    """What the pump needs of a session: bytes in, events and bytes out."""

    def next_event(self) -> E_co | Literal[_NeedData.NEED_DATA]: ...

    def data_to_send(self) -> bytes: ...

    def receive_data(self, data: bytes) -> None: ...


async def pump_event(
    session: SansIOSession[E_co],
    receive: Callable[[], Awaitable[bytes]],
    send: Callable[[bytes], Awaitable[object]],
) -> E_co:
    """The session's next event: what the session says on its own (the opening's
    messages) goes out with ``send`` as soon as it is due, and ``receive``'s bytes
    (``b""``: the peer closed) go in until an event is complete."""
    while True:
        event = session.next_event()
        if outgoing := session.data_to_send():
            await send(outgoing)
        if event is not NEED_DATA:
            return event
        session.receive_data(await receive())
