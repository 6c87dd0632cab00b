"""ftproxy: VMware-FT-style fault tolerance for an unmodified single-threaded Python service.

The public API is re-exported here lazily: the guest runtime lives in the same
package and runs inside the user's process, where importing trio, msgspec or
structlog would change what the guest allocates and how long it takes to boot.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "FORMAT_VERSION": "ftproxy.wire",
    "Header": "ftproxy.wire",
    "Entry": "ftproxy.wire",
    "Output": "ftproxy.wire",
    "End": "ftproxy.wire",
    "Policy": "ftproxy.wire",
    "LogWriter": "ftproxy.logfile",
    "LogFormatError": "ftproxy.logfile",
    "read_log": "ftproxy.logfile",
}

if TYPE_CHECKING:
    from ftproxy.logfile import LogFormatError as LogFormatError
    from ftproxy.logfile import LogWriter as LogWriter
    from ftproxy.logfile import read_log as read_log
    from ftproxy.wire import FORMAT_VERSION as FORMAT_VERSION
    from ftproxy.wire import End as End
    from ftproxy.wire import Entry as Entry
    from ftproxy.wire import Header as Header
    from ftproxy.wire import Output as Output
    from ftproxy.wire import Policy as Policy

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ftproxy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
