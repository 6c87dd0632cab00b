"""Reading every acknowledged write back; the verdicts and their ``--json`` fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog
import trio
from rich.console import RenderableType
from rich.text import Text

from ftproxy.tools.demo._config import (
    EXIT_LOST_UNSAFE,
    HOST,
    VERIFY_BATCH,
    VERIFY_TIMEOUT_S,
    DemoConfig,
    DemoError,
)
from ftproxy.tools.demo._load import (
    ConnectionLoad,
    LoadStats,
    counter_key,
    describe_connection_error,
)
from ftproxy.tools.resp import CONNECTION_ERRORS, Reply, RespConnection, connect_retrying

# --- The verdict ------------------------------------------------------------------------


class Outcome(Protocol):
    """What a verdict panel and ``--json`` need from either demo's verdict."""

    @property
    def passed(self) -> bool: ...

    @property
    def title(self) -> str: ...

    def summary(self) -> str: ...

    def rows(self) -> list[tuple[str, RenderableType]]: ...

    def notes(self) -> list[Text]: ...

    def as_json(self) -> dict[str, Any]: ...


def _lost_cell(lost: int) -> Text:
    return Text(f"{lost:,}", style="red" if lost else "green")


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


@dataclass(frozen=True)
class Verdict:
    """Acknowledged writes against what the new primary holds."""

    output_rule: bool
    acked_incrs: int
    found_incrs: int
    acked_sets: int
    found_sets: int
    extra_incrs: int  # beyond acked + unanswered INCRs: never expected
    failover_s: float | None
    replies: int
    reconnects: int
    ship_delay_ms: float
    duration_s: float
    etcd: EtcdDecision | None = None  # --etcd: the decision, read back from etcd
    rounds: tuple[Round, ...] = ()

    @property
    def acked(self) -> int:
        return self.acked_incrs + self.acked_sets

    @property
    def found(self) -> int:
        return self.found_incrs + self.found_sets

    @property
    def lost(self) -> int:
        return self.acked - self.found

    @property
    def passed(self) -> bool:
        """The output rule's promise held: nothing acknowledged lost, nothing invented
        (and with --etcd, etcd holds the backup as the winner)."""
        decided = self.etcd is None or self.etcd.winner == self.etcd.backup
        return self.lost == 0 and self.extra_incrs == 0 and decided

    def summary(self) -> str:
        if self.passed:
            through = " (decided through etcd)" if self.etcd is not None else ""
            return f"no acknowledged write lost{through}"
        if self.lost:
            return f"{self.lost} acknowledged write{'s' if self.lost != 1 else ''} lost"
        if self.etcd is not None and self.etcd.winner != self.etcd.backup:
            return f"etcd holds {self.etcd.winner} as the winner, not the backup"
        return f"{self.extra_incrs} increments more than were sent"

    @property
    def title(self) -> str:
        return "output rule ON" if self.output_rule else "output rule OFF (unsafe)"

    def rows(self) -> list[tuple[str, RenderableType]]:
        return [
            (
                "acknowledged writes",
                f"{self.acked:,}  ({self.acked_incrs:,} INCR, {self.acked_sets:,} SET)",
            ),
            ("found after failover", f"{self.found:,}"),
            ("lost", _lost_cell(self.lost)),
            *(
                [("failover (clients' view)", seconds(self.failover_s))]
                if not self.rounds
                else [(f"round {r.number}", r.describe()) for r in self.rounds]
            ),
            ("requests answered", f"{self.replies:,}, {self.reconnects} reconnects"),
            *self._arbiter_rows(),
        ]

    def _arbiter_rows(self) -> list[tuple[str, RenderableType]]:
        if self.etcd is None:
            return [("arbiter", "built-in (embedded)")]
        etcd = self.etcd
        alive = etcd.members - etcd.members_killed
        return [
            ("arbiter", f"etcd, {alive} of {etcd.members} members up"),
            (etcd.key, etcd.winner or Text("undecided", style="red")),
        ]

    def notes(self) -> list[Text]:
        if self.output_rule:
            return []
        return [
            Text(
                "Expected: without the output rule a reply leaves before the backup holds the "
                f"log that produced it (here each entry ships {self.ship_delay_ms:g} ms "
                "later), so writes acknowledged just before the kill die with the primary. "
                "The output rule prevents exactly this: run without --no-output-rule to see "
                f"none lost. Exit code {EXIT_LOST_UNSAFE}: writes were lost, as this mode "
                "shows they can be.",
                style="yellow",
            )
        ]

    def as_json(self) -> dict[str, Any]:
        return verdict_json(
            mode="socket",
            passed=self.passed,
            verdict=self.summary(),
            output_rule=self.output_rule,
            failure="kill",
            acked=self.acked,
            found=self.found,
            lost=self.lost,
            failover_s=None if self.failover_s is None else round(self.failover_s, 4),
            acked_incrs=self.acked_incrs,
            found_incrs=self.found_incrs,
            extra_incrs=self.extra_incrs,
            acked_sets=self.acked_sets,
            found_sets=self.found_sets,
            requests=self.replies,
            reconnects=self.reconnects,
            read_back_on="a new connection",
            ship_delay_ms=None if self.output_rule else self.ship_delay_ms,
            duration_s=round(self.duration_s, 3),
            arbiter={"kind": "builtin"} if self.etcd is None else self._etcd_json(self.etcd),
            rounds=[r.as_json() for r in self.rounds] if self.rounds else None,
        )

    @staticmethod
    def _etcd_json(etcd: EtcdDecision) -> dict[str, Any]:
        return {
            "kind": "etcd",
            "address": etcd.address,
            "members": etcd.members,
            "members_killed": etcd.members_killed,
            "key": etcd.key,
            "winner": etcd.winner,
            "backup": etcd.backup,
        }


@dataclass(frozen=True)
class Round:
    """``--rounds``: one kill -9 of whoever was primary, and the pair healing after it."""

    number: int
    killed: str
    live: str
    failover_s: float | None  # the clients' view: last reply of the old, first of the new
    reprotect_s: float | None  # from the kill to protected again
    catch_up_s: float | None
    catch_up_entries: int
    generation: int

    def describe(self) -> Text:
        return Text.assemble(
            f"{self.killed} killed, {self.live} live; failover {seconds(self.failover_s)}; ",
            ("protected again", "green")
            if self.reprotect_s is not None
            else ("unprotected", "red"),
            f" (generation {self.generation}) {seconds(self.reprotect_s)} after the kill, "
            f"{self.catch_up_entries:,} entries caught up in {seconds(self.catch_up_s)}",
        )

    def as_json(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {
            "round": self.number,
            "killed": self.killed,
            "live": self.live,
            "failover_s": rounded(self.failover_s),
            "reprotect_s": rounded(self.reprotect_s),
            "catch_up_s": rounded(self.catch_up_s),
            "catch_up_entries": self.catch_up_entries,
            "generation": self.generation,
        }


# The fields of ``--json``, the same in both modes; where one has no meaning in a
# mode (the one connection's details in socket mode), it is null there.
VERDICT_FIELDS: Final = (
    "mode",
    "passed",
    "verdict",
    "output_rule",
    "failure",
    "acked",
    "found",
    "lost",
    "failover_s",
    "acked_incrs",
    "found_incrs",
    "extra_incrs",
    "acked_sets",
    "found_sets",
    "requests",
    "reconnects",
    "connections",
    "wrong_replies",
    "wrong",
    "read_back_on",
    "connection_survived",
    "connection_error",
    "client",
    "service",
    "client_retransmissions",
    "req_per_s_pair",
    "req_per_s_alone",
    "ship_delay_ms",
    "duration_s",
    "arbiter",
    "rounds",
)


def verdict_json(**fields: Any) -> dict[str, Any]:
    """A ``--json`` verdict: every field of ``VERDICT_FIELDS``, in that order."""
    unknown = fields.keys() - set(VERDICT_FIELDS)
    assert not unknown, f"not a verdict field: {sorted(unknown)}"
    return {name: fields.get(name) for name in VERDICT_FIELDS}


async def read_back(port: int, keys: list[bytes], host: str = HOST) -> list[Reply]:
    """GET every key from the service, pipelined in batches, on a fresh connection."""
    with trio.fail_after(VERIFY_TIMEOUT_S):
        connection = await connect_retrying(port, host)
        try:
            return await read_back_on(connection, keys)
        finally:
            await connection.aclose()


async def read_back_on(connection: RespConnection, keys: list[bytes]) -> list[Reply]:
    """GET every key on ``connection``, pipelined in batches of VERIFY_BATCH."""
    replies: list[Reply] = []
    for at in range(0, len(keys), VERIFY_BATCH):
        batch = keys[at : at + VERIFY_BATCH]
        await connection.send([(b"GET", key) for key in batch])
        replies += [await connection.receive() for _ in batch]
    return replies


async def verify(port: int, stats: LoadStats, config: DemoConfig) -> Verdict:
    """Read back every acknowledged write from whoever serves ``port`` now."""
    counters = [counter_key(c) for c in range(stats.clients)]
    sets = list(stats.acked_sets.items())
    try:
        replies = await read_back(port, counters + [key for key, _ in sets])
    except trio.TooSlowError:
        raise DemoError(
            f"the service on {HOST}:{port} did not answer within {VERIFY_TIMEOUT_S:g} s "
            "after the failover"
        ) from None
    except CONNECTION_ERRORS as exc:
        raise DemoError(f"reading the writes back failed: {exc}") from None
    found_incrs = extra_incrs = 0
    for client, reply in enumerate(replies[: len(counters)]):
        acked, unanswered = stats.acked_incrs[client], stats.unanswered_incrs[client]
        value = int(reply) if isinstance(reply, bytes) else 0
        found_incrs += min(value, acked)
        extra_incrs += max(0, value - acked - unanswered)
        structlog.get_logger().debug(
            "counter_checked", client=client, acked=acked, unanswered=unanswered, value=value
        )
    found_sets = sum(
        reply == value for (_, value), reply in zip(sets, replies[len(counters) :], strict=True)
    )
    return Verdict(
        output_rule=config.output_rule,
        acked_incrs=sum(stats.acked_incrs),
        found_incrs=found_incrs,
        acked_sets=len(sets),
        found_sets=found_sets,
        extra_incrs=extra_incrs,
        failover_s=stats.failover_s,
        replies=stats.replies,
        reconnects=stats.reconnects,
        ship_delay_ms=config.ship_delay_ms,
        duration_s=0.0,
    )


@dataclass(frozen=True)
class PacketVerdict:
    """``--packet``: one connection through the failover, and what it was told."""

    failure: str  # "kill" or "partition"
    service: str
    client: str
    connection_error: str | None  # None: the connection survived
    read_back_on: str  # "the same connection", or "a new connection" if it broke
    acked_incrs: int
    counter: int  # the counter's value read back at the end
    unanswered_incrs: int  # 1 if the connection broke during an INCR
    acked_sets: int
    found_sets: int
    requests: int
    wrong: tuple[str, ...]
    wrong_replies: int
    failover_s: float | None
    retransmissions: int | None
    rate_pair: float | None  # replies per second while the pair served
    rate_alone: float | None  # the same after the failover, the new primary alone
    duration_s: float

    @property
    def survived(self) -> bool:
        return self.connection_error is None

    @property
    def acked(self) -> int:
        return self.acked_incrs + self.acked_sets

    @property
    def found(self) -> int:
        return min(self.counter, self.acked_incrs) + self.found_sets

    @property
    def lost(self) -> int:
        return self.acked - self.found

    @property
    def extra_incrs(self) -> int:
        """Increments beyond those sent: a request applied twice."""
        return max(0, self.counter - self.acked_incrs - self.unanswered_incrs)

    @property
    def passed(self) -> bool:
        """One connection, never broken, every reply right, every write there once."""
        return self.survived and not self.wrong_replies and not self.lost and not self.extra_incrs

    @property
    def what(self) -> str:
        return (
            "partition of the primary" if self.failure == "partition" else "kill -9 of the primary"
        )

    @property
    def title(self) -> str:
        return f"packet mode, {self.what}"

    def summary(self) -> str:
        if self.passed:
            return (
                f"one connection survived the {self.what}: no reset, every reply correct, "
                "no acknowledged write lost"
            )
        problems = [] if self.survived else [f"the connection broke ({self.connection_error})"]
        if self.wrong_replies:
            problems.append(f"{self.wrong_replies} wrong replies")
        if self.lost:
            problems.append(f"{self.lost} acknowledged writes lost")
        if self.extra_incrs:
            problems.append(f"{self.extra_incrs} increments applied twice")
        return ", ".join(problems)

    def rows(self) -> list[tuple[str, RenderableType]]:
        state = (
            Text("kept open throughout", style="green")
            if self.survived
            else Text(f"broken: {self.connection_error}", style="red")
        )
        rows: list[tuple[str, RenderableType]] = [
            ("connection", Text.assemble(f"1, {self.client} → {self.service}, ", state)),
            (
                "requests answered",
                Text.assemble(
                    f"{self.requests:,}, 0 reconnects, ",
                    (f"{self.wrong_replies} wrong", "red" if self.wrong_replies else "green"),
                ),
            ),
            (
                "INCR counter",
                f"{self.acked_incrs:,} INCRs answered in sequence, read back {self.counter:,}",
            ),
            (
                "acknowledged writes",
                f"{self.acked:,}  ({self.acked_incrs:,} INCR, {self.acked_sets:,} SET)",
            ),
            ("found after failover", f"{self.found:,}, read back on {self.read_back_on}"),
            ("lost", _lost_cell(self.lost)),
            ("failover (client's view)", seconds(self.failover_s)),
        ]
        if self.rate_pair is not None and self.rate_alone is not None:
            rows.append(
                (
                    "requests per second",
                    f"{self.rate_pair:,.0f} with the backup, {self.rate_alone:,.0f} alone after",
                )
            )
        if self.retransmissions is not None:
            rows.append(("client TCP retransmissions", f"{self.retransmissions:,}"))
        return rows

    def notes(self) -> list[Text]:
        notes = [Text(f"wrong reply: {w}", style="red") for w in self.wrong]
        if self.passed:
            notes.append(
                Text(
                    "The client's kernel never saw the failover: the backup's guest had "
                    "replayed the primary's, its TCP state included, took over the virtual "
                    "IP with a gratuitous ARP, and the client's retransmissions reached it.",
                    style="dim",
                )
            )
        return notes

    def as_json(self) -> dict[str, Any]:
        return verdict_json(
            mode="packet",
            passed=self.passed,
            verdict=self.summary(),
            output_rule=True,
            failure=self.failure,
            acked=self.acked,
            found=self.found,
            lost=self.lost,
            failover_s=None if self.failover_s is None else round(self.failover_s, 4),
            acked_incrs=self.acked_incrs,
            found_incrs=self.counter,
            extra_incrs=self.extra_incrs,
            acked_sets=self.acked_sets,
            found_sets=self.found_sets,
            requests=self.requests,
            reconnects=0 if self.survived else 1,
            connections=1,
            wrong_replies=self.wrong_replies,
            wrong=list(self.wrong),
            read_back_on=self.read_back_on,
            connection_survived=self.survived,
            connection_error=self.connection_error,
            client=self.client,
            service=self.service,
            client_retransmissions=self.retransmissions,
            req_per_s_pair=None if self.rate_pair is None else round(self.rate_pair, 1),
            req_per_s_alone=None if self.rate_alone is None else round(self.rate_alone, 1),
            duration_s=round(self.duration_s, 3),
        )


async def verify_connection(load: ConnectionLoad, failure: str) -> PacketVerdict:
    """Read every acknowledged write back, on the load's own connection if it lives."""
    stats = load.stats
    keys = [counter_key(0), *stats.acked_sets]
    replies: list[Reply] | None = None
    where = "the same connection"
    if load.error is None and load.connection is not None:
        try:
            with trio.fail_after(VERIFY_TIMEOUT_S):
                replies = await read_back_on(load.connection, keys)
        except CONNECTION_ERRORS as exc:
            load.error = f"reading back: {describe_connection_error(exc, VERIFY_TIMEOUT_S)}"
    if replies is None:  # the connection broke: still count what was lost
        where = "a new connection"
        try:
            replies = await read_back(load.port, keys, load.host)
        except trio.TooSlowError:
            raise DemoError(
                f"the service on {load.host}:{load.port} did not answer within "
                f"{VERIFY_TIMEOUT_S:g} s after the failover (and the connection broke: "
                f"{load.error})"
            ) from None
        except CONNECTION_ERRORS as exc:
            raise DemoError(f"reading the writes back failed: {exc}") from None
    if load.connection is not None:
        await load.connection.aclose()
    counter = int(replies[0]) if isinstance(replies[0], bytes) else 0
    found_sets = sum(
        reply == value for value, reply in zip(stats.acked_sets.values(), replies[1:], strict=True)
    )
    rate_pair, rate_alone = load.rates()
    return PacketVerdict(
        failure=failure,
        service=f"{load.host}:{load.port}",
        client=load.client_address,
        connection_error=load.error,
        read_back_on=where,
        acked_incrs=stats.acked_incrs[0],
        counter=counter,
        unanswered_incrs=stats.unanswered_incrs[0],
        acked_sets=len(stats.acked_sets),
        found_sets=found_sets,
        requests=stats.replies,
        wrong=tuple(load.wrong),
        wrong_replies=load.wrong_count,
        failover_s=stats.failover_s,
        retransmissions=load.retransmissions,
        rate_pair=rate_pair,
        rate_alone=rate_alone,
        duration_s=0.0,
    )


@dataclass(frozen=True)
class EtcdDecision:
    """What etcd holds for the pair's generation after the failover."""

    address: str
    members: int
    members_killed: int
    key: str
    winner: str | None
    backup: str  # the backup's candidate name, which should be the winner
