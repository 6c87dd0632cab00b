"""How every ftproxy program logs: the one place structlog is configured.

``ftproxy`` and all its subcommands, ``python -m arbiter`` and ``python -m
ftproxy.tools.demo`` take the same two flags (``add_logging_arguments``) and hand
them to ``configure_logging``. Logs go to stderr: console rendering on a
terminal, JSON lines otherwise (``--log-format`` chooses), tracebacks included
as text either way.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Final

import structlog

LOG_FORMATS: Final = ("auto", "console", "json")


def add_logging_arguments(parser: argparse.ArgumentParser, *, inherited: bool = False) -> None:
    """``-v`` and ``--log-format`` on ``parser``.

    ``inherited``: the parser is a subcommand's, so the flags may come before
    the subcommand or after it; a flag given after it wins, one not given
    there leaves the value from before it alone.
    """
    default_verbose: Any = argparse.SUPPRESS if inherited else False
    default_format: Any = argparse.SUPPRESS if inherited else "auto"
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default_verbose, help="log debug events too"
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=default_format,
        help="console, JSON lines, or auto: console on a terminal, JSON otherwise",
    )


def configure_from_args(args: argparse.Namespace) -> None:
    """``configure_logging`` as the flags of ``add_logging_arguments`` ask."""
    json_logs = {"auto": None, "console": False, "json": True}[args.log_format]
    configure_logging(verbose=args.verbose, json_logs=json_logs)


def configure_logging(*, verbose: bool = False, json_logs: bool | None = None) -> None:
    """Console rendering on a terminal, JSON lines otherwise; logs go to stderr."""
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    # The console renderer formats exceptions itself; JSON wants them as text.
    renderers: list[Any] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if json_logs
        else [structlog.dev.ConsoleRenderer()]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.INFO
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
