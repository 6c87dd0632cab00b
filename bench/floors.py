"""``python -m bench floors``: what a process hop costs on this machine, measured now.

The floors under every figure of the run: a one-byte round trip between two
processes over ``os.pipe`` (both free to run anywhere, then both pinned to one
CPU with ``os.sched_setaffinity``) and over loopback TCP (``TCP_NODELAY``,
1 byte each way), the TCP echo blocking in ``recv``, in a plain epoll loop and
in a trio loop (``trio.lowlevel.wait_readable`` and non-blocking reads, as
ftproxy's supervisors wait): what trio's loop adds to a wake-up, if anything.
Then the relay: the TCP echo's child passes each byte over a pipe to a
process of its own, which echoes it back the same way, the relay waiting in a
plain epoll loop, then in a trio loop. That is the least any design which
keeps the guest in a process of its own does per request (``ftproxy record``'s
path with nothing logged and no Python of its own), so the TCP echo over the
relay bounds what record can reach against bare at one client. Each is a
closed-loop ping-pong from this process to a child ``python -m bench.floors
echo ...``, timed trip by trip with ``perf_counter_ns``;
the figures are percentiles over the trips, in microseconds. A request through
ftproxy makes such hops (client -> supervisor -> guest -> supervisor -> backup
-> supervisor -> client), so these say how much of its time the hops alone need.

    python -m bench floors                  # 20,000 trips each, a few seconds
    python -m bench floors --trips 2000 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.matrix import percentile
from bench.procs import HOST, ROOT

TRIPS = 20_000
PING = b"x"


def _figures(trips_ns: list[int]) -> dict[str, float]:
    us = [ns / 1000 for ns in trips_ns]
    out = {}
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        value = percentile(us, q)
        if value is None:
            raise ValueError("no round trips measured")
        out[f"{label}_us"] = round(value, 2)
    return out


def _ping_pong(send: Callable[[], None], recv: Callable[[], bytes], trips: int) -> list[int]:
    now = time.perf_counter_ns
    out = []
    for _ in range(trips):
        start = now()
        send()
        if not recv():
            raise RuntimeError("the echo process closed its end")
        out.append(now() - start)
    return out


def _echo(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.floors", "echo", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        pass_fds=[int(a) for a in args[1:3]] if args[0] == "pipe" else (),
    )


def _reap(child: subprocess.Popen[bytes]) -> None:
    """The echo ends when its input closes; one that does not is killed."""
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    if child.stdout is not None:
        child.stdout.close()


@contextlib.contextmanager
def _pipe_echo(cpu: int | None = None) -> Iterator[tuple[int, int]]:
    """A child echoing over two pipes (pinned to ``cpu``, if given), once it is ready:
    (the end to write to it, the end to read its echo from); closed and reaped after."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    pinned = [] if cpu is None else [str(cpu)]
    child = _echo(["pipe", str(to_child_r), str(from_child_w), *pinned])
    os.close(to_child_r)
    os.close(from_child_w)
    try:
        assert child.stdout is not None
        child.stdout.readline()  # "ready": pinned, waiting on its pipe
        yield to_child_w, from_child_r
    finally:
        os.close(to_child_w)
        os.close(from_child_r)
        _reap(child)


def pipe_round_trip(trips: int, cpu: int | None = None) -> dict[str, Any]:
    """One byte there and back over two pipes to a child process; ``cpu``: both pinned there.

    Pinning applies to this thread only (Linux affinity is per thread), restored after.
    """
    saved = os.sched_getaffinity(0)
    with _pipe_echo(cpu) as (to_child, from_child):
        try:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

            def send() -> None:
                os.write(to_child, PING)

            times = _ping_pong(send, lambda: os.read(from_child, 1), trips)
        finally:
            os.sched_setaffinity(0, saved)
    return {"trips": trips, "pinned_cpu": cpu, **_figures(times)}


def tcp_round_trip(trips: int, echo: str = "tcp") -> dict[str, Any]:
    """One byte there and back on a loopback TCP connection (TCP_NODELAY) to a child
    that echoes blocking in recv (``tcp``) or from a trio loop (``tcp-trio``)."""
    child = _echo([echo])
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            times = _ping_pong(lambda: sock.sendall(PING), lambda: sock.recv(1), trips)
    finally:
        _reap(child)
    return {"trips": trips, **_figures(times)}


def measure(trips: int = TRIPS) -> dict[str, Any]:
    """The machine's floors, now: pipe (free, pinned to one CPU) and TCP round trips."""
    cpu = min(os.sched_getaffinity(0))
    return {
        "method": f"{trips:,} one-byte round trips each between this process and a child, "
        "closed loop, timed trip by trip; pinned: both processes on one CPU "
        "(sched_setaffinity)",
        "pipe": pipe_round_trip(trips),
        "pipe_pinned": pipe_round_trip(trips, cpu),
        "tcp": tcp_round_trip(trips),
        "tcp_epoll": tcp_round_trip(trips, "tcp-epoll"),
        "tcp_trio": tcp_round_trip(trips, "tcp-trio"),
        "relay_epoll": tcp_round_trip(trips, "relay-epoll"),
        "relay_trio": tcp_round_trip(trips, "relay-trio"),
    }


def _serve(argv: list[str]) -> int:
    """The child's side: echo every byte back until the other side closes."""
    kind = argv[0]
    if kind == "pipe":
        rfd, wfd = int(argv[1]), int(argv[2])
        if len(argv) > 3:
            os.sched_setaffinity(0, {int(argv[3])})
        print("ready", flush=True)
        while data := os.read(rfd, 1):
            os.write(wfd, data)
        return 0
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(_pipe_echo()) if kind.startswith("relay-") else None
        server = stack.enter_context(socket.create_server((HOST, 0)))
        print(server.getsockname()[1], flush=True)
        conn = stack.enter_context(server.accept()[0])
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if relay is not None:
            to_echo, from_echo = relay
            conn.setblocking(False)
            os.set_blocking(from_echo, False)
            if kind == "relay-trio":
                import trio

                trio.run(_trio_relay, conn, to_echo, from_echo)
            else:
                _epoll_relay(conn, to_echo, from_echo)
        elif kind == "tcp-trio":
            import trio

            trio.run(_trio_echo, conn)
        elif kind == "tcp-epoll":
            _epoll_echo(conn)
        else:
            while data := conn.recv(1):
                conn.sendall(data)
    return 0


def _epoll_relay(conn: socket.socket, to_echo: int, from_echo: int) -> None:
    to_pipe = functools.partial(os.write, to_echo)
    poller = select.epoll()
    poller.register(conn.fileno(), select.EPOLLIN)
    poller.register(from_echo, select.EPOLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == from_echo:
                conn.send(os.read(from_echo, 1))
            elif not _forward_ready(conn, to_pipe):
                return


async def _trio_relay(conn: socket.socket, to_echo: int, from_echo: int) -> None:
    """As a supervisor relays: one task waits on the connection, one on the pipe."""
    import trio

    to_pipe = functools.partial(os.write, to_echo)

    async def back() -> None:
        while True:
            await trio.lowlevel.wait_readable(from_echo)
            conn.send(os.read(from_echo, 1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(back)
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            if not _forward_ready(conn, to_pipe):
                nursery.cancel_scope.cancel()
                return


def _epoll_echo(conn: socket.socket) -> None:
    """Echo from a plain epoll loop: what a hand-written data path would pay."""
    conn.setblocking(False)
    poller = select.epoll()
    poller.register(conn.fileno(), select.EPOLLIN)
    while True:
        poller.poll()
        if not _forward_ready(conn, conn.send):
            return


async def _trio_echo(conn: socket.socket) -> None:
    """Echo as a supervisor waits: park in trio's epoll, then read without blocking."""
    import trio

    conn.setblocking(False)
    while True:
        await trio.lowlevel.wait_readable(conn.fileno())
        if not _forward_ready(conn, conn.send):
            return


def _forward_ready(conn: socket.socket, send: Callable[[bytes], object]) -> bool:
    """Pass what a non-blocking connection holds to ``send`` (back to it, for an echo;
    into a pipe, for a relay); False once the peer closed."""
    try:
        data = conn.recv(1)
    except BlockingIOError:
        return True
    if not data:
        return False
    send(data)
    return True


def print_report(floors: dict[str, Any]) -> None:
    print(f"floors: {floors['method']}")
    for name, label in LABELS.items():
        f = floors.get(name)
        if f is None:
            continue  # a run saved before this floor was measured
        print(
            f"  {label:<40} p50 {f['p50_us']:>7.1f} us  "
            f"p90 {f['p90_us']:>7.1f}  p99 {f['p99_us']:>7.1f}"
        )


LABELS = {
    "pipe": "os.pipe round trip, two processes",
    "pipe_pinned": "os.pipe round trip, both on one CPU",
    "tcp": "loopback TCP round trip (TCP_NODELAY)",
    "tcp_epoll": "same, the echo in a plain epoll loop",
    "tcp_trio": "same, the echo in a trio loop",
    "relay_epoll": "TCP echo over a pipe relay, epoll loop",
    "relay_trio": "TCP echo over a pipe relay, trio loop",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["echo"]:
        return _serve(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m bench floors", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--trips", type=int, default=TRIPS, help="round trips per floor")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON here")
    args = parser.parse_args(argv)
    floors = measure(args.trips)
    print_report(floors)
    if args.json is not None:
        args.json.write_text(json.dumps(floors, indent=1) + "\n")
        print(f"bench: wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
