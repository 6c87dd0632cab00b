"""The arbiter: a durable test-and-set service that prevents split brain."""

from arbiter._client import (
    DEFAULT_TIMEOUT,
    Address,
    ArbiterUnavailable,
    parse_address,
    query,
    test_and_set,
    test_and_set_retrying,
)
from arbiter._protocol import (
    PROTOCOL_VERSION,
    Connection,
    Decision,
    LocalProtocolError,
    ProtocolError,
    Query,
    RemoteProtocolError,
    Role,
    State,
    TestAndSet,
    Undecided,
)
from arbiter._server import serve
from arbiter._store import Store, StoreCorruptError, StoreError

__all__ = [
    "DEFAULT_TIMEOUT",
    "PROTOCOL_VERSION",
    "Address",
    "ArbiterUnavailable",
    "Connection",
    "Decision",
    "LocalProtocolError",
    "ProtocolError",
    "Query",
    "RemoteProtocolError",
    "Role",
    "State",
    "Store",
    "StoreCorruptError",
    "StoreError",
    "TestAndSet",
    "Undecided",
    "parse_address",
    "query",
    "serve",
    "test_and_set",
    "test_and_set_retrying",
]
