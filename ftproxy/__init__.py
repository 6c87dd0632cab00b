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
    "FORMAT_VERSION": "ftproxy.core.records",
    "Header": "ftproxy.core.records",
    "Entry": "ftproxy.core.records",
    "Output": "ftproxy.core.records",
    "End": "ftproxy.core.records",
    "Policy": "ftproxy.core.records",
    "LogWriter": "ftproxy.log.file",
    "LogFormatError": "ftproxy.log.file",
    "read_log": "ftproxy.log.file",
}

if TYPE_CHECKING:
    from ftproxy.core.records import FORMAT_VERSION as FORMAT_VERSION
    from ftproxy.core.records import End as End
    from ftproxy.core.records import Entry as Entry
    from ftproxy.core.records import Header as Header
    from ftproxy.core.records import Output as Output
    from ftproxy.core.records import Policy as Policy
    from ftproxy.log.file import LogFormatError as LogFormatError
    from ftproxy.log.file import LogWriter as LogWriter
    from ftproxy.log.file import read_log as read_log

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ftproxy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
