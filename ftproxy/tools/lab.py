"""``ftproxy lab``: a small network of Linux namespaces to run replicas and clients in.

The lab is four hosts on one Ethernet switch, all in network namespaces, so that a
test or a demo can run the primary, the backup, the arbiter and a client on
separate "machines", pull one off the network, or kill it outright::

    client   10.200.0.10  ─┐
    primary  10.200.0.11  ─┤
    backup   10.200.0.12  ─┼── bridge ftlab-br0 (namespace ftlab-switch)
    arbiter  10.200.0.13  ─┘

    VIP      10.200.0.100   reserved: no host's kernel owns it

- Each host is a namespace ``ftlab-<host>`` with loopback up and one NIC, ``eth0``
  (one end of a veth pair), with the host's address and a fixed MAC derived from
  it (``02:00`` + the four address bytes), so captures read the same every run.
- The other end of each pair is the switch port named after the host, enslaved to
  the bridge ``ftlab-br0`` in the namespace ``ftlab-switch``. Nothing is attached
  to the root namespace's network, and 10.200.0.0/24 exists only in these
  namespaces.
- The VIP 10.200.0.100 is reserved for packet-mode replicas: no kernel in the lab
  owns it, so the replica that serves it answers ARP for it in user space (a
  kernel that owned it would reset the user-space stack's connections), and the
  backup takes it over with a gratuitous ARP.
- IPv6 is disabled in every lab namespace: packet-mode replicas log each frame
  they receive as an input, and router solicitations or MLD reports would only be
  noise in their logs.
- **Partitions are made at the switch**, with an nftables ``bridge`` table in the
  switch namespace dropping frames between two ports (a set of (in, out) port
  pairs). Rules inside the host's own namespace would not do: an AF_PACKET socket
  (the packet front) sees incoming frames before any netfilter hook there runs,
  so a packet-mode replica would still hear the world. At the switch, the frames
  never reach the host, for kernel and user-space stacks alike. There is no
  ``netem`` in this kernel: delay and loss belong to the project's own fronts.

Everything is driven through ``ip`` (iproute2) and ``nft`` (nftables) and needs
root. ``Lab`` is the Python API (tests, the demo); ``add_lab_arguments`` and
``run_lab`` are the ``ftproxy lab`` command.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from types import FrameType, TracebackType
from typing import Any, Final

# -- the lab's shape: every name and address is defined here ---------------------

SUBNET: Final = ipaddress.IPv4Network("10.200.0.0/24")
"""The lab's only network; it exists inside the lab's namespaces and nowhere else."""

VIP: Final = "10.200.0.100"
"""Reserved for packet-mode replicas: no kernel owns it (see the module docstring)."""

DEFAULT_PREFIX: Final = "ftlab"
"""Namespaces are ``<prefix>-<host>`` and ``<prefix>-switch``; tests use their own."""

BRIDGE: Final = "ftlab-br0"
"""The switch, inside the switch namespace (so the name never collides)."""

HOST_IFACE: Final = "eth0"
"""Each host's NIC, inside the host's namespace (``--iface`` for the packet front)."""

PARTITION_TABLE: Final = "ftlab"
"""The nftables ``bridge`` table in the switch namespace that makes partitions."""

NEEDS_ROOT: Final = "ftproxy lab needs root (network namespaces)"

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

_NETNS_DIR: Final = "/var/run/netns"
_PREFIX_RE: Final = re.compile(r"^[a-z][a-z0-9]{0,15}$")
_KILL_WAIT: Final = 5.0


@dataclass(frozen=True)
class Host:
    """One machine of the lab: its name (also its switch port) and IPv4 address."""

    name: str
    address: str

    @property
    def interface(self) -> str:
        """The address with the lab's prefix length, as ``ip addr add`` wants it."""
        return f"{self.address}/{SUBNET.prefixlen}"

    @property
    def mac(self) -> str:
        """A fixed, locally administered MAC: ``02:00`` then the address's bytes."""
        octets = ipaddress.IPv4Address(self.address).packed
        return ":".join(f"{b:02x}" for b in (0x02, 0x00, *octets))


HOSTS: Final = (
    Host("client", "10.200.0.10"),
    Host("primary", "10.200.0.11"),
    Host("backup", "10.200.0.12"),
    Host("arbiter", "10.200.0.13"),
)
HOST_NAMES: Final = tuple(h.name for h in HOSTS)


class LabError(Exception):
    """Something the user can fix: printed as one line, never a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- running ip and nft ----------------------------------------------------------

_PACKAGES: Final = {"ip": "iproute2", "nft": "nftables"}


def require_root() -> None:
    """Raise LabError (exit 2) unless running as root."""
    if os.geteuid() != 0:
        raise LabError(NEEDS_ROOT, EXIT_USAGE)


def require_tool(name: str) -> None:
    """Raise LabError naming the package to install if ``name`` is not on PATH."""
    if shutil.which(name) is None:
        raise LabError(f"ftproxy lab needs `{name}` (install the {_PACKAGES[name]} package)")


def _run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    """Run a command to completion; its stdout, or LabError with its stderr."""
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=30
        )
    except FileNotFoundError:
        require_tool(argv[0])
        raise
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"`{' '.join(argv)}` did not finish in 30 s") from exc
    if done.returncode != 0:
        detail = done.stderr.strip() or f"exit status {done.returncode}"
        raise LabError(f"`{' '.join(argv)}` failed: {detail}")
    return done.stdout


def _ip(*args: str, ns: str | None = None) -> str:
    """``ip [-n NS] ARGS...``. Always name devices with ``dev``/``name``: ``ip``
    reads a bare ``a`` or ``b`` as an abbreviation of a keyword."""
    return _run(["ip", *(("-n", ns) if ns else ()), *args])


def _ip_json(*args: str, ns: str | None = None) -> list[dict[str, Any]]:
    """``ip -j ...`` parsed; ``ip`` prints nothing at all for an empty list."""
    out = _ip("-j", *args, ns=ns).strip()
    return list(json.loads(out)) if out else []


def _nft(ns: str, *args: str, stdin: str | None = None) -> str:
    """``nft ARGS`` inside namespace ``ns``."""
    require_tool("nft")
    return _run(["ip", "netns", "exec", ns, "nft", *args], stdin=stdin)


def namespaces() -> set[str]:
    """The names of every named network namespace on the machine."""
    return {str(entry["name"]) for entry in _ip_json("netns", "list")}


def _netns_pids(ns: str) -> list[int]:
    """Live processes whose network namespace is ``ns`` (zombies are not listed)."""
    try:
        out = _ip("netns", "pids", ns)
    except LabError:
        return []  # the namespace is gone: nothing runs in it
    return sorted(int(word) for word in out.split())


def _command_line(pid: int) -> str:
    """A process's command line, or "" if it has exited."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)


_DISABLE_IPV6: Final = (
    "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 "
    "/proc/sys/net/ipv6/conf/default/disable_ipv6; "
    'do [ -e "$f" ] && echo 1 > "$f"; done; true'
)

_PARTITION_RULES: Final = f"""
table bridge {PARTITION_TABLE} {{
    set cut {{ type ifname . ifname; }}
    chain forward {{
        type filter hook forward priority -300; policy accept;
        iifname . oifname @cut drop;
    }}
}}
"""


# -- status ----------------------------------------------------------------------


@dataclass
class ProcessInfo:
    """A process running inside a lab host."""

    pid: int
    command: str


@dataclass
class HostStatus:
    """One host as it is now (``present`` False: its namespace does not exist)."""

    name: str
    namespace: str
    address: str
    mac: str | None
    present: bool
    cut_from: list[str] = field(default_factory=list)
    processes: list[ProcessInfo] = field(default_factory=list)

    @property
    def partitioned(self) -> bool:
        """Cut off from every other host."""
        return len(self.cut_from) == len(HOSTS) - 1


@dataclass
class LabStatus:
    """The whole lab, for ``ftproxy lab status`` (rich table or ``--json``)."""

    prefix: str
    up: bool
    switch: str
    bridge: str
    subnet: str
    vip: str
    hosts: list[HostStatus]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping; each host gains ``partitioned``."""
        data = asdict(self)
        for host, status in zip(data["hosts"], self.hosts, strict=True):
            host["partitioned"] = status.partitioned
        return data


# -- the lab ---------------------------------------------------------------------


class Lab:
    """The namespace lab: build it, run processes in it, break it, tear it down.

    ``with Lab(prefix) as lab:`` brings the lab up (reusing it if it already is)
    and always tears it down at the end, processes included: give tests a prefix
    of their own so that a user's lab is left alone.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not _PREFIX_RE.match(prefix):
            raise LabError(f"bad lab prefix {prefix!r}: a lowercase letter, then up to 15 a-z0-9")
        self.prefix = prefix
        self.switch = f"{prefix}-switch"

    # names

    def host(self, name: str) -> Host:
        """The host called ``name``, or LabError listing the hosts there are."""
        for host in HOSTS:
            if host.name == name:
                return host
        raise LabError(f"no lab host {name!r} (hosts: {', '.join(HOST_NAMES)})", EXIT_USAGE)

    def namespace(self, host: str) -> str:
        """The network namespace of ``host``."""
        return f"{self.prefix}-{self.host(host).name}"

    def address(self, host: str) -> str:
        """The IPv4 address of ``host`` (no prefix length)."""
        return self.host(host).address

    def mac(self, host: str) -> str:
        """The MAC address of ``host``'s ``eth0``."""
        return self.host(host).mac

    def command(self, action: str) -> str:
        """The command line a user types for ``action`` on this lab (for hints)."""
        prefix = "" if self.prefix == DEFAULT_PREFIX else f" --prefix {self.prefix}"
        return f"sudo ftproxy lab{prefix} {action}"

    def all_namespaces(self) -> list[str]:
        """Every namespace of this lab: the hosts', then the switch's."""
        return [self.namespace(h) for h in HOST_NAMES] + [self.switch]

    # life cycle

    def exists(self) -> bool:
        """Whether any namespace of this lab exists (a whole or a partial lab)."""
        return bool(namespaces() & set(self.all_namespaces()))

    def is_up(self) -> bool:
        """Whether the whole lab exists, every host with its address on ``eth0``."""
        if not set(self.all_namespaces()) <= namespaces():
            return False
        return all(self._has_address(h) for h in HOSTS)

    def up(self, *, force: bool = False) -> bool:
        """Build the lab; False if it was already up (and ``force`` is not set).

        A partial lab is an error unless ``force``, which tears down whatever lab
        has this prefix first. A failure half way rolls back everything built.
        """
        _preflight()
        if self.exists():
            if not force and self.is_up():
                return False
            if not force:
                raise LabError(
                    f"a partial lab {self.prefix!r} exists: "
                    f"run `{self.command('down')}` or `{self.command('up --force')}`"
                )
            self.down()
        try:
            self._build()
        except BaseException:
            with contextlib.suppress(LabError):
                self.down()
            raise
        return True

    def down(self) -> list[str]:
        """Kill every process in the lab, delete its namespaces; what was deleted.

        Idempotent: a lab that is not there is nothing to do.
        """
        _preflight()
        present = [ns for ns in self.all_namespaces() if ns in namespaces()]
        for ns in present:
            _kill_namespace(ns, signal.SIGKILL)
        for ns in present:  # hosts first: their veths vanish with them
            _ip("netns", "delete", ns)
        return present

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        self._disable_ipv6(self.switch)
        _ip("link", "add", "name", BRIDGE, "type", "bridge", "stp_state", "0", ns=self.switch)
        _ip("link", "set", "dev", BRIDGE, "up", ns=self.switch)
        for host in HOSTS:
            self._add_host(host)

    def _add_host(self, host: Host) -> None:
        ns = self.namespace(host.name)
        _ip("netns", "add", ns)
        self._disable_ipv6(ns)
        _ip("link", "set", "dev", "lo", "up", ns=ns)
        peer = ("peer", "name", HOST_IFACE, "address", host.mac, "netns", ns)
        _ip("link", "add", "name", host.name, "type", "veth", *peer, ns=self.switch)
        _ip("link", "set", "dev", host.name, "master", BRIDGE, "up", ns=self.switch)
        _ip("addr", "add", host.interface, "dev", HOST_IFACE, ns=ns)
        _ip("link", "set", "dev", HOST_IFACE, "up", ns=ns)

    @staticmethod
    def _disable_ipv6(ns: str) -> None:
        _run(["ip", "netns", "exec", ns, "sh", "-c", _DISABLE_IPV6])

    def _has_address(self, host: Host) -> bool:
        try:
            links = _ip_json("addr", "show", "dev", HOST_IFACE, ns=self.namespace(host.name))
        except LabError:
            return False
        return any(
            info.get("local") == host.address
            for link in links
            for info in link.get("addr_info", [])
        )

    # processes

    def run(self, host: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host``'s namespace; ``popen_kwargs`` go to Popen.

        ``ip netns exec`` execs the command in place, so the Popen's pid is the
        command's own and signals sent to it reach the command.
        """
        ns = self._present_namespace(host)
        if not argv:
            raise LabError("no command to run", EXIT_USAGE)
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen_kwargs)

    def pids(self, host: str) -> list[int]:
        """The processes running inside ``host``."""
        return _netns_pids(self.namespace(host))

    def kill(self, host: str, sig: signal.Signals = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to every process inside ``host``; the pids signalled.

        With SIGKILL, return only once they are gone (or after 5 s).
        """
        return _kill_namespace(self._present_namespace(host), sig)

    # partitions

    def partition(self, host: str, peers: Iterable[str] | None = None) -> None:
        """Cut ``host`` off from ``peers`` (default: every other host), both ways."""
        pairs = self._pairs(host, peers)
        if not pairs:
            return
        self._ensure_partition_table()
        _nft(self.switch, "add", "element", *self._cut_set, _elements(pairs))

    def heal(self, host: str | None = None, peers: Iterable[str] | None = None) -> None:
        """Undo partitions of ``host`` from ``peers`` (default: all); no host: all."""
        cut = self.cuts()
        pairs = cut if host is None else self._pairs(host, peers) & cut
        if pairs:
            _nft(self.switch, "delete", "element", *self._cut_set, _elements(pairs))

    def cuts(self) -> set[tuple[str, str]]:
        """The (from, to) host pairs whose frames the switch drops now."""
        self._present_namespace(None)
        if shutil.which("nft") is None:
            return set()
        tables = json.loads(_nft(self.switch, "-j", "list", "tables", "bridge"))
        if not any(
            item.get("table", {}).get("name") == PARTITION_TABLE
            for item in tables.get("nftables", [])
        ):
            return set()
        return _parse_cut_set(json.loads(_nft(self.switch, "-j", "list", "set", *self._cut_set)))

    def cut_from(self, host: str) -> list[str]:
        """The hosts that ``host`` cannot reach (either direction cut)."""
        return _cut_from(self.host(host).name, self.cuts())

    def _pairs(self, host: str, peers: Iterable[str] | None) -> set[tuple[str, str]]:
        name = self.host(host).name
        others = [self.host(p).name for p in peers] if peers is not None else list(HOST_NAMES)
        pairs: set[tuple[str, str]] = set()
        for peer in others:
            if peer != name:
                pairs |= {(name, peer), (peer, name)}
        return pairs

    @property
    def _cut_set(self) -> tuple[str, str, str]:
        return ("bridge", PARTITION_TABLE, "cut")

    def _ensure_partition_table(self) -> None:
        try:
            _nft(self.switch, "list", "table", "bridge", PARTITION_TABLE)
        except LabError:
            _nft(self.switch, "-f", "-", stdin=_PARTITION_RULES)

    def _present_namespace(self, host: str | None) -> str:
        """The namespace of ``host`` (the switch's if None); LabError if the lab is down."""
        ns = self.switch if host is None else self.namespace(host)
        if not os.path.exists(os.path.join(_NETNS_DIR, ns)):
            raise LabError(f"the lab is not up ({ns} missing): run `{self.command('up')}`")
        return ns

    # status

    def status(self) -> LabStatus:
        """Hosts, addresses, MACs, partitions and processes, as they are now."""
        _preflight()
        present = namespaces()
        cuts = self.cuts() if self.switch in present else set()
        hosts = [self._host_status(h, present, cuts) for h in HOSTS]
        return LabStatus(
            prefix=self.prefix,
            up=self.is_up(),
            switch=self.switch,
            bridge=BRIDGE,
            subnet=str(SUBNET),
            vip=VIP,
            hosts=hosts,
        )

    def _host_status(self, host: Host, present: set[str], cuts: set[tuple[str, str]]) -> HostStatus:
        ns = self.namespace(host.name)
        status = HostStatus(host.name, ns, host.address, None, ns in present)
        if not status.present:
            return status
        with contextlib.suppress(LabError):
            links = _ip_json("link", "show", "dev", HOST_IFACE, ns=ns)
            status.mac = str(links[0]["address"]) if links else None
        status.cut_from = _cut_from(host.name, cuts)
        status.processes = [ProcessInfo(pid, _command_line(pid)) for pid in _netns_pids(ns)]
        return status


def _preflight() -> None:
    """Root and ``ip`` with netns support, or a clear LabError."""
    require_root()
    require_tool("ip")


def _cut_from(host: str, cuts: set[tuple[str, str]]) -> list[str]:
    """The hosts ``host`` cannot reach, given the cut (from, to) pairs."""
    return [p for p in HOST_NAMES if p != host and ((host, p) in cuts or (p, host) in cuts)]


def _elements(pairs: Iterable[tuple[str, str]]) -> str:
    """An nft set literal of (in port, out port) pairs."""
    return "{ " + ", ".join(f'"{a}" . "{b}"' for a, b in sorted(pairs)) + " }"


def _parse_cut_set(listing: dict[str, Any]) -> set[tuple[str, str]]:
    """The pairs in ``nft -j list set`` output."""
    pairs: set[tuple[str, str]] = set()
    for item in listing.get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            if isinstance(elem, dict) and "elem" in elem:  # an element with options
                elem = elem["elem"].get("val", elem["elem"])
            concat = elem.get("concat") if isinstance(elem, dict) else None
            if isinstance(concat, list) and len(concat) == 2:
                pairs.add((str(concat[0]), str(concat[1])))
    return pairs


def _kill_namespace(ns: str, sig: signal.Signals) -> list[int]:
    """Signal every process in ``ns``; with SIGKILL, also wait for them to go."""
    signalled: list[int] = []
    deadline = time.monotonic() + _KILL_WAIT
    while pids := [p for p in _netns_pids(ns) if p != os.getpid()]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        signalled += [p for p in pids if p not in signalled]
        if sig != signal.SIGKILL or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # SIGKILL: wait, and catch anything forked meanwhile
    return signalled


def lab_process(
    host: str, argv: Sequence[str], *, prefix: str = DEFAULT_PREFIX, **popen_kwargs: Any
) -> subprocess.Popen[Any]:
    """Start ``argv`` inside ``host`` of the lab ``prefix`` (see ``Lab.run``)."""
    return Lab(prefix).run(host, argv, **popen_kwargs)


# -- the command -----------------------------------------------------------------


def add_lab_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``ftproxy lab``'s actions to ``parser`` (the ``lab`` subcommand's parser)."""
    parser.description = parser.description or (
        f"Hosts {', '.join(f'{h.name} {h.address}' for h in HOSTS)} in network "
        f"namespaces on one bridge; {VIP} is the replicas' virtual IP (no kernel owns "
        "it). Needs root."
    )
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help="name prefix of the lab's namespaces (default: %(default)s; tests use others)",
    )
    actions = parser.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    host_help = f"one of: {', '.join(HOST_NAMES)}"

    up = actions.add_parser("up", help="create the lab (nothing to do if it is up)")
    up.add_argument("--force", action="store_true", help="tear down any existing lab first")
    actions.add_parser("down", help="kill the lab's processes and delete the lab")

    run = actions.add_parser(
        "run",
        usage="ftproxy lab run HOST -- COMMAND [ARGS...]",
        help="run a command inside a host (stdio inherited, its exit code returned)",
    )
    run.add_argument("host", metavar="HOST", help=host_help)
    run.add_argument("command_argv", nargs=argparse.REMAINDER, metavar="COMMAND")

    kill = actions.add_parser("kill", help="signal every process inside a host")
    kill.add_argument("host", metavar="HOST", help=host_help)
    kill.add_argument("--signal", default="KILL", metavar="NAME", help="default: KILL")

    partition = actions.add_parser("partition", help="cut a host off the switch")
    partition.add_argument("host", metavar="HOST", help=host_help)
    partition.add_argument(
        "--from",
        dest="peers",
        action="append",
        metavar="PEER",
        help="cut only the link to PEER (repeatable; default: every other host)",
    )

    heal = actions.add_parser("heal", help="undo partitions (of HOST, or all)")
    heal.add_argument("host", nargs="?", metavar="HOST", help=host_help)
    heal.add_argument(
        "--from",
        dest="peers",
        action="append",
        metavar="PEER",
        help="heal only the link to PEER (repeatable)",
    )

    status = actions.add_parser("status", help="hosts, addresses, MACs, partitions, processes")
    status.add_argument("--json", action="store_true", help="print JSON")


def run_lab(args: argparse.Namespace) -> int:
    """Carry out ``ftproxy lab ACTION``; the exit code. Errors are one line on stderr.

    For ``run``, the command is ``args.guest`` (everything after the first ``--``,
    as ``ftproxy.cli.main`` splits it) or else the words after HOST.
    """
    try:
        lab = Lab(args.prefix)
        handler = _HANDLERS[args.lab_command]
        return handler(lab, args)
    except LabError as exc:
        message = str(exc)
        if not message.startswith("ftproxy lab "):
            message = f"ftproxy lab: {message}"
        print(message, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ftproxy lab: interrupted", file=sys.stderr)
        return 130


def _cmd_up(lab: Lab, args: argparse.Namespace) -> int:
    built = lab.up(force=args.force)
    state = "up" if built else "already up"
    print(f"lab {lab.prefix} {state}: {len(HOSTS)} hosts on {SUBNET}, VIP {VIP} reserved")
    _print_status(lab.status())
    return EXIT_OK


def _cmd_down(lab: Lab, args: argparse.Namespace) -> int:
    removed = lab.down()
    print(f"lab {lab.prefix} down" if removed else f"lab {lab.prefix} was not up")
    return EXIT_OK


def _cmd_run(lab: Lab, args: argparse.Namespace) -> int:
    _preflight()
    argv = list(getattr(args, "guest", None) or args.command_argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise LabError("usage: ftproxy lab run HOST -- COMMAND [ARGS...]", EXIT_USAGE)
    proc = lab.run(args.host, argv)
    return _wait_forwarding_signals(proc)


def _wait_forwarding_signals(proc: subprocess.Popen[Any]) -> int:
    """Wait for ``proc``, passing on SIGTERM/SIGHUP; Ctrl-C already reaches it."""

    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    handlers: dict[signal.Signals, Callable[[int, FrameType | None], Any] | signal.Handlers] = {
        signal.SIGTERM: forward,
        signal.SIGHUP: forward,
        signal.SIGINT: signal.SIG_IGN,  # the terminal sends Ctrl-C to the command too
    }
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code if code >= 0 else 128 - code


def _cmd_kill(lab: Lab, args: argparse.Namespace) -> int:
    _preflight()
    sig = _parse_signal(args.signal)
    pids = lab.kill(args.host, sig)
    what = ", ".join(map(str, pids)) if pids else "nothing was running"
    print(f"{args.host}: {sig.name} sent ({what})")
    return EXIT_OK


def _parse_signal(name: str) -> signal.Signals:
    key = name.upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        return signal.Signals[key] if not name.isdigit() else signal.Signals(int(name))
    except (KeyError, ValueError):
        raise LabError(f"unknown signal {name!r}", EXIT_USAGE) from None


def _cmd_partition(lab: Lab, args: argparse.Namespace) -> int:
    _preflight()
    lab.partition(args.host, args.peers)
    print(f"{args.host}: cut from {', '.join(lab.cut_from(args.host)) or 'nothing'}")
    return EXIT_OK


def _cmd_heal(lab: Lab, args: argparse.Namespace) -> int:
    _preflight()
    if args.host is None and args.peers:
        raise LabError("--from needs a HOST", EXIT_USAGE)
    lab.heal(args.host, args.peers)
    if args.host is None:
        print("all partitions healed")
    else:
        print(f"{args.host}: cut from {', '.join(lab.cut_from(args.host)) or 'nothing'}")
    return EXIT_OK


def _cmd_status(lab: Lab, args: argparse.Namespace) -> int:
    status = lab.status()
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        _print_status(status)
    return EXIT_OK


def _print_status(status: LabStatus) -> None:
    """The status as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not any(h.present for h in status.hosts):
        console.print(f"lab {status.prefix} is not up ({Lab(status.prefix).command('up')})")
        return
    table = Table(
        title=f"lab {status.prefix}: namespaces {status.prefix}-HOST, {status.subnet} on "
        f"{status.bridge} in {status.switch}, VIP {status.vip} (reserved)",
        title_justify="left",
    )
    for column in ("host", "address", "MAC"):
        table.add_column(column, no_wrap=True)
    table.add_column("network", min_width=9)
    table.add_column("processes", min_width=14, overflow="fold")
    for host in status.hosts:
        table.add_row(
            host.name if host.present else f"[red]{host.name} (missing)[/]",
            host.address,
            host.mac or "-",
            _network_cell(host),
            "\n".join(f"{p.pid} {_shorten(p.command)}" for p in host.processes) or "-",
        )
    console.print(table)


def _network_cell(host: HostStatus) -> str:
    if not host.present or host.mac is None:
        return "[red]no link[/]" if host.present else "-"
    if host.partitioned:
        return "[red]partitioned[/]"
    if host.cut_from:
        return f"[yellow]cut from {', '.join(host.cut_from)}[/]"
    return "[green]connected[/]"


def _shorten(command: str, width: int = 60) -> str:
    return command if len(command) <= width else command[: width - 1] + "…"


_HANDLERS: Final = {
    "up": _cmd_up,
    "down": _cmd_down,
    "run": _cmd_run,
    "kill": _cmd_kill,
    "partition": _cmd_partition,
    "heal": _cmd_heal,
    "status": _cmd_status,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ftproxy.tools.lab ACTION ...``, the same as ``ftproxy lab ACTION ...``."""
    words = list(sys.argv[1:] if argv is None else argv)
    guest: list[str] = []
    if "--" in words:
        at = words.index("--")
        words, guest = words[:at], words[at + 1 :]
    parser = argparse.ArgumentParser(prog="ftproxy lab")
    add_lab_arguments(parser)
    args = parser.parse_args(words)
    args.guest = guest
    return run_lab(args)


if __name__ == "__main__":
    sys.exit(main())
