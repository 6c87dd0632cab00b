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
    from ftproxy.logfile import LogFormatError, LogWriter, read_log
    from ftproxy.wire import FORMAT_VERSION, End, Entry, Header, Output, Policy

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ftproxy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
