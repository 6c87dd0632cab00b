"""What sealing every frame costs: the replicated pair with --secret-file and --insecure.

    python -m bench.sealing [--requests N] [--clients 1,50] [--size 100]

First, in-process, what one log-channel frame costs to send and receive
(encode, seal, frame, then unframe, open, decode) with and without sealing:
the cost itself, without the noise of a shared machine. Then two pairs run
side by side, one whose log channel and arbiter frames are sealed
(ChaCha20-Poly1305 after an authenticated opening) and one that runs
--insecure (plain frames); each is loaded with redis-benchmark SETs (output
rule on), and throughput and p50 are printed for both with their ratio. Each
load runs on both pairs in turn, twice (ABBA), so that drift on the machine
falls on both alike; the figures are the better of the two runs.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from pathlib import Path

from bench import load as bm
from bench.load import Load, Op
from bench.services import Arbiter, Service, start_pair
from ftproxy.core.channel import BACKUP, NEED_DATA, PRIMARY, Channel, Entries, Join, Welcome
from ftproxy.core.records import Entry, Header, Policy

SEALED, PLAIN = "sealed (--secret-file)", "plain (--insecure)"


def frame_cost_us(secret: bytes | None, payload: int, frames: int = 20_000) -> float:
    """Microseconds per Entries frame (one entry of ``payload`` bytes), primary to backup."""
    backup, primary = Channel(BACKUP, secret), Channel(PRIMARY, secret)
    for source, target in ((backup, primary), (primary, backup), (backup, primary)):
        target.receive_data(source.data_to_send())
        while target.next_event() is not NEED_DATA:
            pass
    primary.receive_data(backup.send(Join(["kv.py"])))
    primary.next_event()
    header = Header(2, ["kv.py"], {}, "/", "3.11", Policy(200, 1000), 0)
    backup.receive_data(primary.send(Welcome("pair", 1, header)))
    backup.next_event()
    batch = Entries([Entry(1, 1, 1, 0, b"x" * payload)])
    started = time.perf_counter()
    for _ in range(frames):
        backup.receive_data(primary.send(batch))
        backup.next_event()
    return (time.perf_counter() - started) / frames * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sealing", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", default="1,50", help="comma-separated client counts")
    parser.add_argument("--size", type=int, default=100, help="SET value size in bytes")
    args = parser.parse_args(argv)
    bm.require_redis_benchmark()
    op = Op("set", args.size)
    print("one log-channel frame, send + receive, in-process (us per frame):")
    for payload in (100, 4096, 65536):
        sealed = frame_cost_us(secrets.token_bytes(32), payload)
        plain = frame_cost_us(None, payload)
        print(f"  {payload:>6} B entry: sealed {sealed:7.2f}  plain {plain:7.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-sealing-") as tmp:
        scratch = Path(tmp)
        secret = scratch / "secret"
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)
        arbiters = {SEALED: Arbiter(scratch, secret_file=secret), PLAIN: Arbiter(scratch)}
        services: dict[str, Service] = {}
        try:
            for arbiter in arbiters.values():
                arbiter.start()
            for arbiter in arbiters.values():
                arbiter.wait_listening()
            for name, arbiter in arbiters.items():
                services[name] = start_pair(name, scratch, arbiter)
            for service in services.values():
                service.ready()
            print(f"SET {args.size} B, {args.requests} requests per run, output rule on")
            print(f"{'pair':<24} {'clients':>7} {'req/s':>10} {'p50 ms':>8}")
            for clients in (int(c) for c in args.clients.split(",")):
                load = Load(f"{clients}c", clients, 1)
                best: dict[str, bm.Result] = {}
                for name in (SEALED, PLAIN, PLAIN, SEALED):
                    result = bm.run(services[name].port, load, op, args.requests)
                    if name not in best or result.rps > best[name].rps:
                        best[name] = result
                for name in (SEALED, PLAIN):
                    r = best[name]
                    print(f"{name:<24} {clients:>7} {r.rps:>10.0f} {r.p50_ms:>8.3f}")
                sealed, plain = best[SEALED], best[PLAIN]
                print(
                    f"{'sealed / plain':<24} {clients:>7} {sealed.rps / plain.rps:>10.2f}x"
                    f" {sealed.p50_ms / plain.p50_ms:>7.2f}x"
                )
        finally:
            for service in services.values():
                service.stop()
            for arbiter in arbiters.values():
                arbiter.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
