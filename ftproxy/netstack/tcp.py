"""TCP (RFC 793/9293) connections and listeners, driven by the stack.

Sequence numbers are kept as unbounded *offsets* from the initial sequence
numbers (ours: ``iss``, theirs: ``irs``), so every comparison is a plain integer
comparison; a 32-bit wire number is unwrapped against the nearest current
offset (``snd_una`` for acknowledgements, ``rcv_nxt`` for sequence numbers).
The SYN sits at offset 0, the first data byte at 1, a FIN one past the last data
byte.

What is implemented: active and passive open (and simultaneous open), MSS
option (ours sent, theirs honoured, 536 without one), in-order delivery with
out-of-order segments held and reassembled, cumulative ACK of every segment
carrying data (no delayed ACK), retransmission on an RFC 6298 timer with Karn's
rule and exponential backoff, NewReno-style fast retransmit/recovery on three
duplicate ACKs with slow start and congestion avoidance, the peer's receive
window honoured with zero-window probes on a persist timer, our receive window
equal to the free space of a bounded receive buffer (never shrinking its right
edge, updates sent when the application frees enough), FIN both ways and
half-close, simultaneous close, RST sent and received, TIME-WAIT and the
orphaned FIN-WAIT-2 timeout in virtual time, listen backlog.

Not implemented: window scaling, SACK, timestamps (all unknown options are
ignored), urgent data, delayed ACK, Nagle, keep-alive, path-MTU discovery.
"""

from __future__ import annotations

import enum
import errno
import os
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ftproxy.netstack import packets

if TYPE_CHECKING:
    from ftproxy.netstack.host import EndpointHost

_M32: Final = 0xFFFFFFFF
_MS: Final = 1_000_000
_SECOND: Final = 1_000_000_000
DEFAULT_PEER_MSS: Final = 536
MAX_WINDOW: Final = 0xFFFF
RTO_GRANULARITY_NS: Final = _MS


@dataclass(frozen=True)
class TcpConfig:
    """TCP tunables; every time is in virtual nanoseconds."""

    send_buffer: int = 256 * 1024
    receive_buffer: int = MAX_WINDOW
    mss: int | None = None  # what we advertise; default: MTU - 40
    rto_initial_ns: int = _SECOND
    rto_min_ns: int = 200 * _MS
    rto_max_ns: int = 60 * _SECOND
    syn_retries: int = 6
    max_retries: int = 15
    time_wait_ns: int = 2 * _SECOND
    fin_wait2_timeout_ns: int = 60 * _SECOND
    initial_cwnd_segments: int = 10
    max_half_open: int = 256
    ephemeral_ports: tuple[int, int] = (49152, 65535)

    def __post_init__(self) -> None:
        if not 0 < self.receive_buffer <= MAX_WINDOW:
            raise ValueError("receive_buffer must be in 1..65535 (no window scaling)")
        if self.send_buffer <= 0:
            raise ValueError("send_buffer must be positive")
        if not 0 < self.rto_min_ns <= self.rto_initial_ns <= self.rto_max_ns:
            raise ValueError("need 0 < rto_min_ns <= rto_initial_ns <= rto_max_ns")
        lo, hi = self.ephemeral_ports
        if not 0 < lo <= hi <= 0xFFFF:
            raise ValueError("bad ephemeral port range")


class TcpState(enum.Enum):
    CLOSED = "CLOSED"
    LISTEN = "LISTEN"
    SYN_SENT = "SYN_SENT"
    SYN_RECEIVED = "SYN_RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN_WAIT_1"
    FIN_WAIT_2 = "FIN_WAIT_2"
    CLOSE_WAIT = "CLOSE_WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST_ACK"
    TIME_WAIT = "TIME_WAIT"


class TcpEvent(enum.Enum):
    """What moves a connection from one state to another (RFC 9293's figure 5)."""

    ACTIVE_OPEN = "active open"  # the application connects: SYN sent
    PASSIVE_OPEN = "passive open"  # a listener's SYN arrived: SYN-ACK sent
    SIMULTANEOUS_OPEN = "simultaneous open"  # a SYN without ACK answered our SYN
    HANDSHAKE_DONE = "handshake done"  # our SYN acknowledged (and theirs received)
    FIN_SENT = "FIN sent"  # the application shut down writing (FIN queued)
    FIN_RECEIVED = "FIN received"
    FIN_RECEIVED_OURS_ACKED = "FIN received after ours was acknowledged"
    FIN_ACKED = "our FIN acknowledged"
    ENDED = "ended"  # reset, timeout, abort, LAST-ACK or TIME-WAIT over: out of the stack


E = TcpEvent

# Every state change of a connection, in one place. Events not listed for a
# state are a bug of this module (RuntimeError), not the peer's doing: segments
# the peer may send in any state are filtered before they become events.
_TRANSITIONS: Final[dict[tuple[TcpState, TcpEvent], TcpState]] = {
    (TcpState.CLOSED, E.ACTIVE_OPEN): TcpState.SYN_SENT,
    (TcpState.CLOSED, E.PASSIVE_OPEN): TcpState.SYN_RECEIVED,
    (TcpState.SYN_SENT, E.SIMULTANEOUS_OPEN): TcpState.SYN_RECEIVED,
    (TcpState.SYN_SENT, E.HANDSHAKE_DONE): TcpState.ESTABLISHED,
    (TcpState.SYN_RECEIVED, E.HANDSHAKE_DONE): TcpState.ESTABLISHED,
    (TcpState.ESTABLISHED, E.FIN_SENT): TcpState.FIN_WAIT_1,
    (TcpState.CLOSE_WAIT, E.FIN_SENT): TcpState.LAST_ACK,
    (TcpState.ESTABLISHED, E.FIN_RECEIVED): TcpState.CLOSE_WAIT,
    (TcpState.FIN_WAIT_1, E.FIN_RECEIVED): TcpState.CLOSING,
    (TcpState.FIN_WAIT_1, E.FIN_RECEIVED_OURS_ACKED): TcpState.TIME_WAIT,
    (TcpState.FIN_WAIT_2, E.FIN_RECEIVED): TcpState.TIME_WAIT,
    (TcpState.FIN_WAIT_1, E.FIN_ACKED): TcpState.FIN_WAIT_2,
    (TcpState.CLOSING, E.FIN_ACKED): TcpState.TIME_WAIT,
    **{(state, E.ENDED): TcpState.CLOSED for state in TcpState},
}

_SENDING_STATES: Final = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.CLOSE_WAIT,
        TcpState.FIN_WAIT_1,
        TcpState.CLOSING,
        TcpState.LAST_ACK,
    }
)
_RECEIVING_STATES: Final = frozenset(
    {TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2}
)
_SYNCHRONIZED: Final = frozenset(
    {
        TcpState.SYN_RECEIVED,
        TcpState.ESTABLISHED,
        TcpState.FIN_WAIT_1,
        TcpState.FIN_WAIT_2,
        TcpState.CLOSE_WAIT,
        TcpState.CLOSING,
        TcpState.LAST_ACK,
        TcpState.TIME_WAIT,
    }
)


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _unwrap(wire: int, base: int, ref: int) -> int:
    """The offset (from ``base``) of 32-bit ``wire`` nearest to offset ``ref``."""
    delta = (wire - base - ref) & _M32
    if delta >= 0x80000000:
        delta -= 0x100000000
    return ref + delta


class TcpConnection:
    """One TCP connection; created by ``NetStack.tcp_connect`` or a listener.

    The application side is non-blocking and sans-I/O: ``send``/``recv`` only
    move bytes between the caller and the buffers, and queue whatever segments
    that allows on the stack (``NetStack.take_frames``). Time is the stack's
    latest ``now``.
    """

    def __init__(
        self,
        stack: EndpointHost,
        handle: int,
        remote_ip: int,
        remote_port: int,
        local_port: int,
        iss: int,
        listener: TcpListener | None,
    ) -> None:
        cfg = stack.tcp_config
        self._stack = stack
        self._cfg = cfg
        self.handle = handle
        self.local_ip = stack.ip_int
        self.local_port = local_port
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.listener = listener
        self.state = TcpState.CLOSED
        self.error = 0
        # send side (offsets from iss)
        self.iss = iss
        self.snd_una = 0
        self.snd_nxt = 0
        self.snd_max = 0
        self.snd_wnd = 0
        self.max_snd_wnd = 0
        self._snd_wl1 = 0
        self._snd_wl2 = 0
        self.our_mss = cfg.mss if cfg.mss is not None else stack.mtu - 40
        self.snd_mss = min(DEFAULT_PEER_MSS, self.our_mss)
        self.cwnd = 0
        self.ssthresh = 1 << 30
        self._dupacks = 0
        self._in_recovery = False
        self._recover = 0
        self._sndbuf = bytearray()
        self._snd_base = 1
        self._snd_cap = cfg.send_buffer
        self._fin_queued = False
        # receive side (offsets from irs)
        self.irs = 0
        self.rcv_nxt = 0
        self._rcvbuf = bytearray()
        self._rcv_cap = cfg.receive_buffer
        self._rcv_adv = 0
        self._ooo: list[tuple[int, bytes]] = []
        self._ooo_bytes = 0
        self._rcv_fin_off: int | None = None
        self._eof = False
        # timing
        self._srtt: int | None = None
        self._rttvar = 0
        self.rto = cfg.rto_initial_ns
        self._rtt_seq: int | None = None
        self._rtt_start = 0
        self._retries = 0
        self._persist_mode = False
        self._persist_interval = 0
        self._rtx_timer = stack.new_timer(self._on_rtx_timer)
        self._close_timer = stack.new_timer(self._on_close_timer)
        self._app_closed = False
        self._ack_now = False

    # -- the application's view -----------------------------------------------------

    @property
    def local_address(self) -> tuple[str, int]:
        return (packets.int_to_ip(self.local_ip), self.local_port)

    @property
    def remote_address(self) -> tuple[str, int]:
        return (packets.int_to_ip(self.remote_ip), self.remote_port)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.remote_ip, self.remote_port, self.local_port)

    @property
    def recv_buffered(self) -> int:
        """Bytes waiting for ``recv``."""
        return len(self._rcvbuf)

    @property
    def send_buffered(self) -> int:
        """Bytes in the send buffer, sent-but-unacknowledged included."""
        return len(self._sndbuf)

    @property
    def send_space(self) -> int:
        return self._snd_cap - len(self._sndbuf)

    @property
    def eof(self) -> bool:
        """The peer's FIN has been received (reads return b"" once the buffer is empty)."""
        return self._eof

    @property
    def connected(self) -> bool:
        """The handshake has completed (whatever happened since)."""
        return self.snd_una >= 1 or self.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT)

    def readable(self) -> bool:
        """``recv`` would not return ``None``."""
        if self._rcvbuf or self.error or self._eof:
            return True
        return self.state is TcpState.CLOSED

    def writable(self) -> bool:
        """``send`` would accept bytes or raise (it would not return 0)."""
        if self.error:
            return True
        st = self.state
        if st in (TcpState.SYN_SENT, TcpState.SYN_RECEIVED):
            return False
        if st in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT) and not self._fin_queued:
            return self.send_space > 0
        return True

    def recv(self, n: int) -> bytes | None:
        """Up to ``n`` bytes; ``b""`` at end of stream; ``None`` if nothing yet.

        Raises ``OSError`` (ECONNRESET, ECONNREFUSED, ETIMEDOUT) once the
        connection has failed and the data received before has been read.
        """
        if n <= 0:
            return b""
        if self._rcvbuf:
            data = bytes(self._rcvbuf[:n])
            del self._rcvbuf[:n]
            self._maybe_window_update()
            return data
        if self.error:
            raise _os_error(self.error)
        if self._eof or self.state is TcpState.CLOSED:
            return b""
        return None

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue up to ``len(data)`` bytes; returns how many fit.

        0 means the buffer is full or the handshake is still under way.

        Raises ``OSError``: the connection's error, or EPIPE after
        ``shutdown_write``/``close`` or once the connection is closed.
        """
        if self.error:
            raise _os_error(self.error)
        st = self.state
        if st in (TcpState.SYN_SENT, TcpState.SYN_RECEIVED) and not self._fin_queued:
            return 0
        if self._fin_queued or st not in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            raise _os_error(errno.EPIPE)
        n = min(len(data), self.send_space)
        if n <= 0:
            return 0
        self._sndbuf += memoryview(data)[:n]
        self._output()
        return n

    def shutdown_write(self) -> None:
        """Send a FIN once the queued data is out (half-close); receiving goes on."""
        if self._fin_queued:
            return
        st = self.state
        if st in (TcpState.SYN_SENT, TcpState.SYN_RECEIVED):
            self._fin_queued = True
        elif st in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            self._fin_queued = True
            self._transition(E.FIN_SENT)
            self._output()

    def close(self) -> None:
        """The application lets go: FIN after the queued data, RST if unread data remains.

        The connection finishes on its own (FIN-WAIT, TIME-WAIT) in the stack.
        """
        if self._app_closed:
            return
        self._app_closed = True
        st = self.state
        if st is TcpState.CLOSED:
            return
        if st in (TcpState.SYN_SENT, TcpState.SYN_RECEIVED):
            self.abort()
            return
        if self._rcvbuf or self._ooo:
            self._stack.count("tcp_close_with_unread_data")
            self.abort()
            return
        self.shutdown_write()
        if self.state is TcpState.FIN_WAIT_2:
            self._close_timer.arm(self._stack.now_ns + self._cfg.fin_wait2_timeout_ns)

    def abort(self) -> None:
        """Drop the connection at once, telling the peer with a RST if it knows us."""
        self._app_closed = True
        if self.state in _SYNCHRONIZED and self.state is not TcpState.TIME_WAIT:
            self._send_rst()
        self._finish()

    def __repr__(self) -> str:
        return (
            f"<TcpConnection #{self.handle} {self.local_address}->{self.remote_address} "
            f"{self.state.value}>"
        )

    # -- wire helpers --------------------------------------------------------------

    def _rcv_window(self) -> int:
        return max(0, min(self._rcv_cap - len(self._rcvbuf), MAX_WINDOW))

    def _xmit(self, seq_off: int, flags: int, data: bytes = b"", mss: int | None = None) -> None:
        wnd = self._rcv_window()
        ack = 0
        if flags & packets.TCP_ACK:
            ack = (self.irs + self.rcv_nxt) & _M32
            if wnd == 0:
                self._stack.count("tcp_zero_windows_sent")
            self._rcv_adv = max(self._rcv_adv, self.rcv_nxt + wnd)
            self._ack_now = False
        self._stack.send_tcp_segment(self, (self.iss + seq_off) & _M32, ack, flags, wnd, data, mss)

    def _send_syn(self) -> None:
        flags = packets.TCP_SYN
        if self.state is TcpState.SYN_RECEIVED:
            flags |= packets.TCP_ACK
        self._xmit(0, flags, mss=self.our_mss)
        self.snd_nxt = max(self.snd_nxt, 1)
        self.snd_max = max(self.snd_max, 1)

    def _send_ack(self) -> None:
        self._xmit(self.snd_nxt, packets.TCP_ACK)

    def _send_rst(self) -> None:
        self._stack.count("tcp_rst_sent")
        self._xmit(self.snd_nxt, packets.TCP_RST | packets.TCP_ACK)

    def _transition(self, event: TcpEvent, *, touch: bool = True) -> None:
        """Take the table's transition for ``event``; ``touch``: tell the stack."""
        state = _TRANSITIONS.get((self.state, event))
        if state is None:
            raise RuntimeError(f"TCP: no transition from {self.state.value} on {event.value}")
        if state is not self.state:
            self.state = state
            if touch:
                self._stack.touch(self)

    def _start_handshake(self, now_ns: int) -> None:
        """Active open: send the SYN."""
        self._transition(E.ACTIVE_OPEN, touch=False)
        self._rtt_seq = 1
        self._rtt_start = now_ns
        self._send_syn()
        self._rtx_timer.arm(now_ns + self.rto)

    def _accept_syn(self, seg: packets.TcpSegment, now_ns: int) -> None:
        """Passive open: a listener's SYN arrived; answer with SYN-ACK."""
        self.irs = seg.seq
        self.rcv_nxt = 1
        self._take_peer_mss(seg.mss)
        self.snd_wnd = seg.window
        self.max_snd_wnd = seg.window
        self._transition(E.PASSIVE_OPEN, touch=False)
        self._rtt_seq = 1
        self._rtt_start = now_ns
        self._send_syn()
        self._rtx_timer.arm(now_ns + self.rto)

    def _take_peer_mss(self, mss: int | None) -> None:
        peer = mss if mss else DEFAULT_PEER_MSS
        self.snd_mss = max(1, min(peer, self._stack.mtu - 40))

    def _established(self) -> None:
        self.cwnd = self._cfg.initial_cwnd_segments * self.snd_mss
        self._transition(E.HANDSHAKE_DONE)
        self._stack.touch(self)
        if self._fin_queued:
            self._fin_queued = False
            self.shutdown_write()

    def _finish(self) -> None:
        """Leave the stack: CLOSED, timers off, out of the demultiplexing table."""
        self._rtx_timer.cancel()
        self._close_timer.cancel()
        self._sndbuf.clear()
        self._ooo.clear()
        self._ooo_bytes = 0
        if self._app_closed:
            self._rcvbuf.clear()
        self._transition(E.ENDED, touch=False)
        self._stack.remove_connection(self)
        if self.listener is not None:
            self.listener._forget(self)
        self._stack.touch(self)

    # -- RTT and timers --------------------------------------------------------------

    def _rtt_sample(self, rtt: int) -> None:
        rtt = max(rtt, 0)
        if self._srtt is None:
            self._srtt = rtt
            self._rttvar = rtt // 2
        else:
            self._rttvar = (3 * self._rttvar + abs(self._srtt - rtt)) // 4
            self._srtt = (7 * self._srtt + rtt) // 8
        rto = self._srtt + max(RTO_GRANULARITY_NS, 4 * self._rttvar)
        self.rto = min(max(rto, self._cfg.rto_min_ns), self._cfg.rto_max_ns)

    def _arm_rtx(self) -> None:
        self._persist_mode = False
        self._rtx_timer.arm(self._stack.now_ns + self.rto)

    def _on_rtx_timer(self, now_ns: int) -> None:
        if self._persist_mode:
            self._on_persist(now_ns)
            return
        st = self.state
        if st in (TcpState.SYN_SENT, TcpState.SYN_RECEIVED):
            self._retries += 1
            if self._retries > self._cfg.syn_retries:
                if self.listener is None:
                    self.error = errno.ETIMEDOUT
                self._finish()
                return
            self._stack.count("tcp_retransmits")
            self._rtt_seq = None
            self.rto = min(self.rto * 2, self._cfg.rto_max_ns)
            self._send_syn()
            self._rtx_timer.arm(now_ns + self.rto)
            return
        if st not in _SENDING_STATES or self.snd_una >= self.snd_max:
            return
        self._retries += 1
        if self._retries > self._cfg.max_retries:
            self.error = errno.ETIMEDOUT
            self._finish()
            return
        self._stack.count("tcp_timeouts")
        flight = self.snd_max - self.snd_una
        self.ssthresh = max(flight // 2, 2 * self.snd_mss)
        self.cwnd = self.snd_mss
        self._in_recovery = False
        self._recover = self.snd_max
        self._dupacks = 0
        self._rtt_seq = None
        self.rto = min(self.rto * 2, self._cfg.rto_max_ns)
        self.snd_nxt = self.snd_una  # go back N
        self._output()
        if self.snd_nxt == self.snd_una and self.state in _SENDING_STATES:
            self._retransmit_head()  # the window is shut: resend the head anyway

    def _on_persist(self, now_ns: int) -> None:
        if self.state not in _SENDING_STATES:
            return
        if self.snd_una < self.snd_max or not self._has_unsent():
            self._persist_mode = False
            self._output()
            return
        if self._app_closed:
            # Nobody will read the answer: an orphan gives up like a retransmission would.
            self._retries += 1
            if self._retries > self._cfg.max_retries:
                self.abort()
                return
        # A zero-length segment below the window: the peer answers with an ACK
        # carrying its current window (Linux's probe).
        self._stack.count("tcp_window_probes")
        self._xmit(self.snd_una - 1, packets.TCP_ACK)
        self._persist_interval = min(self._persist_interval * 2, self._cfg.rto_max_ns)
        self._rtx_timer.arm(now_ns + self._persist_interval)

    def _on_close_timer(self, now_ns: int) -> None:
        if self.state in (TcpState.TIME_WAIT, TcpState.FIN_WAIT_2):
            self._finish()

    def _enter_time_wait(self, event: TcpEvent) -> None:
        self._rtx_timer.cancel()
        self._transition(event)
        self._close_timer.arm(self._stack.now_ns + self._cfg.time_wait_ns)

    # -- sending -------------------------------------------------------------------

    def _data_end(self) -> int:
        """Offset just past the last byte queued by the application."""
        return self._snd_base + len(self._sndbuf)

    def _has_unsent(self) -> bool:
        data_end = self._data_end()
        if self.snd_nxt < data_end:
            return True
        return self._fin_queued and self.snd_nxt <= data_end

    def _output(self) -> None:
        """Send what the windows allow, manage the retransmit/persist timer, then any due ACK."""
        if self.state in _SENDING_STATES:
            self._send_pending()
        if self._ack_now and self.state in _SYNCHRONIZED:
            self._send_ack()

    def _send_pending(self) -> None:
        now = self._stack.now_ns
        mss = self.snd_mss
        while True:
            data_end = self._data_end()
            snd_wnd_end = self.snd_una + self.snd_wnd
            wnd_end = min(snd_wnd_end, self.snd_una + max(self.cwnd, mss))
            seq = self.snd_nxt
            if seq < data_end:
                avail = data_end - seq
                n = min(avail, wnd_end - seq, mss)
                if n <= 0:
                    break
                if n < avail and n < mss and seq > self.snd_una:
                    break  # sender-side silly window avoidance: wait for the ACK
                start = seq - self._snd_base
                data = bytes(self._sndbuf[start : start + n])
                end = seq + n
                flags = packets.TCP_ACK
                if end == data_end:
                    flags |= packets.TCP_PSH
                    if self._fin_queued and end + 1 <= snd_wnd_end:
                        flags |= packets.TCP_FIN
                self._note_send(seq, end)
                self._xmit(seq, flags, data)
                self.snd_nxt = end + (1 if flags & packets.TCP_FIN else 0)
            elif self._fin_queued and seq == data_end:
                if seq + 1 > snd_wnd_end:
                    break
                self._note_send(seq, seq + 1)
                self._xmit(seq, packets.TCP_FIN | packets.TCP_ACK)
                self.snd_nxt = seq + 1
            else:
                break
            self.snd_max = max(self.snd_max, self.snd_nxt)
        if self.snd_max > self.snd_una:
            if not self._rtx_timer.armed or self._persist_mode:
                self._arm_rtx()
        elif self._has_unsent():
            if not self._rtx_timer.armed or not self._persist_mode:
                self._persist_mode = True
                self._persist_interval = self.rto
                self._rtx_timer.arm(now + self._persist_interval)
        elif self._persist_mode:
            self._rtx_timer.cancel()
            self._persist_mode = False

    def _note_send(self, seq: int, end: int) -> None:
        if seq < self.snd_max:
            self._stack.count("tcp_retransmits")
            if self._rtt_seq is not None and seq < self._rtt_seq:
                self._rtt_seq = None  # Karn: never time a retransmitted segment
        elif self._rtt_seq is None:
            self._rtt_seq = end
            self._rtt_start = self._stack.now_ns

    def _retransmit_head(self) -> None:
        """Resend the first unacknowledged segment (fast retransmit), snd_nxt unchanged."""
        seq = self.snd_una
        data_end = self._data_end()
        if seq < data_end:
            n = min(data_end - seq, self.snd_mss)
            start = seq - self._snd_base
            flags = packets.TCP_ACK
            end = seq + n
            if end == data_end:
                flags |= packets.TCP_PSH
                if self._fin_queued and self.snd_max > data_end:
                    flags |= packets.TCP_FIN
            self._note_send(seq, end)
            self._xmit(seq, flags, bytes(self._sndbuf[start : start + n]))
        elif self._fin_queued and seq == data_end and self.snd_max > data_end:
            self._note_send(seq, seq + 1)
            self._xmit(seq, packets.TCP_FIN | packets.TCP_ACK)
        self._arm_rtx()

    # -- receiving -----------------------------------------------------------------

    def _on_segment(self, seg: packets.TcpSegment) -> None:
        st = self.state
        if st is TcpState.SYN_SENT:
            self._on_segment_syn_sent(seg)
            return
        if st is TcpState.CLOSED or st is TcpState.LISTEN:
            return
        seq = _unwrap(seg.seq, self.irs, self.rcv_nxt)
        seg_len = seg.seg_len
        wnd = self._rcv_window()
        if seq + seg_len < self.rcv_nxt or seq > self.rcv_nxt + wnd:
            if not seg.rst:
                self._ack_now = True
                self._output()
            return
        if seg.rst:
            if self.rcv_nxt <= seq <= self.rcv_nxt + wnd:
                self._on_rst()
            return
        if seg.syn:
            if st is TcpState.SYN_RECEIVED and seq == 0 and seg.has_ack:
                # Simultaneous open: the peer's SYN-ACK completes our handshake.
                if self._process_ack(seg, seq):
                    self._ack_now = True
                    self._output()
            elif st is TcpState.SYN_RECEIVED and seq == 0:
                self._send_syn()  # our SYN-ACK was lost: the peer retransmitted its SYN
            else:
                self._ack_now = True  # RFC 5961 challenge ACK
                self._output()
            return
        if not seg.has_ack:
            return
        if not self._process_ack(seg, seq):
            return
        self._process_data(seg, seq)
        if self.state is not TcpState.CLOSED:
            self._output()

    def _on_segment_syn_sent(self, seg: packets.TcpSegment) -> None:
        ack_ok = False
        ack = 0
        if seg.has_ack:
            ack = _unwrap(seg.ack, self.iss, 0)
            if ack <= 0 or ack > self.snd_max:
                if not seg.rst:
                    self._stack.send_reset_reply(self.remote_ip, seg)
                return
            ack_ok = True
        if seg.rst:
            if ack_ok:
                self.error = errno.ECONNREFUSED
                self._finish()
            return
        if not seg.syn:
            return
        self.irs = seg.seq
        self.rcv_nxt = 1
        self._take_peer_mss(seg.mss)
        if ack_ok:
            self.snd_una = ack
            self.snd_nxt = max(self.snd_nxt, ack)
            self.snd_wnd = seg.window
            self.max_snd_wnd = max(self.max_snd_wnd, seg.window)
            self._snd_wl1 = 0
            self._snd_wl2 = ack
            if self._rtt_seq is not None and ack >= self._rtt_seq:
                self._rtt_sample(self._stack.now_ns - self._rtt_start)
            self._rtt_seq = None
            self._retries = 0
            self._rtx_timer.cancel()
            self._ack_now = True
            self._established()
            self._output()
        else:
            # Simultaneous open.
            self.snd_wnd = seg.window
            self.max_snd_wnd = seg.window
            self._transition(E.SIMULTANEOUS_OPEN)
            self._send_syn()

    def _on_rst(self) -> None:
        st = self.state
        self._stack.count("tcp_rst_received")
        if st is TcpState.SYN_RECEIVED:
            if self.listener is None:
                self.error = errno.ECONNREFUSED
        elif st in (
            TcpState.ESTABLISHED,
            TcpState.FIN_WAIT_1,
            TcpState.FIN_WAIT_2,
            TcpState.CLOSE_WAIT,
        ):
            self.error = errno.ECONNRESET
        self._finish()

    def _process_ack(self, seg: packets.TcpSegment, seq: int) -> bool:
        """RFC 793's ACK processing; False if the segment is to be dropped."""
        ack = _unwrap(seg.ack, self.iss, self.snd_una)
        st = self.state
        if st is TcpState.SYN_RECEIVED:
            if not self.snd_una < ack <= self.snd_max:
                self._stack.send_reset_reply(self.remote_ip, seg)
                return False
            if self.listener is not None and not self.listener._can_queue():
                self._stack.count("tcp_listen_overflow")
                return False
            self.snd_una = ack
            self.snd_wnd = seg.window
            self.max_snd_wnd = max(self.max_snd_wnd, seg.window)
            self._snd_wl1 = seq
            self._snd_wl2 = ack
            if self._rtt_seq is not None and ack >= self._rtt_seq:
                self._rtt_sample(self._stack.now_ns - self._rtt_start)
            self._rtt_seq = None
            self._retries = 0
            self._rtx_timer.cancel()
            listener = self.listener
            self._established()
            if listener is not None:
                listener._queue_established(self)
            return True
        if ack > self.snd_max:
            self._ack_now = True  # acknowledges something not yet sent
            self._output()
            return False
        if ack < self.snd_una:
            return True  # old duplicate: ignore the ACK field, keep the data
        old_wnd = self.snd_wnd
        if self._snd_wl1 < seq or (self._snd_wl1 == seq and self._snd_wl2 <= ack):
            self.snd_wnd = seg.window
            self.max_snd_wnd = max(self.max_snd_wnd, seg.window)
            self._snd_wl1 = seq
            self._snd_wl2 = ack
        if ack > self.snd_una:
            self._new_ack(ack)
        elif (
            not seg.payload
            and not seg.fin
            and seg.window == old_wnd
            and self.snd_max > self.snd_una
        ):
            self._dup_ack()
        self._after_ack()
        return self.state is not TcpState.CLOSED

    def _new_ack(self, ack: int) -> None:
        acked = ack - self.snd_una
        data_end = self._data_end()
        new_base = min(ack, data_end)
        if new_base > self._snd_base:
            del self._sndbuf[: new_base - self._snd_base]
            self._snd_base = new_base
            self._stack.touch(self)
        self.snd_una = ack
        if self.snd_nxt < ack:
            self.snd_nxt = ack
        if self._rtt_seq is not None and ack >= self._rtt_seq:
            self._rtt_sample(self._stack.now_ns - self._rtt_start)
            self._rtt_seq = None
        self._retries = 0
        mss = self.snd_mss
        if self._in_recovery:
            if ack >= self._recover:
                self._in_recovery = False
                self.cwnd = self.ssthresh
            else:
                self.cwnd = max(self.cwnd - acked + mss, mss)
                self._retransmit_head()  # NewReno partial ACK: the next hole
        elif self.cwnd < self.ssthresh:
            self.cwnd += min(acked, mss)
        else:
            self.cwnd += max(1, mss * mss // max(self.cwnd, 1))
        self._dupacks = 0
        if self.snd_una >= self.snd_max:
            if not self._persist_mode:
                self._rtx_timer.cancel()
        else:
            self._arm_rtx()

    def _dup_ack(self) -> None:
        self._dupacks += 1
        mss = self.snd_mss
        if self._in_recovery:
            self.cwnd += mss
        elif self._dupacks == 3 and self.snd_una >= self._recover:
            self._stack.count("tcp_fast_retransmits")
            flight = self.snd_max - self.snd_una
            self.ssthresh = max(flight // 2, 2 * mss)
            self._recover = self.snd_max
            self._in_recovery = True
            self.cwnd = self.ssthresh + 3 * mss
            self._retransmit_head()

    def _fin_acked(self) -> bool:
        return self._fin_queued and self.snd_una > self._data_end()

    def _after_ack(self) -> None:
        st = self.state
        if st is TcpState.FIN_WAIT_1 and self._fin_acked():
            self._transition(E.FIN_ACKED)
            self._rtx_timer.cancel()
            if self._app_closed:
                self._close_timer.arm(self._stack.now_ns + self._cfg.fin_wait2_timeout_ns)
        elif st is TcpState.CLOSING and self._fin_acked():
            self._enter_time_wait(E.FIN_ACKED)
        elif st is TcpState.LAST_ACK and self._fin_acked():
            self._finish()

    def _process_data(self, seg: packets.TcpSegment, seq: int) -> None:
        st = self.state
        data = seg.payload
        fin = seg.fin
        if st is TcpState.TIME_WAIT:
            if fin:
                self._close_timer.arm(self._stack.now_ns + self._cfg.time_wait_ns)
            if seg.seg_len:
                self._ack_now = True
            return
        if st not in _RECEIVING_STATES:
            if seg.seg_len:
                self._ack_now = True  # the peer's FIN came already: duplicates get an ACK
            return
        if seg.seg_len:
            self._ack_now = True
        fin_off = seq + len(data) if fin else None
        if data:
            if seq < self.rcv_nxt:
                data = data[self.rcv_nxt - seq :]
                seq = self.rcv_nxt
            right = self.rcv_nxt + self._rcv_window()
            if seq + len(data) > right:
                data = data[: max(0, right - seq)]
                fin_off = None
            if data:
                if self._app_closed:
                    self._stack.count("tcp_data_after_close")
                    self.abort()
                    return
                if seq == self.rcv_nxt:
                    self._rcvbuf += data
                    self.rcv_nxt += len(data)
                    self._reassemble()
                    self._stack.touch(self)
                else:
                    self._store_ooo(seq, data)
        if fin_off is not None and self.rcv_nxt < fin_off <= self.rcv_nxt + max(
            self._rcv_window(), 1
        ):
            self._rcv_fin_off = fin_off  # a FIN beyond a hole: wait for the hole
        if self.rcv_nxt in (self._rcv_fin_off, fin_off):
            self._on_fin()

    def _store_ooo(self, seq: int, data: bytes) -> None:
        for start, held in self._ooo:
            if start <= seq and seq + len(data) <= start + len(held):
                return  # already held
        if self._ooo_bytes + len(data) > self._rcv_cap:
            self._stack.count("tcp_ooo_dropped")
            return
        self._ooo.append((seq, data))
        self._ooo.sort(key=lambda item: item[0])
        self._ooo_bytes += len(data)
        self._stack.count("tcp_ooo_segments")

    def _reassemble(self) -> None:
        ooo = self._ooo
        while ooo and ooo[0][0] <= self.rcv_nxt:
            start, held = ooo.pop(0)
            self._ooo_bytes -= len(held)
            end = start + len(held)
            if end > self.rcv_nxt:
                self._rcvbuf += held[self.rcv_nxt - start :]
                self.rcv_nxt = end

    def _on_fin(self) -> None:
        self._rcv_fin_off = None
        self.rcv_nxt += 1
        self._eof = True
        self._ack_now = True
        st = self.state
        if st is TcpState.ESTABLISHED:
            self._transition(E.FIN_RECEIVED)
        elif st is TcpState.FIN_WAIT_1:
            if self._fin_acked():
                self._enter_time_wait(E.FIN_RECEIVED_OURS_ACKED)
            else:
                self._transition(E.FIN_RECEIVED)
        elif st is TcpState.FIN_WAIT_2:
            self._close_timer.cancel()
            self._enter_time_wait(E.FIN_RECEIVED)
        self._stack.touch(self)

    def _maybe_window_update(self) -> None:
        if self.state not in _RECEIVING_STATES:
            return
        right = self.rcv_nxt + self._rcv_window()
        if right - self._rcv_adv >= min(self._rcv_cap // 2, 2 * self.our_mss):
            self._ack_now = True
            self._output()


class TcpListener:
    """A listening port: SYNs become connections, established ones wait for ``accept``."""

    def __init__(self, stack: EndpointHost, handle: int, port: int, backlog: int) -> None:
        self._stack = stack
        self.handle = handle
        self.port = port
        self.backlog = max(1, backlog)
        self.closed = False
        self._queue: deque[TcpConnection] = deque()
        self._pending: dict[int, TcpConnection] = {}  # handshakes in progress, by handle

    @property
    def local_address(self) -> tuple[str, int]:
        return (packets.int_to_ip(self._stack.ip_int), self.port)

    def set_backlog(self, backlog: int) -> None:
        self.backlog = max(1, backlog)

    def accept(self) -> TcpConnection | None:
        """The oldest established connection not yet accepted, or ``None``."""
        if not self._queue:
            return None
        conn = self._queue.popleft()
        conn.listener = None
        return conn

    def readable(self) -> bool:
        return bool(self._queue) or self.closed

    def writable(self) -> bool:
        return False

    @property
    def queued(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Stop listening; reset every connection not yet accepted."""
        if self.closed:
            return
        self.closed = True
        self._stack.remove_listener(self)
        for conn in [*self._pending.values(), *self._queue]:
            conn.listener = None
            conn.abort()
        self._pending.clear()
        self._queue.clear()
        self._stack.touch(self)

    def _can_accept_syn(self) -> bool:
        return len(self._pending) < self._stack.tcp_config.max_half_open

    def _can_queue(self) -> bool:
        return len(self._queue) < self.backlog

    def _add_pending(self, conn: TcpConnection) -> None:
        self._pending[conn.handle] = conn

    def _queue_established(self, conn: TcpConnection) -> None:
        self._pending.pop(conn.handle, None)
        self._queue.append(conn)
        self._stack.touch(self)

    def _forget(self, conn: TcpConnection) -> None:
        self._pending.pop(conn.handle, None)

    def __repr__(self) -> str:
        return f"<TcpListener #{self.handle} port {self.port} queued {len(self._queue)}>"
