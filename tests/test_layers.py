"""The package's layers, as folder rules: each folder imports only the layers below it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Which of the project's own packages each layer may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "ftproxy.netstack": set(),
    "ftproxy.guest": {"ftproxy.netstack"},
    "ftproxy.core": set(),
    "ftproxy.log": {"ftproxy.core", "ftproxy.guest", "ftproxy.netstack"},
    # The arbiter's server takes strangers as the replicas' ports do (shell.admission),
    # and its client and server move bytes for their session as the log link does
    # (shell.pump): two shell modules that import only the core.
    "arbiter": {"ftproxy.core", "ftproxy.shell.admission", "ftproxy.shell.pump"},
    "ftproxy.shell": {
        "ftproxy.core",
        "ftproxy.log",
        "ftproxy.guest",
        "ftproxy.netstack",
        "arbiter",
    },
    "ftproxy.tools": {
        "ftproxy.core",
        "ftproxy.log",
        "ftproxy.guest",
        "ftproxy.netstack",
        "ftproxy.shell",
        "arbiter",
    },
}
OWN = ("ftproxy", "arbiter")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # ``from ftproxy import x`` names the subpackage or module x
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def _sources() -> list[Path]:
    return sorted(p for pkg in OWN for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_layer_imports_only_the_layers_below_it(path: Path) -> None:
    here = _layer(_module_name(path))
    if here is None or (path.name == "__main__.py" and here != "ftproxy.guest"):
        return  # the top (cli, config, logsetup) and commands' entry points may import anything
    wrong = []
    for lineno, name in _imports(path):
        if not name.startswith(OWN) or name in OWN:
            continue
        there = _layer(name)
        if there is None or there == here:
            if there is None and name.split(".")[1:2] != ["__version__"]:
                wrong.append(f"line {lineno}: {name} (the top layer)")
            continue
        if not any(name == ok or name.startswith(ok + ".") for ok in ALLOWED[here]):
            wrong.append(f"line {lineno}: {name} ({there})")
    assert not wrong, f"{here} may import only {sorted(ALLOWED[here])}; found " + "; ".join(wrong)


def test_the_core_runs_without_trio() -> None:
    """The sans-I/O cores import no trio: a test can drive them with bytes and ``now``."""
    core = sorted(_module_name(p) for p in (ROOT / "ftproxy" / "core").rglob("*.py"))
    script = (
        "import importlib, json, sys\n"
        f"for name in {core!r}: importlib.import_module(name)\n"
        "own = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'ftproxy'))\n"
        "print(json.dumps(own))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    loaded = json.loads(out)
    assert not [m for m in loaded if m.split(".")[0] == "trio"]
    assert all(_layer(m) in ("ftproxy.core", None) for m in loaded), loaded


@pytest.mark.parametrize("module", ["ftproxy.shell.admission", "ftproxy.shell.pump"])
def test_the_shell_modules_the_arbiter_imports_import_only_the_core(module: str) -> None:
    """The arbiter below the shell may use these two, so they must not pull the shell in."""
    path = ROOT / Path(*module.split(".")).with_suffix(".py")
    own = [name for _, name in _imports(path) if name.startswith(OWN) and name not in OWN]
    assert all(_layer(name) == "ftproxy.core" for name in own), own
