"""Reading a log the way a person would: a listing with one line per record, and totals.

``describe_log`` yields the listing, ``log_summary`` the totals as a JSON-ready
dict. Both decode entry replies (marshal bodies of the guest pipe, see
``ftproxy.guest.protocol``) and never fail on one that does not decode: the
listing shows ``<undecodable reply: ...>`` for it and the totals count it.

In packet mode (a header with a ``network``) the guest runs its own TCP/IP
stack and only Ethernet frames cross its pipe: EV_FRAME events in, OP_FRAME
outputs out. The listing gives each frame a line of its own, decoded with the
guest stack's parsers (``ftproxy.netstack.packets``): ARP, IPv4 with TCP, UDP
or ICMP, a bad checksum noted rather than the frame hidden.

The log keeps an exit's kind and result but not its request arguments, so the
socket a BIND, LISTEN or CONNECT was about is not recorded. ``map_guest_sockets``
infers it from the sockets that later events and outputs name; the listing
shows ``#?`` where it cannot tell (a failed bind or connect, a socket never used).
"""

from __future__ import annotations

import errno
import shlex
import signal
import socket
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

from ftproxy.core.records import End, Entry, Network, Output, Record
from ftproxy.guest import protocol
from ftproxy.log.file import LogContents, encoded_size
from ftproxy.netstack import packets

Address = tuple[Any, ...]
_Parsed = TypeVar("_Parsed")

OUTPUT_INDENT: Final = "      "
_REPR_LIMIT: Final = 60
_RESOLVE_SHOWN: Final = 3

# Roles of a guest socket, from the exits that set it up.
ROLE_BOUND: Final = "bound"
ROLE_LISTENER: Final = "listener"
ROLE_STREAM: Final = "stream"


# -- decoding replies ---------------------------------------------------------


class UndecodableReply(Exception):
    """An entry's reply is not a marshal body of the shape its exit kind promises."""


@dataclass(frozen=True)
class Reply:
    """A decoded entry reply: the guest's clocks at the exit and the exit's result."""

    wall_ns: int
    mono_ns: int
    result: Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_address(value: Any) -> bool:
    return (
        isinstance(value, tuple | list)
        and len(value) in (2, 4)
        and isinstance(value[0], str)
        and all(_is_int(part) for part in value[1:])
    )


def _is_optional_address(value: Any) -> bool:
    return value is None or _is_address(value)


def _is_bytes(value: Any) -> bool:
    return isinstance(value, bytes)


# Each event's fields after its code, as checks.
_EVENT_FIELDS: Final[dict[int, tuple[Callable[[Any], bool], ...]]] = {
    protocol.EV_ACCEPT: (_is_int, _is_int, _is_address, _is_address),
    protocol.EV_DATA: (_is_int, _is_bytes),
    protocol.EV_EOF: (_is_int,),
    protocol.EV_RESET: (_is_int, _is_int),
    protocol.EV_SENT: (_is_int, _is_int),
    protocol.EV_DGRAM: (_is_int, _is_bytes, _is_address),
    protocol.EV_SIGNAL: (_is_int,),
    protocol.EV_FRAME: (_is_bytes,),
}


def _is_event(value: Any) -> bool:
    if not isinstance(value, tuple | list) or not value or value[0] not in _EVENT_FIELDS:
        return False
    checks = _EVENT_FIELDS[value[0]]
    return len(value) == 1 + len(checks) and all(
        check(part) for check, part in zip(checks, value[1:], strict=True)
    )


def _is_wait_result(result: Any) -> bool:
    return isinstance(result, list | tuple) and all(_is_event(event) for event in result)


def _is_boot_network(value: Any) -> bool:
    """None (socket mode) or packet mode's ``(mac, ip, prefix_len, gateway)``."""
    return value is None or (
        isinstance(value, tuple | list)
        and len(value) == 4
        and isinstance(value[0], bytes)
        and len(value[0]) == 6
        and isinstance(value[1], str)
        and _is_int(value[2])
        and (value[3] is None or isinstance(value[3], str))
    )


def _is_boot_result(result: Any) -> bool:
    # (seed, pid, exit_every, clock_step_ns, hostname, network) now; logs recorded
    # before packet mode end at the hostname, older ones at clock_step_ns.
    return (
        isinstance(result, tuple | list)
        and len(result) >= 4
        and all(_is_int(part) for part in result[1:4])
        and (len(result) < 6 or _is_boot_network(result[5]))
    )


def _is_bind_result(result: Any) -> bool:
    return (
        isinstance(result, tuple | list)
        and len(result) == 2
        and _is_int(result[0])
        and _is_optional_address(result[1])
    )


def _is_connect_result(result: Any) -> bool:
    return (
        isinstance(result, tuple | list)
        and len(result) == 3
        and _is_int(result[0])
        and _is_optional_address(result[1])
        and _is_optional_address(result[2])
    )


def _is_resolve_result(result: Any) -> bool:
    return isinstance(result, tuple | list) and len(result) == 2 and _is_int(result[0])


_RESULT_CHECKS: Final[dict[int, Callable[[Any], bool]]] = {
    protocol.KIND_BOOT: _is_boot_result,
    protocol.KIND_WAIT: _is_wait_result,
    protocol.KIND_BIND: _is_bind_result,
    protocol.KIND_LISTEN: _is_int,
    protocol.KIND_CONNECT: _is_connect_result,
    protocol.KIND_RESOLVE: _is_resolve_result,
}


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def kind_name(kind: int) -> str:
    """The name of an exit kind (``kind7`` for one the protocol does not define)."""
    return protocol.KIND_NAMES.get(kind, f"kind{kind}")


def decode_reply(entry: Entry, clock: protocol.GuestClock) -> Reply:
    """Decode ``entry.reply`` and check that its result fits the entry's kind.

    ``clock`` is the guest's clock as the replies before this one set it; the
    reply's clock deltas are applied to it (as soon as they decode, so that one
    bad result does not shift the times of the replies after it), and the
    Reply has the absolute times. A wait's result comes as a list of event
    tuples, its data chunks unpacked (``protocol.wait_events``).

    Raise UndecodableReply when it does not, so that callers can trust the shape
    of what they get (events are tuples of the documented arity and types).
    """
    try:
        value = protocol.decode_body(entry.reply)
    except protocol.ProtocolError as exc:
        raise UndecodableReply(str(exc)) from None
    try:
        mono_gain, wall_shift, result = protocol.split_reply(value)
    except protocol.ProtocolError:
        raise UndecodableReply(
            f"not a (mono_gain, result[, wall_shift]) reply: {_short_repr(value)}"
        ) from None
    clock.apply(entry.icount, mono_gain, wall_shift)
    if entry.kind == protocol.KIND_WAIT:
        try:
            result = protocol.wait_events(result)
        except protocol.ProtocolError as exc:
            raise UndecodableReply(f"not a wait result ({exc}): {_short_repr(result)}") from None
    check = _RESULT_CHECKS.get(entry.kind)
    if check is not None and not check(result):
        raise UndecodableReply(f"not a {kind_name(entry.kind)} result: {_short_repr(result)}")
    return Reply(clock.wall_at(entry.icount), clock.mono_ns, result)


def decode_replies(records: Sequence[Record], clock_step_ns: int) -> dict[int, Reply]:
    """The replies of all entries that decode, by the entry's index in ``records``.

    Replies carry clock deltas: times are exact from the start of a log, and
    after an undecodable reply they miss what its deltas would have added.
    """
    clock = protocol.GuestClock(clock_step_ns)
    replies: dict[int, Reply] = {}
    for index, record in enumerate(records):
        if isinstance(record, Entry):
            try:
                replies[index] = decode_reply(record, clock)
            except UndecodableReply:
                continue
    return replies


# -- which guest socket an exit was about -------------------------------------


@dataclass
class GuestSocket:
    """A socket the guest set up with exits, as far as the log shows it."""

    role: str  # ROLE_BOUND, ROLE_LISTENER or ROLE_STREAM
    opened_at: int  # index in the records of the exit that created it
    local: Address | None = None
    peer: Address | None = None
    sock: int | None = None  # its wire id, when the log lets us tell
    entry_indexes: list[int] = field(default_factory=list)  # of its set-up exits


class SocketMap:
    """Guest sockets and the entries that set them up."""

    def __init__(self, sockets: list[GuestSocket]) -> None:
        self.sockets = sockets
        self.by_sock = {s.sock: s for s in sockets if s.sock is not None}
        # An entry's index in the records -> the wire id of the socket it set up.
        self.sock_of_entry = {
            index: s.sock for s in sockets if s.sock is not None for index in s.entry_indexes
        }

    def find(self, sock: int) -> GuestSocket | None:
        """The set-up of the guest socket with wire id ``sock``, if known."""
        return self.by_sock.get(sock)


# How later records use a socket, which says which set-up it can have had.
_USE_ANY: Final = "any"
_USE_LISTENER: Final = "listener"
_USE_STREAM: Final = "stream"
_USE_DATAGRAM: Final = "datagram"

_EVENT_USE: Final = {
    protocol.EV_DATA: _USE_STREAM,
    protocol.EV_EOF: _USE_STREAM,
    protocol.EV_RESET: _USE_STREAM,
    protocol.EV_SENT: _USE_STREAM,
    protocol.EV_DGRAM: _USE_DATAGRAM,
}
_OUTPUT_USE: Final = {
    protocol.OP_SEND: _USE_STREAM,
    protocol.OP_SHUTDOWN: _USE_STREAM,
    protocol.OP_SENDTO: _USE_DATAGRAM,
    protocol.OP_CLOSE: _USE_ANY,
}
_ROLES_FOR_USE: Final = {
    _USE_ANY: {ROLE_BOUND, ROLE_LISTENER, ROLE_STREAM},
    _USE_LISTENER: {ROLE_LISTENER},
    _USE_STREAM: {ROLE_STREAM},
    _USE_DATAGRAM: {ROLE_BOUND},
}


def _is_guest_created(sock: int) -> bool:
    return protocol.FIRST_GUEST_SOCK <= sock < protocol.FIRST_ACCEPTED_SOCK


def _socket_uses(record: Record, reply: Reply | None) -> Iterator[tuple[int, str]]:
    """The sockets ``record`` names, each with how it uses it."""
    if isinstance(record, Output):
        yield record.sock, _OUTPUT_USE.get(record.op, _USE_ANY)
    elif isinstance(record, Entry) and record.kind == protocol.KIND_WAIT and reply is not None:
        for event in reply.result:
            if event[0] == protocol.EV_ACCEPT:
                yield event[1], _USE_LISTENER
            elif event[0] in _EVENT_USE:
                yield event[1], _EVENT_USE[event[0]]


def _first_uses(records: Sequence[Record], replies: dict[int, Reply]) -> dict[int, tuple[int, str]]:
    """For each guest-created socket named in the log: (index of first mention, its use)."""
    first: dict[int, tuple[int, str]] = {}
    for index, record in enumerate(records):
        for sock, use in _socket_uses(record, replies.get(index)):
            if not _is_guest_created(sock):
                continue
            known = first.get(sock)
            if known is None:
                first[sock] = (index, use)
            elif known[1] == _USE_ANY and use != _USE_ANY:
                first[sock] = (known[0], use)
    return first


def _same_local_address(bound: Address | None, local: Address | None) -> bool:
    if bound is None or local is None or bound[1] != local[1] or bound[1] == 0:
        return False
    return bool(bound[0] == local[0] or bound[0] in ("0.0.0.0", "::"))


class _SetUps:
    """The guest sockets that exits set up, collected in log order."""

    def __init__(self) -> None:
        self.sockets: list[GuestSocket] = []
        self._bound_only: list[GuestSocket] = []  # bound, neither listening nor connected

    def bind(self, index: int, local: Address) -> None:
        guest_socket = GuestSocket(ROLE_BOUND, index, local=local, entry_indexes=[index])
        self.sockets.append(guest_socket)
        self._bound_only.append(guest_socket)

    def listen(self, index: int, ok: bool) -> None:
        # listen() follows the bind of its socket (it binds first when needed).
        if not self._bound_only:
            return
        bound = self._bound_only[-1]
        bound.entry_indexes.append(index)
        if ok:
            bound.role = ROLE_LISTENER
            self._bound_only.pop()

    def connect(self, index: int, local: Address, peer: Address) -> None:
        # A socket bound before it connects keeps its port.
        bound = next((s for s in self._bound_only if _same_local_address(s.local, local)), None)
        if bound is None:
            bound = GuestSocket(ROLE_STREAM, index)
            self.sockets.append(bound)
        else:
            self._bound_only.remove(bound)
        bound.role, bound.local, bound.peer = ROLE_STREAM, local, peer
        bound.entry_indexes.append(index)


def _set_up_sockets(records: Sequence[Record], replies: dict[int, Reply]) -> list[GuestSocket]:
    """The sockets that successful BIND and CONNECT exits created, in log order."""
    set_ups = _SetUps()
    for index, record in enumerate(records):
        if not isinstance(record, Entry) or index not in replies:
            continue
        result = replies[index].result
        if record.kind == protocol.KIND_BIND and result[0] == 0:
            set_ups.bind(index, result[1])
        elif record.kind == protocol.KIND_LISTEN:
            set_ups.listen(index, ok=result == 0)
        elif record.kind == protocol.KIND_CONNECT and result[0] == 0:
            set_ups.connect(index, result[1], result[2])
    return set_ups.sockets


def _claim_wire_ids(sockets: list[GuestSocket], first_uses: dict[int, tuple[int, str]]) -> None:
    """Give each socket the lowest unclaimed id first used after its set-up, in a fitting way.

    Sockets come in log order, so an id first used before one socket's set-up
    is also used before every later one's: it can be dropped for good.
    """
    unclaimed: dict[str, deque[tuple[int, int]]] = defaultdict(deque)
    for sock, (index, use) in sorted(first_uses.items()):
        unclaimed[use].append((sock, index))
    for guest_socket in sockets:
        heads: list[tuple[int, str]] = []
        for use, queue in unclaimed.items():
            if guest_socket.role not in _ROLES_FOR_USE[use]:
                continue
            while queue and queue[0][1] <= guest_socket.opened_at:
                queue.popleft()
            if queue:
                heads.append((queue[0][0], use))
        if heads:
            sock, use = min(heads)
            unclaimed[use].popleft()
            guest_socket.sock = sock


def map_guest_sockets(records: Sequence[Record], replies: dict[int, Reply]) -> SocketMap:
    """Infer which guest socket each successful BIND, LISTEN and CONNECT was about.

    ``replies`` are the decoded replies by record index (``decode_replies``).
    The guest numbers sockets in creation order and programs mostly set sockets
    up in that order too, so each set-up takes the lowest unclaimed wire id that
    the log first mentions after it, in a way that fits (a listener is named by
    accepts, a connected socket by stream traffic, a bound one by datagrams).
    Failed exits, and sockets never mentioned again, stay unattributed.
    """
    sockets = _set_up_sockets(records, replies)
    _claim_wire_ids(sockets, _first_uses(records, replies))
    return SocketMap(sockets)


# -- formatting pieces --------------------------------------------------------

_BYTE_ESCAPES: Final = {
    ord("\r"): "\\r",
    ord("\n"): "\\n",
    ord("\t"): "\\t",
    ord("\\"): "\\\\",
    ord('"'): '\\"',
}


def preview_bytes(data: bytes, limit: int) -> str:
    """``data``'s first ``limit`` bytes, quoted, printable ASCII kept and the rest escaped."""
    text = "".join(
        _BYTE_ESCAPES.get(byte) or (chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}")
        for byte in data[:limit]
    )
    return f'"{text}"' + ("..." if len(data) > limit else "")


def _sized_data(data: bytes, limit: int) -> str:
    size = f"{len(data)}B"
    return f"{size} {preview_bytes(data, limit)}" if limit > 0 and data else size


def format_address(address: Any) -> str:
    """``host:port``, ``[host]:port`` for IPv6, ``-`` for none."""
    if not _is_address(address):
        return "-" if address is None else _short_repr(address)
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_duration(ns: int) -> str:
    """A duration in the largest unit that keeps it readable: ``850ns``, ``1.2ms``, ``3.40s``."""
    size = abs(ns)
    if size < 1_000:
        return f"{ns}ns"
    if size < 1_000_000:
        return f"{ns / 1e3:.1f}us"
    if size < 1_000_000_000:
        return f"{ns / 1e6:.1f}ms"
    return f"{ns / 1e9:.2f}s"


def format_iso_utc(ns: int) -> str:
    """Nanoseconds since the epoch as ISO 8601 UTC, to the microsecond."""
    try:
        seconds = datetime.fromtimestamp(ns // 1_000_000_000, UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ns} ns since the epoch"
    moment = seconds + timedelta(microseconds=(ns % 1_000_000_000) // 1_000)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, f"errno {code}")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _sock_label(sock: int | None) -> str:
    return "#?" if sock is None else f"#{sock}"


_SHUTDOWN_NAMES: Final = {
    socket.SHUT_RD: "SHUT_RD",
    socket.SHUT_WR: "SHUT_WR",
    socket.SHUT_RDWR: "SHUT_RDWR",
}

_GAI_ERROR_NAMES: Final = {
    getattr(socket, name): name for name in dir(socket) if name.startswith("EAI_")
}


# -- Ethernet frames (packet mode) --------------------------------------------

_ETHERTYPE_NAMES: Final = {0x86DD: "IPv6", 0x8100: "802.1Q", 0x88CC: "LLDP"}
# TCP flag letters in scapy's order, as Wireshark users see them in ``[SA]``.
_TCP_FLAG_LETTERS: Final = (
    (packets.TCP_FIN, "F"),
    (packets.TCP_SYN, "S"),
    (packets.TCP_RST, "R"),
    (packets.TCP_PSH, "P"),
    (packets.TCP_ACK, "A"),
    (packets.TCP_URG, "U"),
)
_ICMP_TYPE_NAMES: Final = {
    packets.ICMP_ECHO_REPLY: "echo reply",
    packets.ICMP_ECHO_REQUEST: "echo request",
    packets.ICMP_DEST_UNREACH: "unreachable",
    11: "time exceeded",
}
_ICMP_UNREACHABLE_NAMES: Final = {0: "net", 1: "host", 2: "protocol", 3: "port", 4: "frag-needed"}


@dataclass(frozen=True)
class DecodedFrame:
    """The layers of an Ethernet frame, as the guest stack's parsers read them.

    A layer is None when the frame does not carry it or it is malformed; one whose
    only fault is its checksum is decoded anyway and named in ``bad_checksums``
    (the guest stack drops such a frame).
    """

    size: int
    ethernet: packets.EthernetHeader | None
    arp: packets.ArpPacket | None = None
    ipv4: packets.Ipv4Header | None = None
    tcp: packets.TcpSegment | None = None
    udp: packets.UdpDatagram | None = None
    icmp: packets.IcmpEcho | None = None
    bad_checksums: tuple[str, ...] = ()

    @property
    def payload(self) -> bytes:
        """The TCP or UDP payload (empty for anything else)."""
        if self.tcp is not None:
            return self.tcp.payload
        return b"" if self.udp is None else self.udp.payload


def _with_checksum(data: bytes, offset: int, initial: int = 0) -> bytes:
    """``data`` with the Internet checksum at ``offset`` made right (``initial``: the
    pseudo-header's sum), so that a parser checking it reads the rest."""
    if len(data) < offset + 2:
        return data
    blank = data[:offset] + b"\x00\x00" + data[offset + 2 :]
    return data[:offset] + packets.checksum(blank, initial).to_bytes(2, "big") + data[offset + 2 :]


def _parse_noting_checksum(
    parse: Callable[[bytes], _Parsed | None],
    data: bytes,
    fix: Callable[[bytes], bytes],
    layer: str,
    bad: list[str],
) -> _Parsed | None:
    """``parse(data)``; if that fails, ``parse(fix(data))``, noting ``layer`` in ``bad``."""
    parsed = parse(data)
    if parsed is None:
        parsed = parse(fix(data))
        if parsed is not None:
            bad.append(layer)
    return parsed


def _fix_ipv4_checksum(packet: bytes) -> bytes:
    header_len = (packet[0] & 0x0F) * 4 if packet else 0
    return _with_checksum(packet[:header_len], 10) + packet[header_len:]


def decode_frame(frame: bytes) -> DecodedFrame:
    """Decode an Ethernet frame's ARP, IPv4, TCP, UDP or ICMP layers; never raises."""
    size = len(frame)
    ethernet = packets.parse_ethernet(frame)
    if ethernet is None:
        return DecodedFrame(size, None)
    body = bytes(frame[packets.ETH_HEADER_LEN :])
    if ethernet.ethertype == packets.ETHERTYPE_ARP:
        return DecodedFrame(size, ethernet, arp=packets.parse_arp(body))
    if ethernet.ethertype != packets.ETHERTYPE_IPV4:
        return DecodedFrame(size, ethernet)
    bad: list[str] = []
    ip = _parse_noting_checksum(packets.parse_ipv4, body, _fix_ipv4_checksum, "IP", bad)
    if ip is None or ip.is_fragment:
        return DecodedFrame(size, ethernet, ipv4=ip, bad_checksums=tuple(bad))
    segment = body[ip.header_len : ip.total_len]
    tcp = udp = icmp = None
    if ip.proto == packets.IPPROTO_TCP:
        pseudo = packets.pseudo_header_sum(ip.src, ip.dst, packets.IPPROTO_TCP, len(segment))
        tcp = _parse_noting_checksum(
            lambda data: packets.parse_tcp(data, ip.src, ip.dst),
            segment,
            lambda data: _with_checksum(data, 16, pseudo),
            "TCP",
            bad,
        )
    elif ip.proto == packets.IPPROTO_UDP:
        udp = _parse_noting_checksum(
            lambda data: packets.parse_udp(data, ip.src, ip.dst),
            segment,
            lambda data: data[:6] + b"\x00\x00" + data[8:],  # zero: "no checksum"
            "UDP",
            bad,
        )
    elif ip.proto == packets.IPPROTO_ICMP:
        icmp = _parse_noting_checksum(
            packets.parse_icmp_echo, segment, lambda data: _with_checksum(data, 2), "ICMP", bad
        )
    return DecodedFrame(size, ethernet, None, ip, tcp, udp, icmp, tuple(bad))


def _payload_text(data: bytes, data_preview: int) -> str:
    text = f"len={len(data)}"
    return f"{text} {preview_bytes(data, data_preview)}" if data_preview > 0 and data else text


def _describe_arp(arp: packets.ArpPacket | None) -> str:
    if arp is None:
        return "ARP <malformed>"
    sender, target = packets.int_to_ip(arp.sender_ip), packets.int_to_ip(arp.target_ip)
    if arp.op == packets.ARP_REQUEST:
        gratuitous = " (gratuitous)" if arp.sender_ip == arp.target_ip else ""
        return f"ARP who-has {target} tell {sender}{gratuitous}"
    if arp.op == packets.ARP_REPLY:
        return f"ARP {sender} is-at {packets.mac_to_str(arp.sender_mac)}"
    return f"ARP op={arp.op} {sender} > {target}"


def _describe_tcp(tcp: packets.TcpSegment, src: str, dst: str, data_preview: int) -> str:
    flags = "".join(letter for bit, letter in _TCP_FLAG_LETTERS if tcp.flags & bit)
    text = f"TCP {src}:{tcp.src_port} > {dst}:{tcp.dst_port} [{flags}] seq={tcp.seq}"
    if tcp.has_ack:
        text += f" ack={tcp.ack}"
    text += f" win={tcp.window}"
    if tcp.mss is not None:
        text += f" mss={tcp.mss}"
    if tcp.payload:
        text += f" {_payload_text(tcp.payload, data_preview)}"
    return text


def _describe_icmp(icmp: packets.IcmpEcho, src: str, dst: str) -> str:
    name = _ICMP_TYPE_NAMES.get(icmp.type, f"type={icmp.type} code={icmp.code}")
    if icmp.type in (packets.ICMP_ECHO_REQUEST, packets.ICMP_ECHO_REPLY):
        return f"ICMP {src} > {dst} {name} id={icmp.ident} seq={icmp.seq} len={len(icmp.payload)}"
    if icmp.type == packets.ICMP_DEST_UNREACH:
        name = f"{_ICMP_UNREACHABLE_NAMES.get(icmp.code, f'code={icmp.code}')} {name}"
    return f"ICMP {src} > {dst} {name}"


def _describe_ipv4(frame: DecodedFrame, data_preview: int) -> str:
    ip = frame.ipv4
    if ip is None:
        return "IPv4 <malformed>"
    src, dst = packets.int_to_ip(ip.src), packets.int_to_ip(ip.dst)
    if ip.is_fragment:
        offset = (ip.flags_fragment & packets.IP_OFFSET_MASK) * 8
        more = " more" if ip.flags_fragment & packets.IP_FLAG_MF else ""
        return f"IPv4 {src} > {dst} fragment proto={ip.proto} id={ip.ident} offset={offset}{more}"
    if ip.proto == packets.IPPROTO_TCP:
        if frame.tcp is None:
            return f"TCP {src} > {dst} <malformed>"
        return _describe_tcp(frame.tcp, src, dst, data_preview)
    if ip.proto == packets.IPPROTO_UDP:
        if frame.udp is None:
            return f"UDP {src} > {dst} <malformed>"
        udp = frame.udp
        text = _payload_text(udp.payload, data_preview)
        return f"UDP {src}:{udp.src_port} > {dst}:{udp.dst_port} {text}"
    if ip.proto == packets.IPPROTO_ICMP:
        if frame.icmp is None:
            return f"ICMP {src} > {dst} <malformed>"
        return _describe_icmp(frame.icmp, src, dst)
    return f"IPv4 {src} > {dst} proto={ip.proto} len={ip.total_len - ip.header_len}"


def describe_frame(frame: bytes, data_preview: int = 32) -> str:
    """One Ethernet frame in a short line: its size and what it carries, e.g.
    ``74B TCP 10.0.0.1:41234 > 10.0.0.2:6380 [S] seq=1 win=65535 mss=1460``."""
    decoded = decode_frame(frame)
    ethernet = decoded.ethernet
    if ethernet is None:
        what = "<runt: no Ethernet header>"
    elif ethernet.ethertype == packets.ETHERTYPE_ARP:
        what = _describe_arp(decoded.arp)
    elif ethernet.ethertype == packets.ETHERTYPE_IPV4:
        what = _describe_ipv4(decoded, data_preview)
    else:
        name = _ETHERTYPE_NAMES.get(ethernet.ethertype)
        what = f"ethertype 0x{ethernet.ethertype:04x}" + (f" ({name})" if name else "")
    if decoded.bad_checksums:
        what += f" (bad checksum: {', '.join(decoded.bad_checksums)})"
    return f"{decoded.size}B {what}"


# -- one line per record ------------------------------------------------------


def describe_event(event: tuple[Any, ...], data_preview: int) -> str:
    """One event of a wait result, e.g. ``data #1073741824 14B "PING"``."""
    code = event[0]
    name = protocol.EVENT_NAMES.get(code, f"event{code}")
    if code == protocol.EV_ACCEPT:
        _, listener, conn, peer, _local = event
        return f"{name} #{conn} {format_address(peer)} on #{listener}"
    if code == protocol.EV_DATA:
        return f"{name} #{event[1]} {_sized_data(event[2], data_preview)}"
    if code == protocol.EV_RESET:
        return f"{name} #{event[1]} {_errno_name(event[2])}"
    if code == protocol.EV_SENT:
        return f"{name} #{event[1]} total={event[2]}B"
    if code == protocol.EV_DGRAM:
        _, sock, data, sender = event
        size, _, text = _sized_data(data, data_preview).partition(" ")
        return f"{name} #{sock} {size} from {format_address(sender)} {text}".rstrip()
    if code == protocol.EV_SIGNAL:
        return f"{name} {_signal_name(event[1])}"
    if code == protocol.EV_FRAME:
        return f"{name} in {describe_frame(event[1], data_preview)}"
    return f"{name} #{event[1]}"


def _describe_wait(result: Any, waited: str, data_preview: int) -> str:
    """The wait's line. Frames get lines of their own (``frame_lines``): here, a count."""
    frames = sum(1 for event in result if event[0] == protocol.EV_FRAME)
    parts = [f"{frames} frame{'' if frames == 1 else 's'}"] if frames else []
    parts += [
        describe_event(tuple(event), data_preview)
        for event in result
        if event[0] != protocol.EV_FRAME
    ]
    return f"wait{waited}: {'; '.join(parts) or 'no events'}"


def frame_lines(entry: Entry, reply: Reply, *, data_preview: int = 32) -> Iterator[str]:
    """The indented lines of the frames a wait received, one per frame, in order."""
    if entry.kind != protocol.KIND_WAIT:
        return
    for event in reply.result:
        if event[0] == protocol.EV_FRAME:
            yield f"{OUTPUT_INDENT}{describe_event(tuple(event), data_preview)}"


def format_network(network: Network) -> str:
    """``10.200.0.100/24 mac 02:00:0a:c8:00:64``, and the gateway when there is one."""
    gateway = "" if network.gateway is None else f" gateway {network.gateway}"
    return f"{network.ip}/{network.prefix_len} mac {packets.mac_to_str(network.mac)}{gateway}"


def _describe_boot(result: Any) -> str:
    _seed, pid, exit_every, clock_step_ns, *rest = result
    host = f" host={rest[0]}" if rest and isinstance(rest[0], str) else ""
    net = ""
    if len(rest) >= 2 and rest[1] is not None:
        mac, ip, prefix_len, gateway = rest[1]
        net = f" net={ip}/{prefix_len} mac={packets.mac_to_str(mac)}"
        net += "" if gateway is None else f" gw={gateway}"
    return f"boot pid={pid} exit_every={exit_every} step={clock_step_ns}ns{host}{net}"


def _describe_bind(result: Any, sock: int | None) -> str:
    code, address = result
    if code:
        return f"bind {_sock_label(sock)} {_errno_name(code)}"
    return f"bind {_sock_label(sock)} -> {format_address(address)}"


def _describe_listen(result: Any, sock: int | None) -> str:
    return f"listen {_sock_label(sock)} {_errno_name(result) if result else 'ok'}"


def _describe_connect(result: Any, sock: int | None) -> str:
    code, local, peer = result
    if code:
        # A failed connect's result carries no addresses.
        return f"connect {_sock_label(sock)} {_errno_name(code)}"
    return f"connect {_sock_label(sock)} -> {format_address(peer)} from {format_address(local)}"


def _is_addrinfo(value: Any) -> bool:
    return isinstance(value, tuple | list) and len(value) == 5


def _describe_resolve(result: Any) -> str:
    code, answer = result
    if code:
        name = _GAI_ERROR_NAMES.get(code, f"error {code}")
        return f"resolve failed: {name} {_short_repr(answer)}"
    if isinstance(answer, list):
        shown = [format_address(info[4]) for info in answer[:_RESOLVE_SHOWN] if _is_addrinfo(info)]
        more = f" (+{len(answer) - len(shown)} more)" if len(answer) > len(shown) else ""
        noun = "address" if len(answer) == 1 else "addresses"
        return f"resolve -> {len(answer)} {noun}: {', '.join(shown)}{more}"
    return f"resolve -> {_short_repr(answer)}"


def describe_entry_result(
    entry: Entry,
    reply: Reply,
    *,
    sock: int | None,
    previous_mono_ns: int | None,
    data_preview: int,
) -> str:
    """The summary column of an entry whose reply decoded."""
    result = reply.result
    if entry.kind == protocol.KIND_WAIT:
        waited = (
            ""
            if previous_mono_ns is None
            else f" +{format_duration(reply.mono_ns - previous_mono_ns)}"
        )
        return _describe_wait(result, waited, data_preview)
    if entry.kind == protocol.KIND_BOOT:
        return _describe_boot(result)
    if entry.kind == protocol.KIND_BIND:
        return _describe_bind(result, sock)
    if entry.kind == protocol.KIND_LISTEN:
        return _describe_listen(result, sock)
    if entry.kind == protocol.KIND_CONNECT:
        return _describe_connect(result, sock)
    if entry.kind == protocol.KIND_RESOLVE:
        return _describe_resolve(result)
    return f"{kind_name(entry.kind)}: {_short_repr(result)}"


def describe_output(output: Output, *, data_preview: int = 32) -> str:
    """An output's line: indented, after the seq of the entry it follows."""
    name = protocol.OP_NAMES.get(output.op, f"op{output.op}")
    what = f"{name} #{output.sock}"
    if output.op == protocol.OP_SEND:
        what += f" {_sized_data(output.data, data_preview)}"
    elif output.op == protocol.OP_SENDTO:
        size, _, text = _sized_data(output.data, data_preview).partition(" ")
        what = f"{what} {size} to {format_address(output.extra)} {text}".rstrip()
    elif output.op == protocol.OP_SHUTDOWN:
        what += f" {_SHUTDOWN_NAMES.get(output.extra, _short_repr(output.extra))}"
    elif output.op == protocol.OP_FRAME:
        what = f"{name} {describe_frame(output.data, data_preview)}"
    elif output.data:
        what += f" {_sized_data(output.data, data_preview)}"
    return f"{OUTPUT_INDENT}out after seq {output.seq}: {what}"


def describe_end(end: End) -> str:
    """The end record's line."""
    return f"end: {end.reason} returncode={end.returncode}"


@dataclass(frozen=True)
class _EntryColumns:
    """Column widths for the entry lines, wide enough for every entry of the log."""

    seq: int
    icount: int
    kind: int
    size: int

    @classmethod
    def fit(cls, records: Sequence[Record]) -> _EntryColumns:
        entries = [r for r in records if isinstance(r, Entry)]
        return cls(
            seq=max([len("seq"), *(len(str(e.seq)) for e in entries)]),
            icount=max([len("icount"), *(len(str(e.icount)) for e in entries)]),
            kind=max([len("kind"), *(len(kind_name(e.kind)) for e in entries)]),
            size=max([len("size"), *(len(str(len(e.reply))) for e in entries)]),
        )

    def line(self, seq: object, icount: object, kind: object, size: object, summary: str) -> str:
        return (
            f"{seq!s:>{self.seq}} {icount!s:>{self.icount}} {kind!s:<{self.kind}} "
            f"{size!s:>{self.size}}  {summary}"
        )


def _ending(contents: LogContents) -> str:
    end = next((r for r in reversed(contents.records) if isinstance(r, End)), None)
    if end is not None:
        return f"ended: {end.reason} returncode={end.returncode}"
    if contents.truncated_at is not None:
        return f"no end record: truncated at byte {contents.truncated_at}"
    return "no end record: the recorder stopped without writing one"


def describe_header(contents: LogContents) -> Iterator[str]:
    """The summary lines that open a listing."""
    header = contents.header
    outputs = sum(1 for _ in contents.outputs())
    yield f"ftproxy log, format version {header.version}"
    yield f"  argv:    {shlex.join(header.argv)}"
    yield f"  cwd:     {header.cwd}"
    yield f"  env:     {len(header.env)} variables"
    yield f"  python:  {header.python}"
    policy = header.policy
    yield f"  policy:  exit_every={policy.exit_every} clock_step={policy.clock_step_ns}ns"
    yield f"  created: {format_iso_utc(header.created_ns)}"
    if header.network is not None:
        yield f"  network: {format_network(header.network)} (packet mode)"
    yield f"  records: {contents.entries} entries, {outputs} outputs; {_ending(contents)}"


def describe_log(contents: LogContents, *, data_preview: int = 32) -> Iterator[str]:
    """Yield a human listing of a log: header summary lines, a column heading,
    then one line per record (entries in columns, outputs indented, the end).

    ``data_preview`` is how many bytes of each payload to show (0: sizes only).
    """
    replies = decode_replies(contents.records, contents.header.policy.clock_step_ns)
    sockets = map_guest_sockets(contents.records, replies)
    columns = _EntryColumns.fit(contents.records)
    yield from describe_header(contents)
    yield columns.line("seq", "icount", "kind", "size", "summary")
    previous_mono_ns: int | None = None
    for index, record in enumerate(contents.records):
        if isinstance(record, Entry):
            reply = replies.get(index)
            if reply is None:
                summary = f"<undecodable reply: {_undecodable_reason(record)}>"
            else:
                summary = describe_entry_result(
                    record,
                    reply,
                    sock=sockets.sock_of_entry.get(index),
                    previous_mono_ns=previous_mono_ns,
                    data_preview=data_preview,
                )
                previous_mono_ns = reply.mono_ns
            kind = kind_name(record.kind)
            yield columns.line(record.seq, record.icount, kind, len(record.reply), summary)
            if reply is not None:
                yield from frame_lines(record, reply, data_preview=data_preview)
        elif isinstance(record, Output):
            yield describe_output(record, data_preview=data_preview)
        elif isinstance(record, End):
            yield describe_end(record)


def _undecodable_reason(entry: Entry) -> str:
    try:
        decode_reply(entry, protocol.GuestClock(0))
    except UndecodableReply as exc:
        return str(exc)
    return "it decodes"  # not reached: only entries that failed to decode get here


# -- totals -------------------------------------------------------------------


def _count_entry(entry: Entry, reply: Reply | None, totals: Counter[str]) -> Counter[str]:
    """Count one entry's events and input bytes into ``totals``; return the event counts."""
    events: Counter[str] = Counter()
    if reply is None or entry.kind != protocol.KIND_WAIT:
        return events
    for event in reply.result:
        events[protocol.EVENT_NAMES.get(event[0], f"event{event[0]}")] += 1
        if event[0] in (protocol.EV_DATA, protocol.EV_DGRAM):
            totals["bytes_in"] += len(event[2])
        elif event[0] == protocol.EV_FRAME:
            totals["frames_in"] += 1
            totals["frame_bytes_in"] += len(event[1])
    return events


def _network_summary(network: Network | None) -> dict[str, object] | None:
    if network is None:
        return None
    return {
        "mac": packets.mac_to_str(network.mac),
        "ip": network.ip,
        "prefix_len": network.prefix_len,
        "gateway": network.gateway,
    }


def log_summary(contents: LogContents) -> dict[str, object]:
    """Totals of a log as a JSON-ready dict: counts per exit kind, event and output op,
    client input bytes (EV_DATA and EV_DGRAM payloads), output bytes (all but frames),
    frames and their bytes each way (packet mode), and sizes."""
    replies = decode_replies(contents.records, contents.header.policy.clock_step_ns)
    kinds: Counter[str] = Counter()
    events: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    end: End | None = None
    for index, record in enumerate(contents.records):
        if isinstance(record, Entry):
            kinds[kind_name(record.kind)] += 1
            totals["reply_bytes"] += len(record.reply)
            events += _count_entry(record, replies.get(index), totals)
        elif isinstance(record, Output):
            ops[protocol.OP_NAMES.get(record.op, f"op{record.op}")] += 1
            if record.op == protocol.OP_FRAME:
                totals["frames_out"] += 1
                totals["frame_bytes_out"] += len(record.data)
            else:
                totals["bytes_out"] += len(record.data)
        elif isinstance(record, End):
            end = record
    walls = [reply.wall_ns for reply in replies.values()]
    return {
        "format_version": contents.header.version,
        "argv": list(contents.header.argv),
        "created_ns": contents.header.created_ns,
        "network": _network_summary(contents.header.network),
        "entries": contents.entries,
        "outputs": sum(ops.values()),
        "ended": end is not None,
        "end_reason": None if end is None else end.reason,
        "returncode": None if end is None else end.returncode,
        "truncated": contents.truncated_at is not None,
        "truncated_at": contents.truncated_at,
        "entries_by_kind": dict(kinds),
        "events_by_type": dict(events),
        "outputs_by_op": dict(ops),
        "bytes_in": totals["bytes_in"],
        "bytes_out": totals["bytes_out"],
        "frames_in": totals["frames_in"],
        "frames_out": totals["frames_out"],
        "frame_bytes_in": totals["frame_bytes_in"],
        "frame_bytes_out": totals["frame_bytes_out"],
        "reply_bytes": totals["reply_bytes"],
        "undecodable_replies": contents.entries - len(replies),
        "wall_span_ns": max(walls) - min(walls) if walls else 0,
        "log_bytes": encoded_size(contents),
    }
