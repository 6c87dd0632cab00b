"""What a backup learns from the replayed log that going live needs.

A backup's guest holds what the primary's guest held: the same clock, the same
bound addresses, the same connections. Going live, the backup's new front must
continue from there, not start afresh: the clock goes on from the last reply,
the guest's addresses are bound here, connection ids continue after the last
one the log handed out (an id names one connection for the whole life of the
guest), and every connection the guest still holds reads as reset, since its
real socket died with the old primary.
"""

from __future__ import annotations

from typing import Any

from ftproxy.core.records import Entry
from ftproxy.guest import protocol
from ftproxy.shell.supervisor import Exit, GuestFailure


class TakeoverState:
    """Follows the replayed entries and outputs of one guest."""

    def __init__(self, clock_step_ns: int) -> None:
        # Replies carry clock deltas: a live guest's clock continues from here.
        self.clock = protocol.GuestClock(clock_step_ns)
        # The guest's bound sockets, to bind for real at go-live:
        # sock -> [family, type, guest address, backlog or None]
        self.bound: dict[int, list[Any]] = {}
        # Stream connections the guest holds (accepted or connected, not yet
        # closed by it) -> whether it was already told of a reset on it.
        self.held: dict[int, bool] = {}
        # The id the next accepted connection gets (the front numbers them).
        self.next_accepted = protocol.FIRST_ACCEPTED_SOCK

    def follow_entry(self, exit: Exit, entry: Entry) -> None:
        """Take what go-live needs from one replayed entry."""
        try:
            mono_gain, wall_shift, result = protocol.split_reply(protocol.decode_body(entry.reply))
        except protocol.ProtocolError as exc:
            raise GuestFailure(f"entry {entry.seq} holds no reply: {exc}") from None
        self.clock.apply(entry.icount, mono_gain, wall_shift)
        kind = exit.kind
        if kind == protocol.KIND_WAIT:
            events = result[2] if isinstance(result, tuple | list) and len(result) == 3 else None
            for event in events or ():
                if event[0] == protocol.EV_ACCEPT:
                    conn = event[2]
                    self.held[conn] = False
                    self.next_accepted = max(self.next_accepted, conn + 1)
                elif event[0] == protocol.EV_RESET and event[1] in self.held:
                    self.held[event[1]] = True
        elif kind == protocol.KIND_BIND:
            sock, family, sock_type, _ = exit.args
            code, address = result[:2]
            if code == 0:
                self.bound[sock] = [family, sock_type, tuple(address), None]
        elif kind == protocol.KIND_LISTEN:
            sock, backlog = exit.args
            if sock in self.bound and result == 0:
                self.bound[sock][3] = backlog
        elif kind == protocol.KIND_CONNECT:
            sock = exit.args[0]
            # The front takes a bound socket over for the connection, whatever the outcome.
            self.bound.pop(sock, None)
            if result[0] == 0:
                self.held[sock] = False

    def follow_output(self, message: tuple[Any, ...]) -> None:
        """Take what go-live needs from one output of the replaying guest."""
        if message[0] == protocol.OP_CLOSE:
            self.bound.pop(message[1], None)
            self.held.pop(message[1], None)
