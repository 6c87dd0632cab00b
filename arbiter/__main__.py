"""``python -m arbiter`` (and ``ftproxy arbiter``): run the arbiter server.

Exit codes: 0 after Ctrl-C, 2 for a usage error (including a missing
``--secret-file`` without ``--insecure``, or an unusable secret file), 5 when
the server cannot start (an unreadable store in ``--data-dir``, ``--listen``'s
port in use: the reason names the flag), 3 when it stops on an error later.
Each error ends in one clear message, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Final

import structlog
import trio

from arbiter._client import Address, parse_address
from arbiter._server import serve
from arbiter._store import StoreError
from ftproxy.core.auth import SecretFileError, load_secret
from ftproxy.core.exceptions import exception_leaves
from ftproxy.logsetup import add_logging_arguments, configure_from_args

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_FAILED: Final = 3
EXIT_STARTUP: Final = 5


def build_parser(prog: str = "python -m arbiter") -> argparse.ArgumentParser:
    """The command line of the arbiter server."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve durable test-and-set decisions to ftproxy replicas, so that at "
        "most one replica of a pair acts alone.",
    )
    parser.add_argument(
        "--listen",
        required=True,
        type=_address,
        metavar="HOST:PORT",
        help="the address to serve on (port 0: any free port, logged as arbiter_listening)",
    )
    parser.add_argument(
        "--data-dir",
        required=True,
        metavar="DIR",
        help="where decisions are kept (created if missing); one arbiter per directory",
    )
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument(
        "--secret-file",
        metavar="FILE",
        help="the secret shared with the replicas, which must prove they know it",
    )
    auth.add_argument(
        "--insecure",
        action="store_true",
        help="serve without authentication (replicas must use --insecure too)",
    )
    add_logging_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str = "python -m arbiter") -> int:
    """Run the arbiter until Ctrl-C; return the exit code (usage errors exit via argparse).

    ``prog`` is the name usage lines give the command (``ftproxy arbiter`` runs this too).
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.secret_file is None and not args.insecure:
        parser.error(
            "refusing to start without --secret-file FILE "
            "(or --insecure, to serve without authentication)"
        )
    configure_from_args(args)
    log = structlog.get_logger()
    secret: bytes | None = None
    if args.secret_file is not None:
        try:
            secret = load_secret(args.secret_file)  # may warn: logging is set up
        except SecretFileError as exc:
            parser.error(str(exc))
    else:
        log.warning("authentication_disabled", reason="--insecure")
    host, port = args.listen
    started = False

    async def run() -> None:
        nonlocal started
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, host, port, args.data_dir, secret)
            started = True

    try:
        trio.run(run)
    except BaseException as exc:
        leaves = list(exception_leaves(exc))
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            log.info("arbiter_stopped", reason="interrupted")
            return EXIT_OK
        code = EXIT_FAILED if started else EXIT_STARTUP
        for leaf in leaves:
            if isinstance(leaf, StoreError):
                flag = "" if started else f"--data-dir {args.data_dir}: "
                log.error("arbiter_failed", reason=f"{flag}{leaf}")
                return code
            if isinstance(leaf, OSError):
                reason = f"--listen {host}:{port}: {leaf.strerror or leaf}"
                log.error("arbiter_failed", reason=reason)
                return code
        raise
    raise AssertionError("serve() returned")  # pragma: no cover


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
