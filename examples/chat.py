"""A line-based chat room on :mod:`asyncio` streams.

Each client gets a random nickname and a welcome line; every line it sends goes to
every other client as ``NICK: line``. A timer announces the time and the head count
every few seconds. Commands: ``/nick NEW`` renames you, ``/who`` lists who is here,
``/quit`` leaves.

Run it standalone and talk to it with ``nc``::

    python examples/chat.py --port 7008
    nc 127.0.0.1 7008
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys

ADJECTIVES = (
    "amber",
    "brave",
    "calm",
    "dapper",
    "eager",
    "fuzzy",
    "gentle",
    "happy",
    "jolly",
    "keen",
    "lucky",
    "mellow",
    "nimble",
    "quiet",
    "swift",
    "witty",
)
MAX_NICK_LENGTH = 32
MAX_LINE_LENGTH = 64 * 1024


class ChatRoom:
    """The connected clients, their nicknames, and the periodic tick."""

    def __init__(self, tick_interval: float) -> None:
        self.writers: set[asyncio.StreamWriter] = set()
        self.sessions: set[asyncio.Task[None]] = set()
        self.nicks: dict[asyncio.StreamWriter, str] = {}
        self.tick_interval = tick_interval
        self.ticks = 0
        self._timer: asyncio.TimerHandle | None = None

    # --- the timer ---

    def start_ticking(self) -> None:
        """Schedule the first tick (a non-positive interval disables ticking)."""
        if self.tick_interval > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.tick_interval, self._tick)

    def _tick(self) -> None:
        self.ticks += 1
        self.broadcast(f"* tick {self.ticks}, {len(self.writers)} users")
        self.start_ticking()

    async def close(self) -> None:
        """Stop ticking, hang up on every client, and wait for their sessions to end."""
        if self._timer is not None:
            self._timer.cancel()
        for writer in self.writers:
            writer.transport.abort()  # at once, even if the client is not reading
        if self.sessions:
            await asyncio.wait(self.sessions)

    # --- talking ---

    def broadcast(self, text: str, exclude: asyncio.StreamWriter | None = None) -> None:
        """Queue ``text`` as a line to every client except ``exclude``."""
        data = (text + "\n").encode()
        for writer in self.writers:
            if writer is not exclude and not writer.is_closing():
                writer.write(data)

    @staticmethod
    def tell(writer: asyncio.StreamWriter, text: str) -> None:
        """Queue ``text`` as a line to one client."""
        if not writer.is_closing():
            writer.write((text + "\n").encode())

    # --- nicknames ---

    def pick_nick(self) -> str:
        """Choose a random nickname that nobody here uses."""
        taken = set(self.nicks.values())
        while True:
            nick = random.choice(ADJECTIVES) + "-" + str(random.randint(100, 999))
            if nick not in taken:
                return nick

    def rename(self, writer: asyncio.StreamWriter, new: str) -> None:
        """Handle ``/nick NEW``."""
        if not new or len(new) > MAX_NICK_LENGTH or any(c.isspace() for c in new):
            self.tell(writer, f"error: a nick is 1 to {MAX_NICK_LENGTH} non-blank characters")
        elif new in self.nicks.values():
            self.tell(writer, f"error: {new} is taken")
        else:
            old, self.nicks[writer] = self.nicks[writer], new
            self.tell(writer, f"you are now {new}")
            self.broadcast(f"* {old} is now {new}", exclude=writer)

    # --- one client's session ---

    def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Start a session for a new client, keeping a reference to its task."""
        session = asyncio.create_task(self.run_session(reader, writer))
        self.sessions.add(session)
        session.add_done_callback(self.sessions.discard)

    async def run_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client from connection to hang-up."""
        nick = self.pick_nick()
        self.writers.add(writer)
        self.nicks[writer] = nick
        self.tell(writer, f"welcome {nick}")
        self.broadcast(f"* {nick} joined", exclude=writer)
        try:
            await writer.drain()
            while line := await reader.readline():
                if not self.handle_line(writer, line.decode("utf-8", "replace").rstrip("\r\n")):
                    break
                await writer.drain()
        except (ConnectionError, ValueError):  # reset, or a line beyond the limit
            pass
        finally:
            self.writers.discard(writer)
            nick = self.nicks.pop(writer)
            self.broadcast(f"* {nick} left")
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def handle_line(self, writer: asyncio.StreamWriter, line: str) -> bool:
        """Act on one line from a client; return False when it should be hung up."""
        command, _, rest = line.partition(" ")
        if command == "/quit":
            self.tell(writer, "bye")
            return False
        if command == "/nick":
            self.rename(writer, rest.strip())
        elif command == "/who":
            self.tell(writer, "users: " + ", ".join(sorted(self.nicks.values())))
        elif command.startswith("/"):
            self.tell(writer, f"error: unknown command {command}")
        elif line:
            self.broadcast(f"{self.nicks[writer]}: {line}", exclude=writer)
        return True


async def serve(host: str, port: int, tick_interval: float) -> None:
    """Run the chat room until cancelled (Ctrl-C cancels it)."""
    room = ChatRoom(tick_interval)
    server = await asyncio.start_server(room.accept, host, port, limit=MAX_LINE_LENGTH)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print(f"chat listening on {bound_host}:{bound_port}", flush=True)
    room.start_ticking()
    try:
        await asyncio.get_running_loop().create_future()  # wait forever
    finally:
        # Stop accepting, then end the sessions ourselves rather than leave them
        # for asyncio.run() to cancel.
        server.close()
        await room.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=7008, help="port to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--tick",
        type=float,
        default=5.0,
        help="seconds between tick announcements, 0 to disable (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve the chat room until interrupted; return the process exit status."""
    args = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.tick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
