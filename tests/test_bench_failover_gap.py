"""The gap in service across a kill, as bench/ measures it, its picture, and the
logs a slow kill keeps.

A full run once ended in a traceback: in the etcd-arbiter cell the old primary
still answered a request sent 61 us after the kill's timestamp, so "first reply
after - last reply before" came out negative, and the failover histogram's log
axis could not take it (after the figures were saved, with no picture).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import failover, plot, report
from bench.__main__ import save
from bench.clients import reply_gap
from bench.services import Arbiter


def test_the_gap_runs_from_the_last_reply_before_to_the_first_after() -> None:
    requests = [(1.0, 1.1), (1.2, 1.3), (2.5, 2.9), (2.6, 2.7)]
    assert reply_gap(requests, 2.0) == 2.7 - 1.3


def test_the_requests_may_come_as_a_generator_read_once() -> None:
    requests = [(1.0, 1.1), (1.2, 1.3), (2.5, 2.9), (2.6, 2.7)]
    assert reply_gap((request for request in requests), 2.0) == 2.7 - 1.3


def test_replies_that_overlap_the_moment_are_no_gap_at_all() -> None:
    # Sent after the moment, answered by the old server before its last reply to
    # a request sent earlier: the measured figure from that run, not negative.
    requests = [(9.9, 10.2), (10.05, 10.1)]
    assert reply_gap(requests, 10.0) == 0.0


def test_without_replies_on_both_sides_there_is_no_gap_to_tell() -> None:
    assert reply_gap([(1.0, 1.1), (3.0, None)], 2.0) is None
    assert reply_gap([], 2.0) is None


def test_the_failover_picture_leaves_out_gaps_of_zero(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result: dict[str, Any] = {
        "failover": {
            "output-rule": {"trials": [{"failover_s": 0.012}, {"failover_s": 0.018}]},
            "output-rule-etcd": {"trials": [{"failover_s": 0.0}, {"failover_s": 0.015}]},
            "pyraft": {"trials": [{"failover_s": None}]},
        }
    }
    fig, ax = plt.subplots()
    plot._failover_histogram(ax, result)
    fig.savefig(tmp_path / "failover.png")
    plt.close(fig)
    assert (tmp_path / "failover.png").stat().st_size > 0


def test_a_picture_that_cannot_be_drawn_keeps_the_figures_and_says_so(
    tmp_path: Path, capsys: Any
) -> None:
    figures = {"taken": "2026-12-07T18:40:43Z"}  # nothing to draw from
    paths = save(figures, tmp_path / "run.json")
    assert paths == [tmp_path / "run.json"]
    assert (tmp_path / "run.json").read_text().startswith("{")
    said = capsys.readouterr().err
    assert "was not drawn" in said and "python -m bench.plot" in said


def _one_kill(scratch: Path, slow_s: float) -> dict[str, Any]:
    arbiter = Arbiter(scratch).start()
    try:
        arbiter.wait_listening()
        return failover.ftproxy_series(
            "rule",
            scratch,
            arbiter,
            output_rule=True,
            trials=1,
            seed=3,
            keep_slow=scratch / "kept",
            slow_s=slow_s,
        )
    finally:
        arbiter.stop()


def test_a_kill_slower_than_the_bound_keeps_its_pairs_logs(tmp_path: Path) -> None:
    # Every kill is "slow" against a bound of 0: the real pair's logs, as they were
    # when it stopped, must be kept and named, the backup's saying it went live.
    series = _one_kill(tmp_path, slow_s=0.0)
    (trial,) = series["trials"]
    assert trial["lost_acknowledged_writes"] == 0
    kept = Path(trial["logs"])
    assert kept == tmp_path / "kept" / "rule-trial1"
    names = sorted(path.name for path in kept.iterdir())
    assert any(name.endswith("-backup.stderr") for name in names), names
    assert any(name.endswith("-primary.stderr") for name in names), names
    assert any(name.startswith("arbiter-") for name in names), names
    (backup_log,) = kept.glob("*-backup.stderr")
    assert '"event": "primary_lost"' in backup_log.read_text()
    result = {"failover": {"output-rule": series}}
    (line,) = report.slow_kill_lines(result)
    assert line.startswith("Slow kill: rule, kill 1, ") and str(kept) in line


def test_a_kill_within_the_bound_keeps_nothing(tmp_path: Path) -> None:
    series = _one_kill(tmp_path, slow_s=30.0)
    (trial,) = series["trials"]
    assert trial["failover_s"] is not None and "logs" not in trial
    assert not (tmp_path / "kept").exists()
    assert report.slow_kill_lines({"failover": {"output-rule": series}}) == []
