"""ftproxy: VMware-FT-style fault tolerance for an unmodified single-threaded Python service.

The public API, in the trio way: every name a user needs, importable from here.

The command
    ``main(argv=None) -> int`` runs ``ftproxy`` (as the console script does), and its
    exit codes, those of ``ftproxy primary``, ``backup`` and ``run`` (the README's
    table): ``EXIT_OK`` 0 (the guest ended), ``EXIT_DIVERGED`` 1 (the backup's replay
    diverged), ``EXIT_USAGE`` 2 (bad arguments), ``EXIT_FAILED`` 3 (the guest failed),
    ``EXIT_HALTED`` 4 (halted: lost the arbiter, the generation was decided, the peer
    or this replica was refused), ``EXIT_STARTUP`` 5 (cannot start: what a flag names
    is unusable).
Logs (``ftproxy record``'s files, a replica's log)
    ``read_log`` reads a whole log into ``LogContents``; ``iter_records`` yields its
    records one at a time; ``LogWriter`` writes one; ``LogFormatError`` (and its
    kinds ``LogVersionError``, ``LogTruncated``) says what is wrong with a file;
    ``encoded_size`` is the bytes its complete records take. ``describe_log`` and
    ``log_summary`` are ``ftproxy log show`` and ``ftproxy log stats`` as Python.
The records of a log
    ``Record`` is any of ``Header``, ``Entry``, ``Output``, ``End``; a header holds
    the guest's ``Policy`` and, in packet mode, its ``Network``; ``FORMAT_VERSION``
    is the version of the format this ftproxy reads and writes.

The arbiter's interface (``Arbiter``, ``connect``, ``serve``...) is the ``arbiter``
package's own public API. The rest of the package (``core``, ``shell``, ``tools``,
``netstack``, ``guest``) is the implementation, importable but not promised.

The names are imported lazily: the guest runtime lives in the same package and runs
inside the user's process, where importing trio, msgspec or structlog would change
what the guest allocates and how long it takes to boot.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "main": "ftproxy.cli",
    "EXIT_OK": "ftproxy.shell.exits",
    "EXIT_DIVERGED": "ftproxy.shell.exits",
    "EXIT_USAGE": "ftproxy.shell.exits",
    "EXIT_FAILED": "ftproxy.shell.exits",
    "EXIT_HALTED": "ftproxy.shell.exits",
    "EXIT_STARTUP": "ftproxy.shell.exits",
    "FORMAT_VERSION": "ftproxy.core.records",
    "Record": "ftproxy.core.records",
    "Header": "ftproxy.core.records",
    "Entry": "ftproxy.core.records",
    "Output": "ftproxy.core.records",
    "End": "ftproxy.core.records",
    "Policy": "ftproxy.core.records",
    "Network": "ftproxy.core.records",
    "LogWriter": "ftproxy.log.file",
    "LogContents": "ftproxy.log.file",
    "LogFormatError": "ftproxy.log.file",
    "LogVersionError": "ftproxy.log.file",
    "LogTruncated": "ftproxy.log.file",
    "read_log": "ftproxy.log.file",
    "iter_records": "ftproxy.log.file",
    "encoded_size": "ftproxy.log.file",
    "describe_log": "ftproxy.log.view",
    "log_summary": "ftproxy.log.view",
}

if TYPE_CHECKING:
    from ftproxy.cli import main as main
    from ftproxy.core.records import FORMAT_VERSION as FORMAT_VERSION
    from ftproxy.core.records import End as End
    from ftproxy.core.records import Entry as Entry
    from ftproxy.core.records import Header as Header
    from ftproxy.core.records import Network as Network
    from ftproxy.core.records import Output as Output
    from ftproxy.core.records import Policy as Policy
    from ftproxy.core.records import Record as Record
    from ftproxy.log.file import LogContents as LogContents
    from ftproxy.log.file import LogFormatError as LogFormatError
    from ftproxy.log.file import LogTruncated as LogTruncated
    from ftproxy.log.file import LogVersionError as LogVersionError
    from ftproxy.log.file import LogWriter as LogWriter
    from ftproxy.log.file import encoded_size as encoded_size
    from ftproxy.log.file import iter_records as iter_records
    from ftproxy.log.file import read_log as read_log
    from ftproxy.log.view import describe_log as describe_log
    from ftproxy.log.view import log_summary as log_summary
    from ftproxy.shell.exits import EXIT_DIVERGED as EXIT_DIVERGED
    from ftproxy.shell.exits import EXIT_FAILED as EXIT_FAILED
    from ftproxy.shell.exits import EXIT_HALTED as EXIT_HALTED
    from ftproxy.shell.exits import EXIT_OK as EXIT_OK
    from ftproxy.shell.exits import EXIT_STARTUP as EXIT_STARTUP
    from ftproxy.shell.exits import EXIT_USAGE as EXIT_USAGE

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ftproxy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
