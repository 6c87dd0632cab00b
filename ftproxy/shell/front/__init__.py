"""Network fronts: how a supervisor connects its guest to the real network.

Socket mode (``ftproxy.shell.front.socket``): the supervisor terminates TCP and UDP on
real sockets, and a failover resets every client connection. Packet mode
(``ftproxy.shell.front.packet``): the guest runs its own TCP/IP stack for a virtual
IP and MAC, the supervisor moves Ethernet frames, and client connections
survive a failover. ``PacketConfig`` says which interface and address packet
mode uses; ``None`` means socket mode.
"""

from ftproxy.shell.front._network import (
    PacketConfig,
    check_interface,
    format_mac,
    mac_for_ip,
    parse_mac,
    parse_network,
)

__all__ = [
    "PacketConfig",
    "check_interface",
    "format_mac",
    "mac_for_ip",
    "parse_mac",
    "parse_network",
]
