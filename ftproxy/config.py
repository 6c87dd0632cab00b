"""``--config FILE``: every flag from a TOML file, the command line overriding it.

The file's keys are the long flag names without their dashes. Flags of
``ftproxy`` itself (``log-format``, ``verbose``) sit at the top; each
subcommand's sit in a table of its name, and only the table of the command
being run is used (all of them are checked)::

    log-format = "json"

    [primary]
    log-listen = "10.0.0.1:7100"
    arbiter = "10.0.0.3:7000"
    secret-file = "/etc/ftproxy/secret"
    map = ["6380=0.0.0.0:6380"]      # a repeatable flag takes a list
    program = ["/srv/kv.py", "--port", "6380"]   # what follows --

A switch (``insecure``, ``verbose``) takes true or false; a flag with a value
takes a string, or a number where the flag wants one. A flag given on the
command line replaces the file's value (a repeatable one, the file's whole
list); ``program`` is used only when the command line has no ``--``. Unknown
keys and values of the wrong type are refused, naming the key.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any, Final

PROGRAM_KEY: Final = "program"
# Subcommands whose options can come from the file (those with a command to run).
WITH_PROGRAM: Final = frozenset({"primary", "backup", "record", "run"})


class ConfigError(Exception):
    """The configuration file cannot be used; the message names the file and the key."""


def config_path(argv: Sequence[str]) -> str | None:
    """The FILE of ``--config FILE`` (or ``--config=FILE``) in ftproxy's own arguments."""
    for index, token in enumerate(argv):
        if token == "--config":
            return argv[index + 1] if index + 1 < len(argv) else None
        if token.startswith("--config="):
            return token.partition("=")[2]
    return None


def load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not TOML: {exc}") from None


def apply(
    parser: argparse.ArgumentParser,
    config: Mapping[str, Any],
    own: list[str],
    guest: list[str],
    path: str,
) -> tuple[list[str], list[str]]:
    """ftproxy's arguments and the guest's command line with the file's values in.

    The file's flags go just before those of the command line at their level
    (the top's before the subcommand, a subcommand's right after its name), so
    argparse sees the command line's last and lets it win.
    """
    commands = _subcommands(parser)
    top: dict[str, Any] = {}
    tables: dict[str, Mapping[str, Any]] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            if key not in commands:
                raise ConfigError(
                    f"--config {path}: [{key}] is not an ftproxy command "
                    f"(one of {', '.join(sorted(commands))})"
                )
            tables[key] = value
        else:
            top[key] = value
    top_tokens = _tokens(parser, top, own, f"--config {path}: ", program_allowed=False)
    chosen: str | None = None
    tokens: list[str] = []
    for name, table in tables.items():
        where = f"--config {path}: [{name}] "
        found = _tokens(commands[name], table, own, where, name in WITH_PROGRAM)
        if name in own and (chosen is None or own.index(name) < own.index(chosen)):
            chosen, tokens = name, found
    if chosen is not None:
        at = own.index(chosen) + 1
        own = [*own[:at], *tokens, *own[at:]]
        program = tables[chosen].get(PROGRAM_KEY)
        if program is not None and not guest:
            guest = list(program)
    return [*top_tokens, *own], guest


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _tokens(
    parser: argparse.ArgumentParser,
    table: Mapping[str, Any],
    own: list[str],
    where: str,
    program_allowed: bool,
) -> list[str]:
    """The flags ``table`` stands for, minus those the command line gives itself."""
    flags = {
        option[2:]: action
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option not in ("--help", "--config", "--version")
    }
    given = {token.partition("=")[0] for token in own if token.startswith("--")}
    tokens: list[str] = []
    for key, value in table.items():
        if key == PROGRAM_KEY and program_allowed:
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) for v in value)
            ):
                raise ConfigError(
                    f"{where}{key}: expected a list of strings, the program and its arguments"
                )
            continue
        action = flags.get(key)
        if action is None:
            known = ", ".join(sorted(flags) + ([PROGRAM_KEY] if program_allowed else []))
            raise ConfigError(f"{where}{key}: unknown key (the keys are flag names: {known})")
        option = f"--{key}"
        shorts = [o for o in action.option_strings if not o.startswith("--")]
        if option in given or any(s in own for s in shorts):
            continue  # the command line says it itself
        tokens += _flag_tokens(action, option, value, f"{where}{key}")
    return tokens


def _flag_tokens(action: argparse.Action, option: str, value: Any, where: str) -> list[str]:
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_kind(value)}")
        return [option] if value else []
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [token for item in items for token in (option, _scalar(action, item, where))]
    return [option, _scalar(action, value, where)]


def _scalar(action: argparse.Action, value: Any, where: str) -> str:
    numeric = action.type in (int, float)
    if isinstance(value, bool | list | dict):
        raise ConfigError(
            f"{where}: expected {'a number' if numeric else 'a string'}, got {_kind(value)}"
        )
    if numeric:
        if not isinstance(value, int | float) or (action.type is int and isinstance(value, float)):
            raise ConfigError(
                f"{where}: expected {'an integer' if action.type is int else 'a number'}, "
                f"got {_kind(value)}"
            )
    elif not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {_kind(value)}")
    return str(value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"
