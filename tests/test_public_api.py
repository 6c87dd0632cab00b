"""The public API, in the trio way: every name in ``__all__`` imports and is documented."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

import arbiter
import ftproxy

PACKAGES = {"ftproxy": ftproxy, "arbiter": arbiter}


def _public(package: str) -> list[str]:
    return [f"{package}.{name}" for name in PACKAGES[package].__all__]


@pytest.mark.parametrize("qualified", _public("ftproxy") + _public("arbiter"))
def test_a_public_name_imports_and_is_documented(qualified: str) -> None:
    package, name = qualified.split(".", 1)
    value = getattr(importlib.import_module(package), name)
    if inspect.isclass(value) or inspect.isroutine(value):
        assert value.__doc__, f"{qualified}: no docstring of its own"
    else:  # a constant or a type alias: the package's docstring says what it is
        assert f"``{name}``" in (PACKAGES[package].__doc__ or ""), f"{qualified}: not documented"


@pytest.mark.parametrize("name", ftproxy.__all__)
def test_the_package_docstring_names_every_public_name(name: str) -> None:
    """``help(ftproxy)`` is the index of the public API: one place names all of it."""
    assert f"``{name}" in (ftproxy.__doc__ or "")


def test_the_package_exports_no_internals() -> None:
    """Every public name comes from a module of the layers a user reads (records, the
    log files and viewer, the command's exits and ``main``)."""
    public_modules = {
        "ftproxy.cli",
        "ftproxy.core.records",
        "ftproxy.log.file",
        "ftproxy.log.view",
        "ftproxy.shell.exits",
    }
    assert set(ftproxy._EXPORTS.values()) <= public_modules
    assert sorted(ftproxy.__all__) == sorted(set(dir(ftproxy)) & set(ftproxy._EXPORTS))


def test_importing_the_package_stays_light() -> None:
    """The guest runtime shares the package: ``import ftproxy`` loads none of trio,
    msgspec or structlog until a public name is used."""
    script = (
        "import sys, ftproxy\n"
        "print(sorted(m for m in ('trio', 'msgspec', 'structlog') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
