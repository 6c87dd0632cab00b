"""redis-benchmark's report, parsed; a run too short for its clock is run again, longer.

redis-benchmark times a run on a millisecond clock: a run that ends within one
tick prints "inf requests per second" (16 pipelined GETs on a bare kv.py do so
most of the time here). The bench must neither read that as a rate nor fail
the cell on it.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from bench import load as bm
from bench.load import Load, Op
from bench.services import start_bare

# A real report of such a run (kv.py, -t get -n 16 -c 1 -P 16), its progress line cut.
TOO_SHORT_REPORT = """\
====== GET ======
  16 requests completed in 0.00 seconds
  1 parallel clients
  16 bytes payload
  keep alive: 1
  multi-thread: no
Latency by percentile distribution:
0.000% <= 0.343 milliseconds (cumulative count 16)
100.000% <= 0.343 milliseconds (cumulative count 16)
Cumulative distribution of latencies:
0.000% <= 0.103 milliseconds (cumulative count 0)
100.000% <= 0.407 milliseconds (cumulative count 16)
Summary:
  throughput summary: inf requests per second
  latency summary (msec):
          avg       min       p50       p95       p99       max
        0.340     0.336     0.343     0.343     0.343     0.343
"""


def test_a_report_with_no_rate_says_it_was_too_short_to_time() -> None:
    with pytest.raises(bm.TooShortToTime, match="16 requests completed within"):
        bm.parse(TOO_SHORT_REPORT)


def test_a_timed_report_is_read() -> None:
    timed = TOO_SHORT_REPORT.replace("inf requests", "16000.00 requests")
    result = bm.parse(timed)
    assert (result.requests, result.rps, result.p50_ms, result.max_ms) == (
        16,
        16000.0,
        0.343,
        0.343,
    )
    assert result.cdf == [(0.103, 0.0), (0.343, 1.0), (0.407, 1.0)]


@pytest.mark.parametrize("missing", ["requests completed", "throughput summary"])
def test_a_report_without_its_totals_is_refused_by_what_it_lacks(missing: str) -> None:
    cut = "\n".join(line for line in TOO_SHORT_REPORT.splitlines() if missing not in line)
    with pytest.raises(ValueError, match="redis-benchmark printed no line with"):
        bm.parse(cut)


@pytest.mark.skipif(
    shutil.which("redis-benchmark") is None,
    reason="redis-benchmark is not installed (apt-get install redis-tools)",
)
@pytest.mark.timeout(120)
def test_runs_too_short_to_time_are_lengthened_until_they_have_a_rate(tmp_path: Path) -> None:
    service = start_bare(tmp_path)
    try:
        service.ready()
        results = [
            bm.run(service.port, Load("c=1 P=16", 1, 16), Op("get", 16), 16) for _ in range(20)
        ]
    finally:
        service.stop()
    for result in results:
        assert math.isfinite(result.rps) and result.rps > 0, result
        assert result.requests >= 16 and result.requests % 16 == 0, result
