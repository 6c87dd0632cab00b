"""A line-oriented TCP echo server built on :mod:`socketserver`.

Every byte a client sends comes straight back until the client closes its side of
the connection. The server is single-threaded: it serves one connection at a time,
which is exactly the kind of program ftproxy replicates.

Run it standalone::

    python examples/echo.py --port 7007
"""

from __future__ import annotations

import argparse
import socketserver
import sys

CHUNK_SIZE = 65536


class EchoHandler(socketserver.StreamRequestHandler):
    """Echo whatever arrives on the connection until end of file."""

    def handle(self) -> None:
        try:
            while chunk := self.rfile.read1(CHUNK_SIZE):
                self.wfile.write(chunk)
        except ConnectionError:
            pass  # The client reset the connection: nothing left to echo.


class EchoServer(socketserver.TCPServer):
    """A single-threaded TCP server that can be restarted on the same port at once."""

    allow_reuse_address = True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=7007, help="port to bind (default: %(default)s)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve echo requests until interrupted; return the process exit status."""
    args = parse_args(argv)
    server = EchoServer((args.host, args.port), EchoHandler)
    host, port = server.server_address[:2]
    try:
        print(f"echo listening on {host}:{port}", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
