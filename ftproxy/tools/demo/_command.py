"""``ftproxy demo``'s options and ``run_demo``: a verdict, or one line on stderr and a code."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import FrameType

import trio
from rich.console import Console
from rich.live import Live

import arbiter
from ftproxy.core.exceptions import exception_leaves
from ftproxy.tools import etcdlocal
from ftproxy.tools import lab as netlab
from ftproxy.tools.demo._config import (
    CLONE_NEWNET,
    ETCD_MEMBERS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOST,
    EXIT_LOST_UNSAFE,
    EXIT_OK,
    EXIT_USAGE,
    HOST,
    KV_SCRIPT,
    LAB_PREFIX,
    MAX_SHIP_DELAY_MS,
    NEEDS_ROOT,
    DemoConfig,
    DemoError,
    Interrupted,
)
from ftproxy.tools.demo._load import Events
from ftproxy.tools.demo._packet_mode import run_packet
from ftproxy.tools.demo._socket_mode import run
from ftproxy.tools.demo._state import Demo
from ftproxy.tools.demo._verdict import Outcome
from ftproxy.tools.demo._view import refresh, render_verdict, render_view

# --- The command ------------------------------------------------------------------------------


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ftproxy demo``."""
    parser.add_argument(
        "--warmup", type=float, default=3.0, metavar="S", help="load before the kill (default 3)"
    )
    parser.add_argument(
        "--after",
        type=float,
        default=3.0,
        metavar="S",
        help="load after the kill, through the failover (default 3)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=None,
        metavar="N",
        help="concurrent clients (default 4; --packet holds one connection)",
    )
    parser.add_argument(
        "--json", action="store_true", help="no live view: print the verdict as one JSON object"
    )
    parser.add_argument(
        "--no-output-rule",
        action="store_true",
        help="run the primary without the output rule (UNSAFE) to show the writes it loses",
    )
    parser.add_argument(
        "--ship-delay-ms",
        type=float,
        default=200.0,
        metavar="MS",
        help="with --no-output-rule: how long each log entry waits before shipping "
        "(default 200), the window in which acknowledged writes are lost",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=15.0,
        metavar="S",
        help="how long the pair may take to start serving (default 15)",
    )
    parser.add_argument(
        "--etcd",
        action="store_true",
        help=f"decide the failover through a {ETCD_MEMBERS}-member etcd cluster on {HOST} "
        f"(Debian package {etcdlocal.PACKAGE}); one member is killed mid-run",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="kill -9 whoever is primary N times in a row, each followed by a fresh backup "
        "that catches up and protects the pair again (default 1: one failover)",
    )
    parser.add_argument(
        "--packet",
        action="store_true",
        help="packet mode (root): in a lab of network namespaces, one client connection to "
        f"the virtual IP {netlab.VIP} survives the failover",
    )
    parser.add_argument(
        "--partition",
        action="store_true",
        help="with --packet: cut the primary off at the switch instead of killing it",
    )


def _config(args: argparse.Namespace) -> DemoConfig:
    """Check the options; ValueError with a one-line message if they make no sense."""
    for name in ("warmup", "after", "start_timeout", "ship_delay_ms"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, not {value}")
    if args.ship_delay_ms > MAX_SHIP_DELAY_MS:
        raise ValueError(
            f"--ship-delay-ms must be at most {MAX_SHIP_DELAY_MS:g}: no heartbeat leaves "
            "the primary during the delay, and the backup gives it up after 500 ms"
        )
    if args.clients is not None and args.clients < 1:
        raise ValueError("--clients must be at least 1")
    if args.etcd and args.packet:
        raise ValueError("--etcd is for the socket demo, not --packet")
    if args.packet:
        for flag, value in (
            ("--clients", args.clients is not None),
            ("--no-output-rule", args.no_output_rule),
        ):
            if value:
                raise ValueError(f"{flag} is for the socket demo; --packet holds one connection")
    elif args.partition:
        raise ValueError("--partition needs --packet")
    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    if args.rounds > 1 and (args.packet or args.no_output_rule):
        raise ValueError("--rounds is for the socket demo with the output rule")
    return DemoConfig(
        warmup_s=args.warmup,
        after_s=args.after,
        clients=1 if args.packet else (args.clients or 4),
        output_rule=not args.no_output_rule,
        ship_delay_ms=args.ship_delay_ms,
        start_timeout_s=args.start_timeout,
        json=args.json,
        packet=args.packet,
        partition=args.partition,
        etcd=args.etcd,
        rounds=args.rounds,
    )


def run_demo(args: argparse.Namespace, guest: Path = KV_SCRIPT) -> int:
    """``ftproxy demo``: 0 when no acknowledged write was lost (with ``--packet``,
    when besides the one connection survived with every reply right), 1 when the
    promise was broken, 2 for bad options (or ``--packet`` without root), 3 when the
    demo could not run, 4 when ``--no-output-rule`` lost acknowledged writes (what it
    is there to show), 130 when interrupted."""
    try:
        config = replace(_config(args), guest=guest)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    if config.packet and os.geteuid() != 0:
        return _fail(NEEDS_ROOT, EXIT_USAGE)
    if not config.guest.is_file():
        return _fail(f"the demo's guest {config.guest} is missing", EXIT_FAILED)
    if config.etcd:
        try:
            etcdlocal.etcd_binary()
        except etcdlocal.EtcdMissing as exc:
            return _fail(f"--etcd: {exc}", EXIT_FAILED)
    try:
        verdict = _run_in_tempdir(config)
    except BaseException as exc:  # sorted into one-line messages, bugs re-raised
        return _exit_for(exc)
    if config.json:
        print(json.dumps(verdict.as_json()), flush=True)
    else:
        Console().print(render_verdict(verdict))
    if verdict.passed:
        return EXIT_OK
    return EXIT_LOST if config.output_rule else EXIT_LOST_UNSAFE


Runner = Callable[[Demo, Path], Awaitable[Outcome]]


def _run_in_tempdir(config: DemoConfig) -> Outcome:
    """Run the demo in a temporary directory (the arbiter's store, the replicas' logs);
    ``--packet`` in its lab, from the client host's network namespace."""
    with tempfile.TemporaryDirectory(prefix="ftproxy-demo-") as tmp:
        workdir = Path(tmp)
        with _packet_lab() if config.packet else contextlib.nullcontext():
            runner: Runner = run_packet if config.packet else run
            if config.json or not Console().is_terminal:
                return trio.run(_run_quiet, config, workdir, runner)
            with _stderr_held_back(workdir / "held-back.log"):
                return trio.run(_run_live, config, workdir, runner)


async def _run_quiet(config: DemoConfig, workdir: Path, runner: Runner) -> Outcome:
    """The demo with no view: its events are logged, as the progress report (with
    ``--json``, or when stdout is not a terminal, where a live view cannot redraw
    itself and log lines would land in it)."""
    return await runner(Demo(config, Events(log_events=True)), workdir)


async def _run_live(config: DemoConfig, workdir: Path, runner: Runner) -> Outcome:
    """The demo under the live view, which shows its events instead of the log."""
    demo = Demo(config, Events(log_events=False))
    with Live(render_view(demo), auto_refresh=False, console=Console()) as live:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refresh, live, demo)
            verdict = await runner(demo, workdir)
            nursery.cancel_scope.cancel()
        live.update(render_view(demo), refresh=True)
    return verdict


@contextlib.contextmanager
def _packet_lab() -> Iterator[netlab.Lab]:
    """The demo's own lab (prefix ``ftdemo``), up for the run and down after it, on
    every way out; this thread is in the client host's network namespace meanwhile.

    A leftover of a demo that was killed is rebuilt; a lab whose hosts still run
    something belongs to a demo running now, and is left alone.
    """
    lab = netlab.Lab(LAB_PREFIX)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)  # trio's own inside run
    try:
        if lab.exists() and any(
            p.pid != os.getpid() for h in lab.status().hosts for p in h.processes
        ):
            raise DemoError(
                f"lab {LAB_PREFIX} is in use (another `ftproxy demo --packet`?); "
                f"if not, remove it with `sudo ftproxy lab --prefix {LAB_PREFIX} down`"
            )
        try:
            lab.up(force=True)
            with _network_namespace(lab.namespace("client")):
                yield lab
        finally:
            _uninterrupted(lab.down)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _uninterrupted(action: Callable[[], object]) -> None:
    """Run ``action`` with Ctrl-C and SIGTERM held off: a clean-up must not stop half way."""
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in held}
    try:
        action()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _network_namespace(name: str) -> Iterator[None]:
    """Move this thread into the named network namespace (``ip netns add NAME``) and
    back: every socket it opens meanwhile belongs to that namespace. Processes
    started from here go to their own host with ``ip netns exec``."""
    libc = ctypes.CDLL(None, use_errno=True)

    def enter(fd: int, what: str) -> None:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot enter the network namespace of {what}: {os.strerror(err)}")

    with (
        open("/proc/thread-self/ns/net", "rb") as home,
        open(os.path.join("/var/run/netns", name), "rb") as target,
    ):
        enter(target.fileno(), name)
        try:
            yield
        finally:
            enter(home.fileno(), "this process")


@contextlib.contextmanager
def _stderr_held_back(path: Path) -> Iterator[None]:
    """Hold back what is written to stderr (fd 2) while the live view owns the terminal,
    and write it out afterwards: a log line in the middle would tear the view. The
    demo's own events are in the view; what lands here is the embedded arbiter's log."""
    sys.stderr.flush()
    saved = os.dup(2)
    held = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(held, 2)
    os.close(held)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr.write(path.read_text(errors="replace"))
        sys.stderr.flush()


def _exit_for(exc: BaseException) -> int:
    """One line on stderr for whatever ended the demo early, and its exit code."""
    leaves = list(exception_leaves(exc))
    if any(isinstance(e, KeyboardInterrupt | Interrupted) for e in leaves):
        return _fail("interrupted; every process stopped", EXIT_INTERRUPTED)
    for leaf in leaves:
        if isinstance(leaf, DemoError | netlab.LabError):
            return _fail(str(leaf), EXIT_FAILED)
    for leaf in leaves:
        if isinstance(leaf, OSError | arbiter.StoreError):
            return _fail(f"{type(leaf).__name__}: {leaf}", EXIT_FAILED)
    raise exc  # a bug in the demo: let the traceback say where


def _fail(message: str, code: int) -> int:
    """Say why the demo ended, in one line on stderr; return ``code``."""
    print(f"ftproxy demo: {message}", file=sys.stderr, flush=True)
    return code
