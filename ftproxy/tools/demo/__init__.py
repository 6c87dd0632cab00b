"""``ftproxy demo``: a failover under load, and a verdict on what the clients were told.

Socket mode (the default) runs everything on 127.0.0.1 with ports picked here: an
arbiter embedded in this process (its store in a temporary directory), a primary and
a backup in their own processes with ``examples/kv.py`` as the guest, and a few client
tasks that INCR their own counter and SET fresh keys, recording every write whose
reply they actually received (an *acknowledged* write). After ``--warmup`` seconds the
primary and its guest are killed with SIGKILL; the load goes on through the failover
for ``--after`` seconds; then every acknowledged write is read back from the new
primary. ``lost`` counts the acknowledged writes that are not there: 0 is the output
rule's promise, and ``--no-output-rule`` shows what breaking it costs. The clients
reconnect after the failover: their connections died with the primary's kernel.

``--etcd`` decides the failover through etcd instead: a three-member cluster on
127.0.0.1 (Debian's ``etcd-server``), one member killed mid-run, then the primary;
the verdict names the arbiter and reads the decision back from etcd.

``--packet`` (root) shows what packet mode adds: the connections survive. It builds
a lab of its own (``ftproxy.tools.lab``, prefix ``ftdemo``), runs the arbiter, the primary
and the backup in their hosts, the replicas with ``--front packet`` for the virtual
IP, and holds ONE kernel TCP connection from the client host to the virtual IP:
INCR, SET, GET in turn, every reply checked. The primary is killed (or, with
``--partition``, cut off at the switch); the same connection goes on through the
failover and reads every acknowledged write back at the end. The demo's own thread
runs in the client host's network namespace, so its sockets are the client's.

The live view (rich) polls both replicas' admin endpoints; ``--json`` replaces it
with one JSON object on stdout (``VERDICT_FIELDS``, the same in both modes), and
without a terminal the demo logs its progress to stderr and prints only the
verdict. All I/O is trio's; every process, the temporary directory and the lab
go on every way out, Ctrl-C included.

One private module per job: ``_config`` (settings, exit codes, ports), ``_load``
(the clients and what they were told), ``_procs`` (the replicas as trio
processes, on :mod:`ftproxy.tools.procs`), ``_verdict`` (reading back, the verdicts
and their ``--json`` fields), ``_state`` (what the view shows), ``_run`` (the steps
both modes share), ``_socket_mode``, ``_etcd``, ``_rounds`` and ``_packet_mode`` (the
runs), ``_view`` (the rich views) and ``_command`` (the options and ``run_demo``). RESP
itself is :mod:`ftproxy.tools.resp`, shared with the benchmark and the tests.
"""

from ftproxy.tools.demo._command import add_demo_arguments, run_demo
from ftproxy.tools.demo._config import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOST,
    EXIT_LOST_UNSAFE,
    EXIT_OK,
    EXIT_USAGE,
    KV_SCRIPT,
    LAB_PREFIX,
    NEEDS_ROOT,
    DemoConfig,
    DemoError,
)
from ftproxy.tools.demo._verdict import VERDICT_FIELDS, PacketVerdict, Verdict
from ftproxy.tools.procs import summarize_stderr
from ftproxy.tools.resp import ErrorReply, encode_command, parse_reply

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_LOST",
    "EXIT_LOST_UNSAFE",
    "EXIT_OK",
    "EXIT_USAGE",
    "KV_SCRIPT",
    "LAB_PREFIX",
    "NEEDS_ROOT",
    "VERDICT_FIELDS",
    "DemoConfig",
    "DemoError",
    "ErrorReply",
    "PacketVerdict",
    "Verdict",
    "add_demo_arguments",
    "encode_command",
    "parse_reply",
    "run_demo",
    "summarize_stderr",
]
