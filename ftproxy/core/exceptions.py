"""Flattening exception groups: trio's nurseries raise them, commands report the leaves."""

from __future__ import annotations

from collections.abc import Iterator


def exception_leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (possibly nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from exception_leaves(inner)
    else:
        yield exc
