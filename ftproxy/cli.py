"""The ``ftproxy`` command: subcommands, argument checks, logging set-up.

Every error a user can cause (a bad flag, an unreadable log, a divergence)
ends in one clear message and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
import trio

EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3


def configure_logging(*, verbose: bool = False, json_logs: bool | None = None) -> None:
    """Console rendering on a terminal, JSON lines otherwise; logs go to stderr."""
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.INFO
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def split_guest_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """ftproxy's own arguments, and the guest's command line after the first ``--``."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftproxy",
        description="Fault tolerance for an unmodified single-threaded Python service.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug events too")
    parser.add_argument(
        "--log-format", choices=("auto", "console", "json"), default="auto", help="how to log"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    record = commands.add_parser(
        "record",
        usage="ftproxy record --log PATH [options] -- SCRIPT [ARGS...]",
        help="run a service alone, recording every input into a log",
        description="Run SCRIPT on virtual devices, serving real clients, and log every "
        "non-deterministic input. Ctrl-C stops the guest (delivered as a logged signal).",
    )
    record.add_argument("--log", required=True, metavar="PATH", help="the log file to write")
    record.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="GUESTPORT=HOST:PORT",
        help="serve the guest's port GUESTPORT on HOST:PORT instead (repeatable)",
    )
    record.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="extra guest environment"
    )
    record.add_argument(
        "--exit-every",
        type=int,
        default=None,
        metavar="N",
        help="device calls between forced exits (pinned in the log)",
    )
    _add_front_arguments(record)

    replay = commands.add_parser(
        "replay",
        usage="ftproxy replay [options] LOG [-- SCRIPT [ARGS...]]",
        help="re-execute a recorded log and verify it",
        description="Run the recorded program against its log, with no network, and check "
        "that every exit and every output is the one recorded.",
    )
    replay.add_argument("log", metavar="LOG")
    replay.add_argument("--quiet-guest", action="store_true", help="discard the guest's stdout")

    primary = commands.add_parser(
        "primary",
        usage="ftproxy primary --log-listen HOST:PORT --arbiter HOST:PORT [options] "
        "-- SCRIPT [ARGS]",
        help="run a service as the primary of a replicated pair",
        description="Wait for a backup on --log-listen, then run SCRIPT, shipping every input "
        "to the backup and releasing each output only once the backup holds the log that "
        "produced it.",
    )
    primary.add_argument(
        "--log-listen", required=True, metavar="HOST:PORT", help="where the backup connects"
    )
    _add_replica_arguments(primary)
    primary.add_argument(
        "--no-output-rule",
        action="store_true",
        help="UNSAFE, for demos and benchmarks only: release outputs before the backup "
        "holds their log, so a failover can lose acknowledged writes",
    )
    primary.add_argument(
        "--ship-delay-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="with --no-output-rule only: hold each log batch this long before shipping it, "
        "to make the unsafe window visible",
    )
    primary.add_argument("--pair", default="ftproxy", help="the pair's name at the arbiter")
    primary.add_argument(
        "--generation", type=int, default=1, help="the pair's generation at the arbiter"
    )

    backup = commands.add_parser(
        "backup",
        usage="ftproxy backup --primary HOST:PORT --arbiter HOST:PORT [options] -- SCRIPT [ARGS]",
        help="replay behind a primary, and take over when it dies",
        description="Connect to the primary's log channel, replay its guest behind it, and go "
        "live (after winning the arbiter) when the primary falls silent.",
    )
    backup.add_argument(
        "--primary", required=True, metavar="HOST:PORT", help="the primary's --log-listen"
    )
    backup.add_argument(
        "--log-listen",
        metavar="HOST:PORT",
        help="once live, take the next backup here (re-protection); without it the "
        "backup, once live, serves alone for good",
    )
    _add_replica_arguments(backup)

    run = commands.add_parser(
        "run",
        usage="ftproxy run --pair NAME --arbiter HOST:PORT --log-listen HOST:PORT "
        "[options] -- SCRIPT [ARGS]",
        help="one node of a self-healing pair: the same command on every host",
        description="Ask the arbiter who is live for the pair: nobody, and this node boots "
        "the service as its first replica (the arbiter lets exactly one node do so); "
        "somebody, and it joins that replica as its backup, catches up from its log and "
        "protects the pair again. Restarted after a failure, it rejoins by itself.",
    )
    run.add_argument("--pair", required=True, help="the pair's name at the arbiter")
    run.add_argument(
        "--log-listen",
        required=True,
        metavar="HOST:PORT",
        help="where this node takes a backup once live; recorded at the arbiter, so it "
        "must be an address the other nodes reach",
    )
    _add_replica_arguments(run)

    arbiter_cmd = commands.add_parser(
        "arbiter",
        help="run the test-and-set arbiter",
        description="Serve a durable test-and-set that lets exactly one replica act alone.",
    )
    arbiter_cmd.add_argument("--listen", required=True, metavar="HOST:PORT")
    arbiter_cmd.add_argument("--data-dir", required=True, metavar="DIR")
    _add_secret_arguments(arbiter_cmd)

    status = commands.add_parser("status", help="show a replica's status (its --admin address)")
    from ftproxy.admin import build_status_parser

    build_status_parser(status)

    lab = commands.add_parser(
        "lab",
        help="network-namespace test hosts for packet mode (root)",
        description="Client, primary, backup and arbiter hosts in network namespaces on one "
        "bridge (10.200.0.0/24, inside the lab only).",
    )
    from ftproxy.lab import add_lab_arguments

    add_lab_arguments(lab)

    demo = commands.add_parser(
        "demo",
        help="the failover demo: a replicated kv store, a write load, kill -9 of the primary",
        description="Start an embedded arbiter, a primary and a backup of examples/kv.py on "
        "loopback, drive INCRs and SETs, kill the primary with SIGKILL, and report how many "
        "acknowledged writes survived and how long the failover took. With --packet (root): "
        "the same in a lab of network namespaces, in packet mode, where one client "
        "connection to the virtual IP survives the failover.",
    )
    from ftproxy.demo import add_demo_arguments

    add_demo_arguments(demo)

    log_cmd = commands.add_parser("log", help="inspect a log")
    log_commands = log_cmd.add_subparsers(dest="log_command", required=True, metavar="ACTION")
    show = log_commands.add_parser("show", help="one line per record")
    show.add_argument("log", metavar="LOG")
    show.add_argument("--json", action="store_true", help="print a summary as JSON instead")
    export = log_commands.add_parser("export", help="network inputs and outputs as a pcap")
    export.add_argument("log", metavar="LOG")
    export.add_argument("--pcap", required=True, metavar="PATH", help="the pcap file to write")
    return parser


def _add_secret_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--secret-file", metavar="PATH", help="shared secret that authenticates every peer"
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="run without authentication (loopback demos only)",
    )


def _add_front_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "packet mode",
        "The guest runs its own TCP/IP stack for a virtual IP and MAC; client connections "
        "survive a failover. Needs root.",
    )
    group.add_argument(
        "--front",
        choices=("socket", "packet"),
        default="socket",
        help="socket: the supervisor terminates TCP/UDP (default); packet: raw Ethernet frames",
    )
    group.add_argument(
        "--vip",
        metavar="IP/PREFIX",
        help="the virtual IP the guest serves, e.g. 10.200.0.100/24 (a backup takes the "
        "primary's if omitted)",
    )
    group.add_argument(
        "--interface", default="eth0", metavar="NAME", help="the NIC to use (default eth0)"
    )
    group.add_argument("--mac", help="the virtual MAC (default 02:00 and the VIP's four bytes)")
    group.add_argument("--gateway", metavar="IP", help="the guest's default gateway, if any")
    group.add_argument(
        "--drop-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="drop each frame in or out with probability P, to test under loss (default 0)",
    )
    group.add_argument(
        "--drop-seed", type=int, default=0, metavar="N", help="seed of --drop-rate's choices"
    )


def _packet_config(args: argparse.Namespace, *, vip_required: bool = True) -> Any:
    """The PacketConfig the front arguments ask for, or None in socket mode."""
    from ftproxy.front import PacketConfig, check_interface, parse_network

    if args.front != "packet":
        for flag in ("vip", "mac", "gateway"):
            if getattr(args, flag):
                raise ValueError(f"--{flag} goes with --front packet")
        return None
    if not 0.0 <= args.drop_rate < 1.0:
        raise ValueError(f"--drop-rate {args.drop_rate}: expected a probability in [0, 1)")
    if args.map:
        raise ValueError("--map is for socket mode; in packet mode clients reach the --vip")
    check_interface(args.interface)
    # Before the event loop runs: later, scapy's import would stall the heartbeats.
    from ftproxy.front.packet import preload_scapy

    preload_scapy()
    if args.vip is None:
        if vip_required:
            raise ValueError("--front packet needs --vip IP/PREFIX, e.g. 10.200.0.100/24")
        network = None
    else:
        network = parse_network(args.vip, args.mac, args.gateway)
    return PacketConfig(args.interface, network, args.drop_rate, args.drop_seed)


def _add_replica_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arbiter", required=True, metavar="HOST:PORT", help="the arbiter")
    parser.add_argument("--admin", metavar="HOST:PORT", help="serve GET /status and /metrics here")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="keep the log this replica holds in DIR/log.ftlog (readable by ftproxy log "
        "show and replay); without it the log is kept in memory only",
    )
    _add_secret_arguments(parser)
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="GUESTPORT=HOST:PORT",
        help="serve the guest's port GUESTPORT on HOST:PORT instead (repeatable)",
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="extra guest environment"
    )
    parser.add_argument(
        "--heartbeat-ms", type=float, default=50.0, help="heartbeat interval (default 50)"
    )
    parser.add_argument(
        "--peer-timeout-ms",
        type=float,
        default=500.0,
        help="declare the peer dead after this much silence (default 500)",
    )
    parser.add_argument(
        "--max-lag-ms",
        type=float,
        default=100.0,
        help="stop feeding the guest input while the backup's replay lags more (default 100)",
    )
    parser.add_argument(
        "--max-lag-bytes",
        type=int,
        default=8 * 1024 * 1024,
        help="the same bound in unreplayed log bytes (default 8 MiB)",
    )
    parser.add_argument("--exit-every", type=int, default=None, metavar="N", help=argparse.SUPPRESS)
    _add_front_arguments(parser)


def _secret(args: argparse.Namespace, command: str) -> bytes | None:
    from ftproxy.auth import load_secret

    if args.secret_file:
        return load_secret(args.secret_file)
    if args.insecure:
        return None
    raise ValueError(
        f"{command} refuses to start without --secret-file (a shared secret that "
        "authenticates every peer); pass --insecure to run without one, on loopback only"
    )


def _replica_options(args: argparse.Namespace, command: str) -> Any:
    import arbiter
    from ftproxy.front.socket import parse_address_map
    from ftproxy.guest import protocol as p
    from ftproxy.replica import ReplicaOptions
    from ftproxy.replication import Timing
    from ftproxy.wire import Policy

    if not args.guest:
        raise ValueError(f"{command} needs the program to run after --: -- SCRIPT [ARGS]")
    return ReplicaOptions(
        argv=args.guest,
        arbiter=arbiter.parse_address(args.arbiter),
        secret=_secret(args, command),
        timing=Timing(
            heartbeat_s=args.heartbeat_ms / 1000,
            peer_timeout_s=args.peer_timeout_ms / 1000,
            max_lag_s=args.max_lag_ms / 1000,
            max_lag_bytes=args.max_lag_bytes,
        ),
        address_map=parse_address_map(args.map),
        admin=arbiter.parse_address(args.admin) if args.admin else None,
        policy=Policy(args.exit_every or p.DEFAULT_EXIT_EVERY, p.DEFAULT_CLOCK_STEP_NS),
        extra_env=_parse_env(args.env),
        packet=_packet_config(args, vip_required=command == "primary"),
        data_dir=Path(args.data_dir) if args.data_dir else None,
    )


def _cmd_primary(args: argparse.Namespace) -> int:
    import arbiter
    from ftproxy.auth import SecretFileError
    from ftproxy.primary import serve_primary

    try:
        options = _replica_options(args, "primary")
        listen = arbiter.parse_address(args.log_listen)
    except (ValueError, SecretFileError) as exc:
        return _usage(str(exc))
    if args.ship_delay_ms and not args.no_output_rule:
        return _usage("--ship-delay-ms only goes with --no-output-rule")
    options.output_rule = not args.no_output_rule
    options.ship_delay_s = args.ship_delay_ms / 1000
    options.pair = args.pair
    options.generation = args.generation
    if not options.output_rule:
        structlog.get_logger().warning(
            "output_rule_disabled",
            consequence="outputs leave before the backup holds their log: a failover can "
            "lose acknowledged writes",
        )
    return int(trio.run(serve_primary, options, listen))


def _cmd_backup(args: argparse.Namespace) -> int:
    import arbiter
    from ftproxy.auth import SecretFileError
    from ftproxy.backup import serve_backup

    try:
        options = _replica_options(args, "backup")
        primary = arbiter.parse_address(args.primary)
        if args.log_listen:
            options.log_listen = arbiter.parse_address(args.log_listen)
    except (ValueError, SecretFileError) as exc:
        return _usage(str(exc))
    return int(trio.run(serve_backup, options, primary))


def _cmd_run(args: argparse.Namespace) -> int:
    import arbiter
    from ftproxy.auth import SecretFileError
    from ftproxy.node import run_node

    try:
        options = _replica_options(args, "run")
        options.log_listen = arbiter.parse_address(args.log_listen)
    except (ValueError, SecretFileError) as exc:
        return _usage(str(exc))
    options.pair = args.pair
    return int(trio.run(run_node, options))


def _cmd_arbiter(args: argparse.Namespace) -> int:
    from arbiter.__main__ import main as arbiter_main

    argv = ["--listen", args.listen, "--data-dir", args.data_dir]
    argv += ["--secret-file", args.secret_file] if args.secret_file else []
    argv += ["--insecure"] if args.insecure else []
    return arbiter_main(argv)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ftproxy.demo import run_demo

    return run_demo(args)


def _cmd_lab(args: argparse.Namespace) -> int:
    from ftproxy.lab import run_lab

    return run_lab(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from ftproxy.admin import run_status

    return run_status(args)


def _parse_env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    return env


def _cmd_record(args: argparse.Namespace) -> int:
    from ftproxy.front.socket import parse_address_map
    from ftproxy.guest import protocol as p
    from ftproxy.record import RecordOptions, record
    from ftproxy.wire import Policy

    argv = args.guest
    if not argv:
        return _usage("record needs the program to run: ftproxy record --log L -- SCRIPT [ARGS]")
    try:
        options = RecordOptions(
            log_path=args.log,
            argv=argv,
            address_map=parse_address_map(args.map),
            policy=Policy(args.exit_every or p.DEFAULT_EXIT_EVERY, p.DEFAULT_CLOCK_STEP_NS),
            extra_env=_parse_env(args.env),
            packet=_packet_config(args),
        )
        result = trio.run(record, options)
    except ValueError as exc:
        return _usage(str(exc))
    except OSError as exc:
        print(f"ftproxy record: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"ftproxy record: {result.entries} entries, {result.outputs} outputs, "
        f"{result.log_bytes} bytes in {args.log}; guest returncode {result.returncode}",
        file=sys.stderr,
    )
    # A guest that failed on its own (not stopped by our Ctrl-C) is a failed run.
    if result.returncode not in (0, None) and not result.signals:
        return EXIT_FAILED
    return EXIT_OK


def _cmd_replay(args: argparse.Namespace) -> int:
    import subprocess

    from ftproxy.logfile import LogFormatError, read_log
    from ftproxy.replay import ReplayError, replay
    from ftproxy.supervisor import Divergence, GuestFailure

    argv = args.guest or None
    try:
        contents = read_log(args.log)
    except LogFormatError as exc:
        return _usage(str(exc))
    if contents.truncated_at is not None:
        print(
            f"ftproxy replay: note: {args.log} ends in a partial record at byte "
            f"{contents.truncated_at}; replaying the complete records",
            file=sys.stderr,
        )
    stdout = subprocess.DEVNULL if args.quiet_guest else None
    try:
        result = trio.run(lambda: replay(contents, argv=argv, stdout=stdout))
    except ReplayError as exc:
        return _usage(str(exc))
    except Divergence as exc:
        print(f"ftproxy replay: {exc.report()}", file=sys.stderr)
        return EXIT_DIVERGED
    except GuestFailure as exc:
        print(f"ftproxy replay: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result.log_complete:
        ending = f"guest exited with returncode {result.returncode}, as recorded"
    elif result.end_reason is not None:
        ending = (
            f"the recording ended with the guest {result.end_reason}, so the replay "
            "stopped where the log stops"
        )
    else:
        ending = (
            "the log has no end record (the recorder was killed), so the replay "
            "stopped where the log stops"
        )
    print(
        f"ftproxy replay: verified {result.entries} entries and {result.outputs} outputs "
        f"({result.output_bytes} bytes) identical to the recording; {ending}",
        file=sys.stderr,
    )
    return EXIT_OK


def _cmd_log(args: argparse.Namespace) -> int:
    from ftproxy.logfile import LogFormatError, read_log

    try:
        contents = read_log(args.log)
    except LogFormatError as exc:
        return _usage(str(exc))
    if args.log_command == "show":
        from ftproxy.logview import describe_log, log_summary

        if args.json:
            print(json.dumps(log_summary(contents), indent=2, default=str))
        else:
            for line in describe_log(contents):
                print(line)
        return EXIT_OK
    from ftproxy.pcap import export_pcap

    stats = export_pcap(contents, args.pcap)
    print(
        f"ftproxy log export: {stats.packets} packets ({stats.tcp_streams} TCP streams, "
        f"{stats.udp_datagrams} UDP datagrams) written to {args.pcap}",
        file=sys.stderr,
    )
    return EXIT_OK


def _usage(message: str) -> int:
    print(f"ftproxy: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    own, guest = split_guest_argv(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    args.guest = guest
    json_logs = {"auto": None, "console": False, "json": True}[args.log_format]
    configure_logging(verbose=args.verbose, json_logs=json_logs)
    handlers = {
        "record": _cmd_record,
        "replay": _cmd_replay,
        "log": _cmd_log,
        "primary": _cmd_primary,
        "backup": _cmd_backup,
        "arbiter": _cmd_arbiter,
        "status": _cmd_status,
        "lab": _cmd_lab,
        "demo": _cmd_demo,
        "run": _cmd_run,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("ftproxy: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
