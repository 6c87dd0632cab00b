"""The ``ftproxy`` command: subcommands, argument checks, logging set-up.

Every error a user can cause (a bad flag, an unreadable log, a divergence)
ends in one clear message and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ftproxy import __version__
from ftproxy.logsetup import add_logging_arguments, configure_from_args
from ftproxy.logsetup import configure_logging as configure_logging

if TYPE_CHECKING:
    import arbiter

EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_logging_arguments(parser)
    _add_config_argument(parser, inherited=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    record = commands.add_parser(
        "record",
        usage="ftproxy record --log PATH [options] -- (SCRIPT | -m MODULE) [ARGS...]",
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
    record.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="PATH",
        help="pin PATH's SHA-256 (a file, or every file in a directory and its listing) in the "
        "log header, so that a backup or a replay whose copy differs refuses (repeatable)",
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
        usage="ftproxy primary --log-listen HOST:PORT --arbiter ADDRESS [options] "
        "-- (SCRIPT | -m MODULE) [ARGS]",
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
        help="with --no-output-rule only: hold each log entry this long after it is logged "
        "before shipping it, to make the unsafe window visible",
    )
    primary.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="PATH",
        help="pin PATH's SHA-256 (a file, or every file in a directory and its listing) in the "
        "log header, so that a backup or a replay whose copy differs refuses (repeatable)",
    )
    primary.add_argument("--pair", default="ftproxy", help="the pair's name at the arbiter")
    primary.add_argument(
        "--generation", type=int, default=1, help="the pair's generation at the arbiter"
    )

    backup = commands.add_parser(
        "backup",
        usage="ftproxy backup --primary HOST:PORT --arbiter ADDRESS [options] "
        "-- (SCRIPT | -m MODULE) [ARGS]",
        help="replay behind a primary, and take over when it dies",
        description="Connect to the primary's log channel, replay its guest behind it, and go "
        "live (after winning the arbiter) when the primary falls silent.",
    )
    backup.add_argument(
        "--primary", required=True, metavar="HOST:PORT", help="the primary's --log-listen"
    )
    backup.add_argument(
        "--workdir",
        metavar="DIR",
        help="run the guest in DIR (default: this command's working directory; never the "
        "primary's, whose files would be shared on one host)",
    )
    backup.add_argument(
        "--fence",
        choices=["kill", "none"],
        default="kill",
        help="after winning the arbiter, an old primary on this host that still holds the "
        "service address is SIGKILLed (kill, the default), or left alone and the address "
        "reported busy in /status (none)",
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

    switchover = commands.add_parser(
        "switchover",
        usage="ftproxy switchover ADMIN (--secret-file PATH | --insecure) [--timeout-s S]",
        help="hand the service from the primary to its backup (a planned switchover)",
        description="Read the primary's log channel address from ADMIN (its --admin "
        "HOST:PORT, read-only), ask it over the authenticated log channel (the pair's "
        "secret) to hand the service to its backup, and wait for the outcome. No "
        "acknowledged write is lost; in packet mode no client connection is reset.",
    )
    switchover.add_argument("admin", metavar="ADMIN", help="the primary's --admin HOST:PORT")
    _add_secret_arguments(switchover)
    switchover.add_argument(
        "--timeout-s",
        type=float,
        default=30.0,
        metavar="S",
        help="give up waiting for the outcome after S seconds (default 30)",
    )

    status = commands.add_parser("status", help="show a replica's status (its --admin address)")
    from ftproxy.tools.status import build_status_parser

    build_status_parser(status)

    lab = commands.add_parser(
        "lab",
        help="network-namespace test hosts for packet mode (root)",
        description="Client, primary, backup and arbiter hosts in network namespaces on one "
        "bridge (10.200.0.0/24, inside the lab only).",
    )
    from ftproxy.tools.lab import add_lab_arguments

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
    from ftproxy.tools.demo import add_demo_arguments

    add_demo_arguments(demo)

    log_cmd = commands.add_parser("log", help="inspect a log")
    log_commands = log_cmd.add_subparsers(dest="log_command", required=True, metavar="ACTION")
    show = log_commands.add_parser("show", help="one line per record")
    show.add_argument("log", metavar="LOG")
    show.add_argument("--json", action="store_true", help="print a summary as JSON instead")
    export = log_commands.add_parser("export", help="network inputs and outputs as a pcap")
    export.add_argument("log", metavar="LOG")
    export.add_argument("--pcap", required=True, metavar="PATH", help="the pcap file to write")
    _inherit_global_arguments(parser)
    return parser


def _inherit_global_arguments(parser: argparse.ArgumentParser) -> None:
    """``-v``, ``--log-format`` and ``--config`` after any subcommand too, as before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                add_logging_arguments(sub, inherited=True)
                _add_config_argument(sub, inherited=True)
                _inherit_global_arguments(sub)


def _add_config_argument(parser: argparse.ArgumentParser, *, inherited: bool) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS if inherited else None,
        help="read flags from this TOML file (keys: the long flag names; a table per "
        "command); the command line overrides it",
    )


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
    from ftproxy.shell.front import PacketConfig, check_interface, parse_network

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
    from ftproxy.shell.front.packet import preload_scapy

    preload_scapy()
    if args.vip is None:
        if vip_required:
            raise ValueError("--front packet needs --vip IP/PREFIX, e.g. 10.200.0.100/24")
        network = None
    else:
        network = parse_network(args.vip, args.mac, args.gateway)
    return PacketConfig(args.interface, network, args.drop_rate, args.drop_seed)


def _add_replica_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arbiter",
        required=True,
        metavar="ADDRESS",
        help="the arbiter: HOST:PORT (the built-in one, `ftproxy arbiter`) or an etcd "
        "cluster, etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS)",
    )
    _add_etcd_arguments(parser)
    parser.add_argument("--admin", metavar="HOST:PORT", help="serve GET /status and /metrics here")
    parser.add_argument(
        "--on-sigterm",
        choices=("stop", "leave"),
        default="stop",
        help="what SIGTERM (systemctl stop) means while this replica serves: stop (the "
        "default) delivers it to the guest as a logged signal, so the service stops on both "
        "replicas; leave hands the service to the backup first (as ftproxy switchover does), "
        "then this replica exits 0. SIGUSR1 always means a switchover. A replica that is "
        "still a backup just stops (exit 0): its primary goes on",
    )
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
    parser.add_argument(
        "--on-role-change",
        metavar="CMD",
        help="run CMD (split like a shell would, run without one) at every role change, "
        "with FTPROXY_ROLE, FTPROXY_GENERATION, FTPROXY_PAIR... in its environment",
    )
    parser.add_argument(
        "--on-role-change-timeout-s",
        type=float,
        default=10.0,
        metavar="S",
        help="kill a role-change hook still running after S seconds (default 10)",
    )
    _add_front_arguments(parser)


def _add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say how to reach an etcd ``--arbiter`` (also options in its address)."""
    etcd = parser.add_argument_group("etcd arbiter (with --arbiter etcd:// or etcds://)")
    etcd.add_argument("--etcd-ca", metavar="FILE", help="CA bundle of the members' certificates")
    etcd.add_argument("--etcd-cert", metavar="FILE", help="client certificate (etcds://)")
    etcd.add_argument("--etcd-key", metavar="FILE", help="the client certificate's key")
    etcd.add_argument("--etcd-user", metavar="NAME", help="etcd user (etcd's auth enable)")
    etcd.add_argument(
        "--etcd-password-file", metavar="FILE", help="that user's password, on its first line"
    )


def _arbiter_from_args(
    args: argparse.Namespace, secret: bytes | None, peer_timeout_s: float
) -> arbiter.Arbiter:
    """The arbiter that ``--arbiter`` and the etcd flags name (ArbiterAddressError if none)."""
    import arbiter

    settings = arbiter.EtcdSettings(
        ca=args.etcd_ca,
        cert=args.etcd_cert,
        key=args.etcd_key,
        user=args.etcd_user,
        password_file=args.etcd_password_file,
    )
    address = arbiter.parse_arbiter(args.arbiter, settings)
    return arbiter.connect(
        address, secret, timing=arbiter.ArbiterTiming.for_peer_timeout(peer_timeout_s)
    )


def _secret(args: argparse.Namespace, command: str) -> bytes | None:
    from ftproxy.core.auth import load_secret

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
    from ftproxy.core.records import Policy
    from ftproxy.core.replication import Timing
    from ftproxy.guest import protocol
    from ftproxy.shell.front.socket import parse_address_map
    from ftproxy.shell.options import ReplicaOptions

    _check_guest_command(args.guest, command)
    secret = _secret(args, command)
    timing = Timing(
        heartbeat_s=args.heartbeat_ms / 1000,
        peer_timeout_s=args.peer_timeout_ms / 1000,
        max_lag_s=args.max_lag_ms / 1000,
        max_lag_bytes=args.max_lag_bytes,
    )
    return ReplicaOptions(
        argv=args.guest,
        arbiter=_arbiter_from_args(args, secret, timing.peer_timeout_s),
        secret=secret,
        timing=timing,
        address_map=parse_address_map(args.map),
        admin=arbiter.parse_address(args.admin) if args.admin else None,
        policy=Policy(
            args.exit_every or protocol.DEFAULT_EXIT_EVERY, protocol.DEFAULT_CLOCK_STEP_NS
        ),
        extra_env=_parse_env(args.env),
        packet=_packet_config(args, vip_required=command == "primary"),
        on_role_change=_hook_command(args),
        hook_timeout_s=args.on_role_change_timeout_s,
        fence=getattr(args, "fence", "kill"),
        data_dir=Path(args.data_dir) if args.data_dir else None,
        on_sigterm=args.on_sigterm,
    )


def _hook_command(args: argparse.Namespace) -> list[str] | None:
    from ftproxy.shell.hooks import parse_hook_command

    if not args.on_role_change_timeout_s > 0:
        raise ValueError("--on-role-change-timeout-s must be a number > 0")
    return parse_hook_command(args.on_role_change) if args.on_role_change else None


def _cmd_primary(args: argparse.Namespace) -> int:
    import arbiter
    from ftproxy.core.auth import SecretFileError
    from ftproxy.shell.primary import serve_primary
    from ftproxy.shell.startfiles import pinned_paths

    try:
        options = _replica_options(args, "primary")
        listen = arbiter.parse_address(args.log_listen)
        pinned_paths(args.pin, os.getcwd())  # a path that is not there: say so now
    except (ValueError, SecretFileError) as exc:
        return _usage(str(exc))
    if args.ship_delay_ms and not args.no_output_rule:
        return _usage("--ship-delay-ms only goes with --no-output-rule")
    options.output_rule = not args.no_output_rule
    options.ship_delay_s = args.ship_delay_ms / 1000
    options.pair = args.pair
    options.generation = args.generation
    options.pins = args.pin
    if not options.output_rule:
        structlog.get_logger().warning(
            "output_rule_disabled",
            consequence="outputs leave before the backup holds their log: a failover can "
            "lose acknowledged writes",
        )
    return _run_replica("primary", serve_primary, options, listen)


def _cmd_backup(args: argparse.Namespace) -> int:
    import arbiter
    from ftproxy.core.auth import SecretFileError
    from ftproxy.shell.backup import serve_backup

    try:
        options = _replica_options(args, "backup")
        primary = arbiter.parse_address(args.primary)
        if args.workdir is not None and not os.path.isdir(args.workdir):
            raise ValueError(f"--workdir {args.workdir!r} is not a directory")
        options.workdir = args.workdir
        if args.log_listen:
            options.log_listen = arbiter.parse_address(args.log_listen)
    except (ValueError, SecretFileError) as exc:
        return _usage(str(exc))
    return _run_replica("backup", serve_backup, options, primary)


def _run_replica(command: str, serve: Any, *args: Any) -> int:
    """``trio.run(serve, *args)``; what the flags name unusable at start: one line, exit 5."""
    from ftproxy.guest import _trace
    from ftproxy.shell.exits import EXIT_STARTUP, StartupError

    _trace.enable(command)
    try:
        return int(trio.run(serve, *args))
    except StartupError as exc:
        print(f"ftproxy {command}: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP


def _cmd_run(args: argparse.Namespace) -> int:
    import arbiter
    from ftproxy.core.auth import SecretFileError
    from ftproxy.shell.node import run_node

    if args.front == "packet":
        return _usage(
            "ftproxy run serves in socket mode only (for now); run a packet-mode pair "
            "with ftproxy primary and ftproxy backup"
        )
    try:
        options = _replica_options(args, "run")
        options.log_listen = arbiter.parse_address(args.log_listen)
    except (ValueError, SecretFileError) as exc:
        return _usage(str(exc))
    options.pair = args.pair
    return _run_replica("run", run_node, options)


def _cmd_arbiter(args: argparse.Namespace) -> int:
    from arbiter.__main__ import main as arbiter_main

    argv = ["--listen", args.listen, "--data-dir", args.data_dir]
    argv += ["--secret-file", args.secret_file] if args.secret_file else []
    argv += ["--insecure"] if args.insecure else []
    argv += ["--log-format", args.log_format] + (["--verbose"] if args.verbose else [])
    return arbiter_main(argv, prog="ftproxy arbiter")


def _cmd_demo(args: argparse.Namespace) -> int:
    from ftproxy.tools.demo import run_demo

    return run_demo(args)


def _cmd_lab(args: argparse.Namespace) -> int:
    from ftproxy.tools.lab import run_lab

    return run_lab(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from ftproxy.tools.status import run_status

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
    from ftproxy.core.records import Policy
    from ftproxy.guest import protocol
    from ftproxy.shell.front.socket import parse_address_map
    from ftproxy.shell.record import RecordOptions, record

    argv = args.guest
    from ftproxy.shell.checks import check_program
    from ftproxy.shell.exits import EXIT_STARTUP, StartupError

    try:
        _check_guest_command(argv, "record")
        check_program(argv)
    except StartupError as exc:
        print(f"ftproxy record: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except ValueError as exc:
        return _usage(str(exc))
    try:
        options = RecordOptions(
            log_path=args.log,
            argv=argv,
            address_map=parse_address_map(args.map),
            policy=Policy(
                args.exit_every or protocol.DEFAULT_EXIT_EVERY, protocol.DEFAULT_CLOCK_STEP_NS
            ),
            extra_env=_parse_env(args.env),
            packet=_packet_config(args),
            pins=args.pin,
        )
        from ftproxy.guest import _trace

        _trace.enable("record")
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

    from ftproxy.log.file import LogFormatError, read_log
    from ftproxy.shell.replay import ReplayError, replay
    from ftproxy.shell.supervisor import Divergence, GuestFailure

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
    verified = (
        f"verified {result.entries} entries and {result.outputs} outputs "
        f"({result.output_bytes} bytes) identical to the recording"
    )
    if result.ended_at is not None:
        why = (
            f"the recording ended with the guest {result.end_reason}"
            if result.end_reason is not None
            else "the log has no end record (the recorder was killed)"
        )
        print(
            f"ftproxy replay: the log ends early at entry {result.ended_at}; everything "
            f"before it verified: {verified[len('verified ') :]}; {why}",
            file=sys.stderr,
        )
        return EXIT_OK
    ending = (
        f"guest exited with returncode {result.returncode}, as recorded"
        if result.log_complete
        else f"the recording ended with the guest {result.end_reason}"
    )
    print(f"ftproxy replay: {verified}; {ending}", file=sys.stderr)
    return EXIT_OK


def _cmd_log(args: argparse.Namespace) -> int:
    from ftproxy.log.file import LogFormatError, read_log

    try:
        contents = read_log(args.log)
    except LogFormatError as exc:
        return _usage(str(exc))
    if args.log_command == "show":
        from ftproxy.log.view import describe_log, log_summary

        if args.json:
            print(json.dumps(log_summary(contents), indent=2, default=str))
        else:
            for line in describe_log(contents):
                print(line)
        return EXIT_OK
    from ftproxy.log.pcap import export_pcap

    stats = export_pcap(contents, args.pcap)
    print(
        f"ftproxy log export: {stats.packets} packets ({stats.tcp_streams} TCP streams, "
        f"{stats.udp_datagrams} UDP datagrams) written to {args.pcap}",
        file=sys.stderr,
    )
    return EXIT_OK


def _cmd_switchover(args: argparse.Namespace) -> int:
    from ftproxy.core.auth import SecretFileError
    from ftproxy.tools.status import parse_address
    from ftproxy.tools.switchover import switchover

    try:
        parse_address(args.admin)
        secret = _secret(args, "switchover")
    except (ValueError, SecretFileError) as exc:
        return _usage(str(exc))
    if not args.timeout_s > 0:
        return _usage("--timeout-s must be a number > 0")
    code, line = trio.run(switchover, args.admin, secret, args.timeout_s)
    print(f"ftproxy {line}", file=sys.stdout if code == EXIT_OK else sys.stderr)
    return int(code)


def _check_guest_command(argv: list[str], command: str) -> None:
    """Refuse, before anything starts, a guest command line the guest could not run."""
    from ftproxy.guest.command import USAGE, CommandError, parse_command

    if not argv:
        raise ValueError(f"{command} needs the program to run after --: -- {USAGE}")
    try:
        parse_command(argv)
    except CommandError as exc:
        raise ValueError(f"{command}: {exc}") from None


def _usage(message: str) -> int:
    print(f"ftproxy: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Run ``ftproxy`` with ``argv`` (default: the process's own arguments); return
    its exit code (``ftproxy.EXIT_*``)."""
    from ftproxy import config

    parser = build_parser()
    own, guest = split_guest_argv(sys.argv[1:] if argv is None else argv)
    path = config.config_path(own)
    if path is not None:
        try:
            own, guest = config.apply(parser, config.load(path), own, guest, path)
        except config.ConfigError as exc:
            return _usage(str(exc))
    args = parser.parse_args(own)
    args.guest = guest
    configure_from_args(args)
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
        "switchover": _cmd_switchover,
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
