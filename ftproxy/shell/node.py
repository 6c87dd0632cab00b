"""``ftproxy run``: one node of a self-healing pair, the same command on every host.

The node asks the arbiter who is live for the pair (the winner of its highest
decided generation, which recorded its log address with its win). Nobody: the
node claims generation 0 by test-and-set; the winner boots the guest alone and
live, any other node that asked at the same time lost and joins it. Somebody:
the node joins that replica as its backup and catches up from its log. A node
that systemd restarts after a failure, or after it handed the service to the
other node (a planned switchover: ``ftproxy switchover``, SIGUSR1, or SIGTERM
with ``--on-sigterm leave``, which every pair here supports since each forms by
re-protection), goes through the same steps, so it rejoins by itself.
"""

from __future__ import annotations

import structlog
import trio

from ftproxy.shell.arbiter_client import ArbiterClient, LiveReplica
from ftproxy.shell.backup import connect_to_primary, serve_joined
from ftproxy.shell.checks import check_data_dir, check_program
from ftproxy.shell.exits import EXIT_HALTED
from ftproxy.shell.link import LinkRefused
from ftproxy.shell.options import ReplicaOptions
from ftproxy.shell.primary import serve_primary
from ftproxy.shell.reprotect import ALREADY_ATTACHED

log = structlog.get_logger()

CONNECT_TIMEOUT_S = 5.0
RETRY_S = 0.5
# Refusals that pass: another backup is attached; the live replica was too busy (or
# stopped) to finish the handshake. Any other (another program, a wrong secret) stays.
PASSING_REFUSALS = (ALREADY_ATTACHED, "did not finish the handshake in time")


def _worth_retrying(reason: str) -> bool:
    return any(passing in reason for passing in PASSING_REFUSALS)


async def run_node(options: ReplicaOptions) -> int:
    """Boot the pair or join its live replica; return the exit code of what followed."""
    me = options.log_listen
    assert me is not None
    bound = log.bind(pair=options.pair, node=f"{me[0]}:{me[1]}")
    # What the flags name, checked before the arbiter is asked (StartupError).
    check_program(options.argv)
    check_data_dir(options.data_dir)
    client = ArbiterClient(options, "node")
    waiting: str | None = None
    while True:
        live = await client.find_live()
        if live is None:
            decision = await client.claim_boot()
            if decision.won:
                bound.info("node_booting", generation=0)
                options.generation = 0
                return await serve_primary(options, me, alone=True)
            live = LiveReplica(0, decision.winner)
        address = live.log_address
        if address is None:
            bound.error(
                "node_refused",
                reason=f"the arbiter names {live.winner!r} as live for pair {options.pair!r} "
                f"(generation {live.generation}), and it recorded no log address to join: "
                "was the pair started without --log-listen?",
            )
            return EXIT_HALTED
        if address == me:
            reason = (
                f"the arbiter names this node's own address as live in generation "
                f"{live.generation}: an earlier run of this node, now gone. Waiting for the "
                "pair's other replica to take over; if none is left, the pair's state is lost "
                "and a new --pair must start afresh"
            )
        else:
            joined = None
            try:
                with trio.move_on_after(CONNECT_TIMEOUT_S):
                    joined = await connect_to_primary(options, address)
            except LinkRefused as exc:
                if not _worth_retrying(str(exc)):
                    bound.error("node_refused", reason=str(exc))
                    return EXIT_HALTED
                reason = str(exc)
            else:
                if joined is not None:
                    link, welcome = joined
                    bound.info("node_joining", live=live.winner, generation=welcome.generation)
                    return await serve_joined(options, link, welcome)
                reason = (
                    f"the live replica {live.winner} (generation {live.generation}) does not "
                    f"answer at {address[0]}:{address[1]}; asking the arbiter again"
                )
        if reason != waiting:
            bound.warning("node_waiting", reason=reason)
            waiting = reason
        await trio.sleep(RETRY_S)
