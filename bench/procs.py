"""The benchmark's child processes: ftproxy.tools.procs, the one process harness of the
demo, bench/ and tests/, with the benchmark's defaults (started in the repository)."""

from __future__ import annotations

from pathlib import Path

from ftproxy.tools import procs
from ftproxy.tools.procs import (
    HOST,
    admin_status,
    free_port,
    free_port_block,
    tree_cpu,
    wait_accepting,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "examples" / "kv.py"
FTPROXY = list(procs.FTPROXY_COMMAND)

__all__ = [
    "FTPROXY",
    "HOST",
    "KV",
    "ROOT",
    "Proc",
    "admin_status",
    "free_port",
    "free_port_block",
    "tree_cpu",
    "wait_accepting",
    "wait_until",
]


class Proc(procs.Proc):
    """A child process of the benchmark, started in the repository unless told."""

    def __init__(
        self,
        name: str,
        command: list[str],
        scratch: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        super().__init__(name, command, scratch, env=env, cwd=cwd)
