"""``python -m bench.catchup``: how long a fresh backup takes to catch up on a history.

For each history length: a pair of examples/kv.py, a write load for that long,
kill -9 of the primary (the backup goes live), then a fresh backup joins the
live replica and catches up from its log, first entry to last. Measured from
the live replica's /status: entries and bytes streamed, and the time from the
joiner's attach to the pair protected again; plus the joiner's start-up (a new
process and guest) before that. ``--under-load`` keeps the writes going during
the catch-up (the live replica throttles its guest while the joiner replays).

    python -m bench.catchup                    # 10 s and 60 s of history, idle catch-up
    python -m bench.catchup --history 10 --under-load --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.procs import FTPROXY, HOST, KV, Proc, free_port, wait_until
from bench.resp import Connection
from bench.services import Arbiter, admin_status


@dataclass
class CatchUpResult:
    history_s: float
    under_load: bool
    entries: int
    bytes: int
    writes_in_history: int
    start_s: float  # the joiner's process and guest start, until it attaches
    catch_up_s: float  # attach to protected
    entries_per_s: float
    mb_per_s: float


class Writes:
    """Closed-loop SETs from a few threads, counted."""

    def __init__(self, port: int, clients: int) -> None:
        self.port, self.done, self.stop = port, 0, threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]
        self.lock = threading.Lock()

    def _run(self, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                with Connection(self.port) as connection:
                    while not self.stop.is_set():
                        n += 1
                        connection.call("SET", f"k:{index}:{n}", "x" * 16)
                        with self.lock:
                            self.done += 1
            except OSError:
                time.sleep(0.01)

    def __enter__(self) -> Writes:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def _replica(
    scratch: Path, name: str, arbiter: Arbiter, service: int, *flags: str
) -> tuple[Proc, int]:
    admin = free_port()
    command = [
        *FTPROXY,
        *flags,
        "--arbiter",
        f"{HOST}:{arbiter.port}",
        "--admin",
        f"{HOST}:{admin}",
        "--data-dir",
        str(scratch / f"data-{name}"),
        "--insecure",
        "--",
        str(KV),
        "--port",
        str(service),
    ]
    return Proc(name, command, scratch), admin


def _role(admin: int) -> Any:
    return admin_status(admin).get("role")


def measure(history_s: float, under_load: bool, clients: int, scratch: Path) -> CatchUpResult:
    arbiter = Arbiter(scratch)
    arbiter.start().wait_listening()
    service, log_a, log_b, log_c = free_port(), free_port(), free_port(), free_port()
    procs: list[Proc] = []
    try:
        a, a_admin = _replica(
            scratch, "a", arbiter, service, "primary", "--log-listen", f"{HOST}:{log_a}"
        )
        b, b_admin = _replica(
            scratch, "b", arbiter, service, "backup", "--primary", f"{HOST}:{log_a}",
            "--log-listen", f"{HOST}:{log_b}",
        )  # fmt: skip
        procs += [a, b]
        wait_until(lambda: admin_status(a_admin).get("protected") is True, 60, "the pair forms")
        with Writes(service, clients) as writes:
            time.sleep(history_s)  # the history's length is what is measured
            written = writes.done
            a.kill()
            wait_until(lambda: _role(b_admin) == "live", 30, "the backup goes live")
            if not under_load:
                writes.stop.set()
            started = time.monotonic()
            c, _ = _replica(
                scratch, "c", arbiter, service, "backup", "--primary", f"{HOST}:{log_b}",
                "--log-listen", f"{HOST}:{log_c}",
            )  # fmt: skip
            procs.append(c)
            wait_until(
                lambda: admin_status(b_admin).get("protected") is True, 600, "protected again"
            )
            total = time.monotonic() - started
        catch_up = admin_status(b_admin)["catch_up"]
        seconds = float(catch_up["elapsed_s"])
        return CatchUpResult(
            history_s=history_s,
            under_load=under_load,
            entries=int(catch_up["entries_sent"]),
            bytes=int(catch_up["bytes_sent"]),
            writes_in_history=written,
            start_s=round(total - seconds, 3),
            catch_up_s=seconds,
            entries_per_s=round(catch_up["entries_sent"] / seconds, 1),
            mb_per_s=round(catch_up["bytes_sent"] / seconds / 1e6, 3),
        )
    finally:
        for proc in procs:
            proc.stop()
        arbiter.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.catchup", description=__doc__)
    parser.add_argument("--history", type=float, action="append", metavar="S")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--under-load", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    results = []
    for history in args.history or [10.0, 60.0]:
        with tempfile.TemporaryDirectory(prefix="ftproxy-catchup-") as tmp:
            result = measure(history, args.under_load, args.clients, Path(tmp))
        results.append(result)
        print(
            f"history {history:g} s ({result.writes_in_history:,} writes): "
            f"{result.entries:,} entries, {result.bytes / 1e6:.2f} MB caught up in "
            f"{result.catch_up_s:.2f} s ({result.entries_per_s:,.0f} entries/s, "
            f"{result.mb_per_s:.2f} MB/s) after {result.start_s:.2f} s of joiner start-up"
            + (", under load" if args.under_load else ""),
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
