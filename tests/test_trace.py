"""The breakdown's stamps (ftproxy.guest._trace) in a process of their own, as a
supervisor or guest has them: stamped into a file that survives the process, and
paused by whoever holds the trace directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ftproxy.guest import _trace

STAMPING = """
import sys
from ftproxy.guest import _trace
assert _trace.enable("sup")
for stage in (1, 2, 3):
    _trace.stamp(stage, 10)
_trace.pause(sys.argv[1], True)
_trace.stamp(4, 11)  # paused: not kept
_trace.pause(sys.argv[1], False)
_trace.stamp(5, 12)
"""


def test_stamps_are_kept_unless_the_directory_is_paused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", STAMPING, str(tmp_path)],
        env={**os.environ, _trace.ENV: str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (trace,) = tmp_path.glob("sup-*.trace")
    records = _trace.read(str(trace))
    assert [(stage, seq) for stage, seq, _ in records] == [(1, 10), (2, 10), (3, 10), (5, 12)]
    times = [ns for _, _, ns in records]
    assert times == sorted(times)
