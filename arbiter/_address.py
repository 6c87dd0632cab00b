"""``--arbiter`` addresses: which arbiter answers, and how to reach it.

Two forms::

    HOST:PORT                                   the built-in arbiter (ftproxy arbiter)
    etcd://[USER@]HOST:PORT[,HOST:PORT...][?OPTIONS]     an etcd cluster (v3 API), plain HTTP
    etcds://[USER@]HOST:PORT[,HOST:PORT...][?OPTIONS]    the same over TLS

OPTIONS (``&``-separated), each also a flag of the commands that take
``--arbiter`` (a value may come from one place only):

    ca=FILE             --etcd-ca             CA bundle that signed the members' certificates
                                              (default: the system's)
    cert=FILE           --etcd-cert           client certificate (etcd's --client-cert-auth)
    key=FILE            --etcd-key            its private key
    user=NAME           --etcd-user           etcd user (etcd's auth enable)
    password-file=FILE  --etcd-password-file  that user's password, on the file's first line

A password is never part of the address (it would show in ``ps`` and in logs).
:func:`parse_arbiter` only reads the text; :func:`connect` reads the files and
returns the :class:`~arbiter.Arbiter`. Both raise :class:`ArbiterAddressError`
(a ``ValueError``) with a message that names the flag and the form expected.
"""

from __future__ import annotations

import re
import ssl
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Final
from urllib.parse import parse_qsl, urlsplit

import structlog

from arbiter._client import Address, BuiltinArbiter, format_address, parse_address
from arbiter._etcd import EtcdArbiter
from arbiter._interface import Arbiter, ArbiterTiming

__all__ = [
    "ARBITER_FORMS",
    "ArbiterAddress",
    "ArbiterAddressError",
    "BuiltinAddress",
    "EtcdAddress",
    "EtcdSettings",
    "connect",
    "parse_arbiter",
]

ARBITER_FORMS: Final = (
    "HOST:PORT (the built-in arbiter) or etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS)"
)
_SCHEMES: Final = {"etcd": False, "etcds": True}
_HOST: Final = re.compile(r"[A-Za-z0-9._-]+")  # a name or an IPv4 address ([V6] apart)
# Address option -> the flag that gives the same setting.
_OPTION_FLAGS: Final = {
    "ca": "--etcd-ca",
    "cert": "--etcd-cert",
    "key": "--etcd-key",
    "user": "--etcd-user",
    "password-file": "--etcd-password-file",
}


class ArbiterAddressError(ValueError):
    """An ``--arbiter`` address (or an etcd flag) that cannot be used; the message says why."""


@dataclass(frozen=True)
class EtcdSettings:
    """What an etcd arbiter is reached with besides its endpoints (all optional)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password_file: str | None = None

    def given(self) -> dict[str, str]:
        """The settings that have a value, by option name (``password-file``, ...)."""
        return {
            f.name.replace("_", "-"): value
            for f in fields(self)
            if (value := getattr(self, f.name)) is not None
        }


@dataclass(frozen=True)
class BuiltinAddress:
    """The built-in arbiter at ``address``."""

    address: Address

    @property
    def kind(self) -> str:
        return "builtin"

    def __str__(self) -> str:
        return format_address(self.address)


@dataclass(frozen=True)
class EtcdAddress:
    """An etcd cluster: its members' client endpoints, and how to talk to them."""

    endpoints: tuple[Address, ...]
    tls: bool = False
    settings: EtcdSettings = field(default_factory=EtcdSettings)

    @property
    def kind(self) -> str:
        return "etcd"

    def __str__(self) -> str:
        user = f"{self.settings.user}@" if self.settings.user else ""
        scheme = "etcds" if self.tls else "etcd"
        return f"{scheme}://{user}{','.join(format_address(e) for e in self.endpoints)}"


ArbiterAddress = BuiltinAddress | EtcdAddress


def parse_arbiter(
    text: str, settings: EtcdSettings | None = None, *, flag: str = "--arbiter"
) -> ArbiterAddress:
    """Parse an ``--arbiter`` address; ``settings`` are the etcd flags given beside it."""
    settings = settings or EtcdSettings()
    scheme, sep, _ = text.partition("://")
    if not sep:
        if settings.given():
            first = next(iter(settings.given()))
            raise ArbiterAddressError(
                f"{_OPTION_FLAGS[first]} goes with an etcd arbiter "
                f"({flag} etcd://HOST:PORT[,...]), not with {flag} {text}"
            )
        try:
            host, port = parse_address(text)
        except ValueError:
            raise ArbiterAddressError(_expected(flag, text, "")) from None
        if not _HOST.fullmatch(host) and not text.startswith("["):
            raise ArbiterAddressError(_expected(flag, text, f"{host!r} is not a host name"))
        return BuiltinAddress((host, port))
    if scheme not in _SCHEMES:
        raise ArbiterAddressError(_expected(flag, text, f"unknown scheme {scheme}://"))
    return _parse_etcd(text, _SCHEMES[scheme], settings, flag)


def _parse_etcd(text: str, tls: bool, settings: EtcdSettings, flag: str) -> EtcdAddress:
    parts = urlsplit(text)
    if parts.path not in ("", "/") or parts.fragment:
        raise ArbiterAddressError(_expected(flag, text, "no path after the endpoints"))
    where = parts.netloc
    options: dict[str, str] = {}
    user, at, hosts = where.rpartition("@")
    if at:
        if ":" in user:
            shown = text.replace(user, user.partition(":")[0] + ":***", 1)
            raise ArbiterAddressError(
                f"{flag} {shown}: a password never goes in the address (it would show in ps "
                "and in logs): put it in a file and give password-file=FILE or "
                "--etcd-password-file FILE"
            )
        if not user:
            raise ArbiterAddressError(_expected(flag, text, "an empty user name before @"))
        options["user"] = user
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ArbiterAddressError(_expected(flag, text, "options are NAME=VALUE&...")) from None
    for name, value in query:
        if name not in _OPTION_FLAGS:
            known = ", ".join(_OPTION_FLAGS)
            raise ArbiterAddressError(f"{flag} {text}: unknown option {name!r} (known: {known})")
        if name in options or not value:
            what = "is given twice" if name in options else "has no value"
            raise ArbiterAddressError(f"{flag} {text}: option {name} {what}")
        options[name] = value
    for name, value in settings.given().items():
        if name in options:
            raise ArbiterAddressError(
                f"{_OPTION_FLAGS[name]} and the {name} of {flag} {text} say the same thing: "
                "give one of them"
            )
        options[name] = value
    endpoints = []
    for item in hosts.split(","):
        try:
            host, port = parse_address(item)
            if not _HOST.fullmatch(host) and not item.startswith("["):
                raise ValueError(host)
        except ValueError:
            reason = f"{item!r} is not HOST:PORT" if item else "an empty endpoint"
            raise ArbiterAddressError(_expected(flag, text, reason)) from None
        endpoints.append((host, port))
    merged = EtcdSettings(**{name.replace("-", "_"): value for name, value in options.items()})
    if not tls and (merged.ca or merged.cert or merged.key):
        raise ArbiterAddressError(
            f"{flag} {text}: a CA or client certificate means TLS: write etcds://"
        )
    if (merged.cert is None) != (merged.key is None):
        raise ArbiterAddressError(
            f"{flag} {text}: a client certificate needs its key, and a key its certificate "
            "(--etcd-cert and --etcd-key)"
        )
    if merged.password_file and not merged.user:
        raise ArbiterAddressError(
            f"{flag} {text}: a password file without a user: give USER@ or --etcd-user"
        )
    return EtcdAddress(tuple(endpoints), tls, merged)


def _expected(flag: str, text: str, reason: str) -> str:
    because = f" ({reason})" if reason else ""
    return f"{flag} {text!r}{because}: expected {ARBITER_FORMS}"


def connect(
    address: ArbiterAddress | Address | str,
    secret: bytes | None,
    *,
    timing: ArbiterTiming | None = None,
) -> Arbiter:
    """The arbiter that ``address`` names, ready to ask (no connection is opened yet).

    ``secret`` authenticates replicas to the built-in arbiter; etcd uses its own
    credentials (TLS, user and password) instead. Files named by the address are
    read here: a missing or unusable one raises :class:`ArbiterAddressError`.
    """
    timing = timing or ArbiterTiming()
    if isinstance(address, str):
        address = parse_arbiter(address)
    if isinstance(address, tuple):
        address = BuiltinAddress(address)
    if isinstance(address, BuiltinAddress):
        return BuiltinArbiter(address.address, secret, timing)
    settings = address.settings
    tls = _tls_context(settings) if address.tls else None
    password = _read_password(settings.password_file) if settings.password_file else None
    if settings.user and password is None:
        raise ArbiterAddressError(
            f"etcd user {settings.user!r} needs a password: give --etcd-password-file FILE "
            "(or password-file=FILE in the address)"
        )
    return EtcdArbiter(
        address.endpoints,
        display=str(address),
        tls=tls,
        client_certificate=settings.cert is not None,
        user=settings.user,
        password=password,
        timing=timing,
    )


def _tls_context(settings: EtcdSettings) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=settings.ca)
    except (OSError, ssl.SSLError) as exc:
        raise ArbiterAddressError(f"--etcd-ca {settings.ca}: {_reason(exc)}") from None
    if settings.cert is not None:
        try:
            context.load_cert_chain(settings.cert, settings.key)
        except (OSError, ssl.SSLError) as exc:
            raise ArbiterAddressError(
                f"--etcd-cert {settings.cert} / --etcd-key {settings.key}: {_reason(exc)}"
            ) from None
    return context


def _read_password(path: str) -> str:
    try:
        with open(path, "rb") as file:
            data = file.read()
            mode = Path(path).stat().st_mode
    except OSError as exc:
        raise ArbiterAddressError(f"--etcd-password-file {path}: {_reason(exc)}") from None
    try:
        password = data.decode().splitlines()[0] if data.strip() else ""
    except UnicodeDecodeError:
        raise ArbiterAddressError(f"--etcd-password-file {path}: not UTF-8 text") from None
    if not password:
        raise ArbiterAddressError(f"--etcd-password-file {path}: the file is empty")
    if stat.S_IMODE(mode) & 0o077:
        structlog.get_logger().warning(
            "secret_file_exposed", path=path, mode=oct(stat.S_IMODE(mode)), hint=f"chmod 600 {path}"
        )
    return password


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
