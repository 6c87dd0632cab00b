"""Fixtures shared by several test modules.

Free ports come from one helper, ``support.free_port`` (bench/procs.py's: below the
ephemeral range, never twice in a run). Virtual time for in-process shell tests is
pytest-trio's own ``autojump_clock`` fixture (``trio.testing.MockClock(autojump_threshold=0)``).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster

# A suite started in the background by a script (``cmd &``, ``nohup``: how CI may run it)
# inherits SIGINT ignored, and so would every process it starts: the demo, the recorder
# and the arbiter would then sit out the SIGINT a test sends them (a user's Ctrl-C). A
# handled signal, unlike an ignored one, is back at its default in an exec'd child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The etcd fixtures (`etcd`, `black_hole`): real clusters, made in tests/etcd_harness.py.
pytest_plugins = ["etcd_harness"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Make ``Cluster(tmp_path, **kwargs)`` (not started); every one made is stopped after
    the test. (tests/test_reprotect.py and tests/test_golive_connections.py define their
    own ``cluster``: a started one, and one per guest shape.)"""
    made: list[Cluster] = []

    def make(**kwargs: Any) -> Cluster:
        c = Cluster(tmp_path, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
