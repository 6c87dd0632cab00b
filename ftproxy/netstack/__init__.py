"""A deterministic user-space network stack for packet mode.

The replicated guest owns its TCP/IP stack so that client TCP connections
survive a failover: the supervisor moves raw Ethernet frames for a virtual IP
and MAC and logs every frame it hands in; the backup replays the same frames
into the same stack. Hence the stack is a pure, sans-I/O state machine:

    stack = NetStack(mac, "10.200.0.100", 24, random32=entropy)
    stack.receive_frame(frame, now_ns)       # each frame from the wire
    stack.on_time(now_ns)                    # fire due timers
    for frame in stack.take_frames(): ...    # transmit, in order
    stack.next_deadline()                    # when to call on_time next

    listener = stack.tcp_listen(80)          # listener.accept() -> TcpConnection | None
    conn = stack.tcp_connect("10.200.0.1", 80)
    conn.send(b"..."); conn.recv(4096)       # non-blocking; see TcpConnection
    udp = stack.udp_bind(53)                 # udp.sendto(...), udp.recvfrom()
    stack.take_changed()                     # endpoints whose readiness changed

Time is the caller's (virtual nanoseconds), randomness comes from ``random32``
only, and all state lives in containers ordered by the calls made: the same
inputs give byte-identical output frames.
"""

from ftproxy.netstack.arp import ArpConfig
from ftproxy.netstack.packets import build_gratuitous_arp, int_to_ip, ip_to_int
from ftproxy.netstack.stack import Endpoint, NetStack
from ftproxy.netstack.tcp import TcpConfig, TcpConnection, TcpListener, TcpState
from ftproxy.netstack.udp import UdpConfig, UdpSocket

__all__ = [
    "ArpConfig",
    "Endpoint",
    "NetStack",
    "TcpConfig",
    "TcpConnection",
    "TcpListener",
    "TcpState",
    "UdpConfig",
    "UdpSocket",
    "build_gratuitous_arp",
    "int_to_ip",
    "ip_to_int",
]
