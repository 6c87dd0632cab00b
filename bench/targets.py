"""Issue 12's targets, each met, MISSED or not measured, from one run's own figures.

Every target is evaluated from this run's cells (and failover series); a miss
carries its measured reason, from the same run: the 1-client critical-path
breakdown (``bench/breakdown.py``) and the machine's floors (``bench/floors.py``).

The verdict is strict: a target is *met* only when every figure it needs was
measured and meets it; *MISSED* as soon as one measured figure misses it (even
if others are missing); otherwise *not measured*, with why (a cell failed, an
alternative is not installed). Pure functions of a result's parts, so that a
saved run can be judged again and the logic tested on hand-built results.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.plan import BARE, LOADS, NO_RULE, RECORD, RULE, RULE_SILENT, SHORT
from bench.summary import geomean, supported

Cell = dict[str, Any]
Configs = dict[str, dict[str, Any]]
RAFT = ("pyraft", "pysyncobj")
ONE, FIFTY = LOADS[0].name, LOADS[1].name  # "c=1", "c=50"
MET, MISSED, NOT_MEASURED = "met", "MISSED", "not measured"


def _label(cell: Cell) -> str:
    return str(cell["label"])


def _at(configs: Configs, name: str, load: str) -> tuple[dict[str, Cell], list[str]]:
    """A configuration's supported cells at ``load`` by label, and what keeps others out."""
    config = configs.get(name)
    if config is None:
        return {}, [f"{SHORT.get(name, name)} was not run"]
    if not config.get("available", True):
        return {}, [f"{SHORT.get(name, name)} not available: {config.get('reason')}"]
    cells = [c for c in config.get("cells", []) if c["load"] == load]
    problems = [
        f"{SHORT.get(name, name)} {load} {_label(c)} failed: {c.get('reason')}"
        for c in cells
        if c.get("failed")
    ]
    return {_label(c): c for c in supported(cells)}, problems


def _verdict(
    name: str,
    figure: float | None,
    limit: float,
    op: str,
    detail: str,
    unmeasured: list[str],
) -> dict[str, Any]:
    if figure is None:
        status = NOT_MEASURED
        unmeasured = unmeasured or ["no cell of this run measured it"]
    elif not (figure <= limit if op == "<=" else figure >= limit):
        status = MISSED
    else:
        status = NOT_MEASURED if unmeasured else MET
    if unmeasured:
        missing = "; ".join(unmeasured)
        detail = f"{detail}; not measured: {missing}" if detail else missing
    return {
        "target": name,
        "figure": figure,
        "limit": limit,
        "op": op,
        "status": status,
        "met": {MET: True, MISSED: False, NOT_MEASURED: None}[status],
        "detail": detail,
        "reason": None,
    }


# -- the measured reasons ------------------------------------------------------------


class Evidence:
    """The run's breakdown and floors, as the sentences a missed target's reason uses."""

    # Stages that sum or overlap others: never "the largest stage".
    AGGREGATES = (
        "total (client's round trip)",
        "log round trip (shipped -> ack)",
        "output held (taken -> released)",
        "backup decoded -> primary has the ack",
    )
    LOG_PARTS = ("entry shipped -> backup decoded it", "backup decoded -> its ack sent")

    def __init__(self, breakdown: dict[str, Any] | None, floors: dict[str, Any] | None) -> None:
        self.breakdown = breakdown
        self.floors = floors

    def result(self, config: str) -> dict[str, Any] | None:
        if not self.breakdown:
            return None
        found = self.breakdown.get("results", {}).get(f"{SHORT[config]}@this")
        return found if isinstance(found, dict) else None

    def stages(self, config: str) -> dict[str, float]:
        result = self.result(config)
        if result is None:
            return {}
        return {
            row["stage"]: float(row["p50_us"])
            for row in result.get("stages", [])
            if row.get("p50_us") is not None
        }

    def path(self, config: str, top: int = 3) -> str:
        """The breakdown's client round trip, log round trip and largest stages."""
        stages = self.stages(config)
        result = self.result(config)
        if not stages or result is None:
            return f"breakdown of {SHORT[config]}: {self.missing()}"
        parts = [f"client round trip {_us(stages.get(self.AGGREGATES[0]))}"]
        if self.AGGREGATES[1] in stages:
            parts.append(
                f"log round trip {_us(stages[self.AGGREGATES[1]])} (shipped -> backup decoded "
                f"{_us(stages.get(self.LOG_PARTS[0]))}, backup decoded -> its ack sent "
                f"{_us(stages.get(self.LOG_PARTS[1]))})"
            )
        if self.AGGREGATES[2] in stages:
            parts.append(f"output held {_us(stages[self.AGGREGATES[2]])}")
        shown = (*self.AGGREGATES, *self.LOG_PARTS)
        own = sorted(((v, k) for k, v in stages.items() if k not in shown), reverse=True)
        parts.append("largest stages: " + ", ".join(f"{k} {_us(v)}" for v, k in own[:top]))
        cpu = result.get("cpu_us_per_request") or [None, None]
        side = f"primary {cpu[0]}" + ("" if config == RECORD else f", backup {cpu[1]}")
        parts.append(f"CPU us/req {side}")
        return f"breakdown {SHORT[config]} (1-client SET 16 B, p50): " + "; ".join(parts)

    def missing(self) -> str:
        error = (self.breakdown or {}).get("error")
        return f"not measured ({error})" if error else "not measured in this run"

    def floor(self, name: str) -> str:
        if not self.floors or name not in self.floors:
            return "n/a"
        return _us(self.floors[name]["p50_us"])

    def stage_sum(self, config: str, names: tuple[str, ...]) -> str:
        stages = self.stages(config)
        values = [stages.get(n) for n in names]
        shown = ", ".join(f"{n} {_us(v)}" for n, v in zip(names, values, strict=True))
        total = sum(v for v in values if v is not None)
        return f"{shown} (sum {_us(total)})"

    def relay_line(self) -> str:
        """The least a process hop between client and guest costs: the TCP echo relayed
        over a pipe by a process that does nothing else, against the echo alone."""
        f = self.floors or {}
        if "relay_epoll" not in f or "tcp_epoll" not in f:
            return ""
        relay, echo = f["relay_epoll"]["p50_us"], f["tcp_epoll"]["p50_us"]
        line = (
            "; the TCP echo relayed over a pipe to another process and back by a process "
            f"that does nothing else, in a plain epoll loop: {_us(relay)} against "
            f"{_us(echo)} for the echo alone ({echo / relay:.2f}x)"
        )
        if "relay_trio" in f:
            line += f", {_us(f['relay_trio']['p50_us'])} with the relay in a trio loop"
        return line

    def floor_line(self) -> str:
        if not self.floors or "tcp" not in self.floors:
            error = (self.floors or {}).get("error")
            return f"floors: not measured ({error})" if error else "floors: not measured"
        f = self.floors
        line = (
            f"floors: loopback TCP round trip {_us(f['tcp']['p50_us'])}, pipe round trip "
            f"{_us(f['pipe']['p50_us'])} ({_us(f['pipe_pinned']['p50_us'])} with both "
            "processes on one CPU)"
        )
        if "tcp_trio" in f and "tcp_epoll" in f:
            line += (
                f"; the TCP round trip with the echo in a trio loop {_us(f['tcp_trio']['p50_us'])}"
                f", in a plain epoll loop {_us(f['tcp_epoll']['p50_us'])}"
            )
        return line


# -- the targets ---------------------------------------------------------------------


def _reads_out_of_reach(configs: Configs, peer: str, load: str) -> str:
    """When the unreplicated service itself answers GET slower than ``peer`` does, no
    replication of reads can catch up with a peer that does not replicate them: say so."""
    bare, _ = _at(configs, BARE, load)
    theirs, _ = _at(configs, peer, load)
    reads = [k for k in bare if k.startswith("GET") and k in theirs]
    bare_rps = geomean(bare[k]["rps"] for k in reads)
    peer_rps = geomean(theirs[k]["rps"] for k in reads)
    if bare_rps is None or peer_rps is None or bare_rps > peer_rps:
        return ""
    return (
        f"; on GET even the unreplicated service (bare) answers {bare_rps:,.0f} req/s to "
        f"{peer}'s {peer_rps:,.0f}: every request the guest sees is an input the pair logs, "
        "so on GET no pair passes a peer that reads off its log (the mean is met only by "
        "winning on writes by more than that)"
    )


def _vs_raft(configs: Configs, load: str, factor: float, evidence: Evidence) -> dict[str, Any]:
    """rule's req/s at ``load`` against the best Raft peer's, over the ops both answer."""
    rule, unmeasured = _at(configs, RULE, load)
    compared: dict[str, dict[str, Any]] = {}
    for peer in RAFT:
        cells, problems = _at(configs, peer, load)
        unmeasured += problems
        common = [k for k in rule if k in cells]
        if not common:
            if cells:
                unmeasured.append(f"{peer}: no operation in common with rule at {load}")
            continue
        mine, theirs = [rule[k] for k in common], [cells[k] for k in common]
        rule_rps, peer_rps = geomean(c["rps"] for c in mine), geomean(c["rps"] for c in theirs)
        if rule_rps is None or peer_rps is None:
            continue
        writes = [k for k in common if not k.startswith("GET")]
        compared[peer] = {
            "writes_ratio": geomean(rule[k]["rps"] / cells[k]["rps"] for k in writes)
            if writes
            else None,
            "writes": ", ".join(writes),
            "ratio": rule_rps / peer_rps,
            "rule_rps": rule_rps,
            "peer_rps": peer_rps,
            "rule_p50": geomean(c["p50_ms"] for c in mine),
            "peer_p50": geomean(c["p50_ms"] for c in theirs),
            "rule_cpu": _cpu(mine),
            "peer_cpu": _cpu(theirs),
            "per_op": ", ".join(
                f"{k} {rule[k]['rps']:,.0f} vs {cells[k]['rps']:,.0f}" for k in common
            ),
        }
    name = (
        f"rule, {load}: req/s >= "
        + ("" if factor == 1 else f"{factor:g}x ")
        + "the best Raft peer's (pyraft, pysyncobj)"
    )
    if not compared:
        return _verdict(name, None, factor, ">=", "", unmeasured)
    best = min(compared, key=lambda p: compared[p]["ratio"])
    b = compared[best]
    detail = (
        f"rule {b['rule_rps']:,.0f} req/s, p50 {_ms(b['rule_p50'])} vs {best} "
        f"{b['peer_rps']:,.0f} req/s, p50 {_ms(b['peer_p50'])} (geometric mean over "
        f"the ops both answer; per op, rule vs {best}: {b['per_op']})"
    )
    if b["writes_ratio"] is not None:
        # Both Raft peers answer GET from the leader's memory, off the log (pyraft 1.0.0's
        # 'r' handlers, the PySyncObj store's plain method): only writes are replicated
        # on both sides, so they are the like-for-like figure.
        detail += (
            f"; on writes alone ({b['writes']}: what both replicate; {best} answers GET "
            f"from the leader's memory, off its log) rule is {b['writes_ratio']:.2f}x {best}"
        )
        detail += _reads_out_of_reach(configs, best, load)
    for peer, other in compared.items():
        if peer != best:
            detail += (
                f"; {peer} {other['peer_rps']:,.0f} req/s, p50 {_ms(other['peer_p50'])} "
                f"(rule {other['ratio']:.2f}x)"
            )
    target = _verdict(name, b["ratio"], factor, ">=", detail, unmeasured)
    if target["status"] == MISSED:
        if load == ONE:
            gap = (b["rule_p50"] - b["peer_p50"]) * 1000
            target["reason"] = (
                f"rule p50 {_ms(b['rule_p50'])} vs {best} {_ms(b['peer_p50'])}: "
                f"{gap:,.0f} us more per request; {evidence.path(RULE)}; rule's path makes "
                "2 TCP round trips (client, log channel) and 1 pipe round trip (guest), "
                f"{evidence.floor_line()}"
            )
        else:
            rule_cpu, peer_cpu = b["rule_cpu"], b["peer_cpu"]
            target["reason"] = (
                f"CPU is the limit at {load}: rule {_cpu_text(rule_cpu)} us/req "
                f"(primary + backup), {best} {_cpu_text(peer_cpu)} (leader + followers); "
                f"2 CPUs give at most {_cap(rule_cpu)} req/s to rule's "
                f"{_cpu_total(rule_cpu):,.0f} us per request, load generator not counted "
                f"(measured {b['rule_rps']:,.0f}), and {best} reaches {b['peer_rps']:,.0f} "
                f"(p50 {_ms(b['peer_p50'])}); {factor:g}x {best} would be "
                f"{factor * b['peer_rps']:,.0f} req/s"
            )
    return target


def _record_vs_bare(configs: Configs, load: str, evidence: Evidence) -> dict[str, Any]:
    record, unmeasured = _at(configs, RECORD, load)
    bare, problems = _at(configs, BARE, load)
    unmeasured += problems
    common = [k for k in record if k in bare]
    figure = geomean(record[k]["rps"] / bare[k]["rps"] for k in common) if common else None
    mine, theirs = [record[k] for k in common], [bare[k] for k in common]
    detail = (
        f"record {_rate(mine)} req/s, p50 {_ms(_p50(mine))} vs bare {_rate(theirs)}, "
        f"p50 {_ms(_p50(theirs))}; per op: "
        + ", ".join(f"{k} {record[k]['rps'] / bare[k]['rps']:.2f}x" for k in common)
        if common
        else ""
    )
    target = _verdict(
        f"record / bare throughput >= 0.67x, {load}", figure, 0.67, ">=", detail, unmeasured
    )
    if target["status"] == MISSED:
        added = (_p50(mine) or 0) - (_p50(theirs) or 0)
        record_cpu, bare_cpu = _cpu(mine), _cpu(theirs)
        target["reason"] = (
            f"bare p50 {_ms(_p50(theirs))}, record p50 {_ms(_p50(mine))} (+{added * 1000:,.0f} "
            f"us); CPU us/req at {load}: record {_cpu_text(record_cpu)} (supervisor and guest) "
            f"vs bare {_cpu_text(bare_cpu)}; record's path adds a supervisor between client "
            "and guest: "
            + evidence.stage_sum(RECORD, ("pipe hop to the guest", "pipe hop back (output taken)"))
            + f" against a pipe round-trip floor of {evidence.floor('pipe')} "
            + f"({evidence.floor('pipe_pinned')} on one CPU), and the supervisor's own stages "
            + evidence.stage_sum(
                RECORD,
                (
                    "client -> supervisor wakes",
                    "wake -> recv of the request",
                    "recv -> reply written to guest pipe",
                    "output taken -> client write",
                ),
            )
            + f"; {evidence.path(RECORD)}; bare's path: 1 TCP round trip, floor "
            + evidence.floor("tcp")
            + evidence.relay_line()
        )
    return target


def _added_latency(configs: Configs, evidence: Evidence) -> dict[str, Any]:
    rule, unmeasured = _at(configs, RULE, ONE)
    no_rule, problems = _at(configs, NO_RULE, ONE)
    unmeasured += problems
    common = [k for k in rule if k in no_rule]
    added = {k: rule[k]["p50_ms"] - no_rule[k]["p50_ms"] for k in common}
    rtts = [rule[k].get("channel_rtt_ms_p50") for k in common]
    added_ms = statistics.median(added.values()) if added else None
    present = [r for r in rtts if r is not None]
    rtt = statistics.median(present) if present else None
    if common and not present:
        unmeasured.append("rule reported no log-channel RTT")
    figure = added_ms / rtt if added_ms is not None and rtt else None
    detail = (
        f"added {_ms(added_ms)} (median over the 1-client cells: "
        + ", ".join(f"{k} {v * 1000:,.0f} us" for k, v in added.items())
        + f"), log-channel RTT p50 {_ms(rtt)} (rule's own, median over the cells)"
        if common
        else ""
    )
    target = _verdict(
        f"p50 added by the output rule / log-channel RTT p50 <= 1.0x, {ONE}",
        figure,
        1.0,
        "<=",
        detail,
        unmeasured,
    )
    if target["status"] == MISSED:
        with_rule, without = evidence.result(RULE), evidence.result(NO_RULE)
        stages = evidence.stages(RULE)
        if with_rule is not None and without is not None:
            bd = (
                f"breakdown client p50 rule {_us(with_rule.get('client_p50_us'))} vs no-rule "
                f"{_us(without.get('client_p50_us'))}; rule's output held (taken -> released) "
                f"{_us(stages.get('output held (taken -> released)'))}, log round trip "
                f"{_us(stages.get('log round trip (shipped -> ack)'))}, ack -> output released "
                f"{_us(stages.get('ack -> output released'))}"
            )
        else:
            bd = f"breakdown: {evidence.missing()}"
        target["reason"] = (
            f"added {_ms(added_ms)} vs log RTT {_ms(rtt)}: the output waits "
            f"{((added_ms or 0) - (rtt or 0)) * 1000:,.0f} us beyond one round trip; {bd}; "
            f"{evidence.floor_line()}"
        )
    return target


def _rounds(cell: Cell) -> list[float | None]:
    by_round = cell.get("rps_by_round")
    if isinstance(by_round, list):
        return by_round
    return list(cell.get("rps_rounds") or [cell["rps"]])


def _every_round(configs: Configs) -> dict[str, Any]:
    rule, unmeasured = _at(configs, RULE, FIFTY)
    no_rule, problems = _at(configs, NO_RULE, FIFTY)
    unmeasured += problems
    common = [k for k in rule if k in no_rule]
    count = max((len(_rounds(c)) for c in [*rule.values(), *no_rule.values()]), default=0)
    per_round: list[float | None] = []
    cells: list[tuple[float, str, int]] = []
    for i in range(count):
        ratios = []
        for k in common:
            a, b = _nth(_rounds(rule[k]), i), _nth(_rounds(no_rule[k]), i)
            if a is None or b is None:
                unmeasured.append(f"round {i + 1} {k}: a side failed or was not measured")
                continue
            ratios.append(a / b)
            cells.append((a / b, k, i + 1))
        per_round.append(geomean(ratios) if len(ratios) == len(common) and common else None)
    measured = [r for r in per_round if r is not None]
    figure = min(measured) if measured else None
    detail = ""
    if per_round:
        shown = ", ".join(
            f"round {i + 1} {'-' if r is None else f'{r:.2f}x'}" for i, r in enumerate(per_round)
        )
        detail = f"per round (geometric mean over {len(common)} ops): {shown}"
        if measured and figure is not None:
            detail += f"; worst round {per_round.index(figure) + 1}"
        if cells:
            worst = min(cells)
            detail += f"; worst single cell {worst[1]} round {worst[2]} {worst[0]:.2f}x"
    target = _verdict(
        f"rule / no-rule throughput >= 0.95x in every round, {FIFTY}",
        figure,
        0.95,
        ">=",
        detail,
        unmeasured,
    )
    if target["status"] == MISSED:
        mine, theirs = [rule[k] for k in common], [no_rule[k] for k in common]
        noise = _round_spread(configs, BARE, FIFTY)
        target["reason"] = (
            f"CPU us/req at {FIFTY}: rule {_cpu_text(_cpu(mine))} vs no-rule "
            f"{_cpu_text(_cpu(theirs))} (primary + backup); log RTT p50 rule "
            f"{_ms(_median_of(mine, 'channel_rtt_ms_p50'))} vs no-rule "
            f"{_ms(_median_of(theirs, 'channel_rtt_ms_p50'))}; backup lag p99 rule "
            f"{_ms(_max_of(mine, 'lag_ms_p99'))} vs no-rule {_ms(_max_of(theirs, 'lag_ms_p99'))}"
            f"; the machine's noise in the same rounds: {noise}"
        )
    return target


def _round_spread(configs: Configs, name: str, load: str) -> str:
    """How far one configuration's own throughput moved from round to round."""
    cells, _ = _at(configs, name, load)
    rounds = [_rounds(c) for c in cells.values()]
    count = max((len(r) for r in rounds), default=0)
    per_round = [geomean(_nth(r, i) for r in rounds) for i in range(count)]
    present = [r for r in per_round if r is not None]
    if len(present) < 2:
        return f"{SHORT[name]} measured in fewer than two rounds"
    return (
        f"{SHORT[name]} {load} went {min(present):,.0f}-{max(present):,.0f} req/s over "
        f"{len(present)} rounds ({max(present) / min(present):.2f}x)"
    )


def _failover(failover: dict[str, Any]) -> dict[str, Any]:
    series = failover.get(RULE, {})
    p50 = (series.get("failover_s") or {}).get("p50")
    lost = series.get("lost_acknowledged_writes")
    unmeasured = [] if series.get("trials") else ["no failover series ran"]
    failed = series.get("failed", 0)
    silent = failover.get(RULE_SILENT) or {}
    detail = (
        f"p50 {_s(p50)} over {series.get('completed', 0)} kills, {failed} failed; lost "
        f"acknowledged writes {lost} (--no-output-rule: "
        f"{failover.get(NO_RULE, {}).get('lost_acknowledged_writes')}); silent primary "
        "(SIGSTOP, detected by the 500 ms heartbeat timeout): p50 "
        f"{_s((silent.get('failover_s') or {}).get('p50'))}, lost "
        f"{silent.get('lost_acknowledged_writes')}"
    )
    target = _verdict(
        "failover p50 <= 0.7 s, 0 lost acknowledged writes in every run",
        p50,
        0.7,
        "<=",
        detail,
        unmeasured,
    )
    if series.get("trials") and (lost or failed):  # whatever the time says
        target.update(status=MISSED, met=False)
    if target["status"] == MISSED:
        target["reason"] = detail
    return target


def _log_bytes(configs: Configs) -> dict[str, Any]:
    cells, unmeasured = _at(configs, RULE, FIFTY)
    sets = {k: c for k, c in cells.items() if c["op"] == "set"}
    unmeasured = [u for u in unmeasured if " SET " in u]
    ratios = {k: c.get("log_bytes_per_input_byte") for k, c in sets.items()}
    wire = {k: c.get("channel_bytes_per_input_byte") for k, c in sets.items()}
    present = [v for v in ratios.values() if v is not None]
    target = _verdict(
        f"log bytes <= 1.2x client input bytes (SET, {FIFTY})",
        max(present) if present else None,
        1.2,
        "<=",
        "worst of "
        + ", ".join(f"{k} {_x(v)}" for k, v in ratios.items())
        + "; on the wire (TCP bytes, framing and heartbeats included): "
        + ", ".join(f"{k} {_x(v)}" for k, v in wire.items()),
        unmeasured,
    )
    if target["status"] == MISSED:
        target["reason"] = target["detail"]
    return target


def _lag(configs: Configs) -> dict[str, Any]:
    cells, unmeasured = _at(configs, RULE, FIFTY)
    mine = list(cells.values())
    lag, entries = _max_of(mine, "lag_ms_p99"), _max_of(mine, "lag_entries_p99")
    target = _verdict(
        f"backup lag p99 <= 100 ms ({FIFTY})",
        lag,
        100.0,
        "<=",
        f"worst {FIFTY} cell: {_ms(lag)}, {entries} entries",
        unmeasured,
    )
    if target["status"] == MISSED:
        target["reason"] = target["detail"]
    return target


def evaluate(
    configs: Configs,
    failover: dict[str, Any],
    breakdown: dict[str, Any] | None = None,
    floors: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Issue 12's targets, then the older ones that are still product claims."""
    evidence = Evidence(breakdown, floors)
    out = [
        _vs_raft(configs, ONE, 1.0, evidence),
        _vs_raft(configs, FIFTY, 5.0, evidence),
        _record_vs_bare(configs, ONE, evidence),
        _record_vs_bare(configs, FIFTY, evidence),
        _added_latency(configs, evidence),
        _every_round(configs),
        _failover(failover),
        _log_bytes(configs),
        _lag(configs),
    ]
    for target in out:
        if target["status"] == NOT_MEASURED and target["reason"] is None:
            target["reason"] = "not measured: " + target["detail"].rpartition("not measured: ")[2]
    return out


# -- small figures -------------------------------------------------------------------


def _nth(values: list[float | None], i: int) -> float | None:
    return values[i] if i < len(values) else None


def _rate(cells: list[Cell]) -> str:
    value = geomean(c["rps"] for c in cells)
    return "n/a" if value is None else f"{value:,.0f}"


def _p50(cells: list[Cell]) -> float | None:
    return geomean(c["p50_ms"] for c in cells)


def _cpu(cells: list[Cell]) -> tuple[float | None, float | None]:
    """Geometric-mean CPU us/req of the primary side and the backup side."""

    def side(key: str) -> float | None:
        value = geomean(c.get(key) for c in cells)
        return None if value is None else value * 1e6

    return side("cpu_primary_s_per_request"), side("cpu_backup_s_per_request")


def _cpu_total(cpu: tuple[float | None, float | None]) -> float:
    return sum(v for v in cpu if v is not None)


def _cpu_text(cpu: tuple[float | None, float | None]) -> str:
    primary, backup = cpu
    if primary is None:
        return "n/a"
    return f"{primary:,.0f}" if backup is None else f"{primary:,.0f} + {backup:,.0f}"


def _cap(cpu: tuple[float | None, float | None]) -> str:
    total = _cpu_total(cpu)
    return "n/a" if not total else f"{2e6 / total:,.0f}"


def _median_of(cells: list[Cell], key: str) -> float | None:
    present = [c[key] for c in cells if c.get(key) is not None]
    return statistics.median(present) if present else None


def _max_of(cells: list[Cell], key: str) -> float | None:
    present = [c[key] for c in cells if c.get(key) is not None]
    return max(present) if present else None


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} us"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} ms"


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"
