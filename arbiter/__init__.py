"""The arbiter: a durable test-and-set service that prevents split brain.

Two implementations behind one interface (:class:`Arbiter`): the built-in
server (``ftproxy arbiter``, :func:`serve`) and its client, and an etcd
cluster. :func:`connect` picks one from an ``--arbiter`` address.

Addresses: ``parse_arbiter`` reads an ``--arbiter`` value (the forms ``ARBITER_FORMS``
names) into an ``ArbiterAddress`` (a ``BuiltinAddress`` or an ``EtcdAddress``); an
``Address`` is one endpoint, a ``(host, port)`` pair. ``DEFAULT_TIMEOUT`` is how many
seconds a question waits for an answer by default; ``PROTOCOL_VERSION`` the version of
the built-in arbiter's protocol; ``ETCD_KEY_PREFIX`` the prefix of ftproxy's keys in etcd.
"""

from arbiter._address import (
    ARBITER_FORMS,
    ArbiterAddress,
    ArbiterAddressError,
    BuiltinAddress,
    EtcdAddress,
    EtcdSettings,
    connect,
    parse_arbiter,
)
from arbiter._client import (
    Address,
    BuiltinArbiter,
    format_address,
    parse_address,
    query,
    test_and_set,
    test_and_set_retrying,
)
from arbiter._etcd import KEY_PREFIX as ETCD_KEY_PREFIX
from arbiter._etcd import EtcdArbiter
from arbiter._interface import (
    DEFAULT_TIMEOUT,
    Arbiter,
    ArbiterRefused,
    ArbiterTiming,
    ArbiterUnavailable,
    ask_until_answered,
)
from arbiter._protocol import (
    PROTOCOL_VERSION,
    Connection,
    Decision,
    LocalProtocolError,
    ProtocolError,
    Query,
    RemoteProtocolError,
    Side,
    State,
    TestAndSet,
    Undecided,
)
from arbiter._server import serve
from arbiter._store import Store, StoreCorruptError, StoreError

# The earlier name of Side (which end of a connection), kept for callers that use it.
Role = Side

__all__ = [
    "ARBITER_FORMS",
    "DEFAULT_TIMEOUT",
    "ETCD_KEY_PREFIX",
    "PROTOCOL_VERSION",
    "Address",
    "Arbiter",
    "ArbiterAddress",
    "ArbiterAddressError",
    "ArbiterRefused",
    "ArbiterTiming",
    "ArbiterUnavailable",
    "BuiltinAddress",
    "BuiltinArbiter",
    "Connection",
    "Decision",
    "EtcdAddress",
    "EtcdArbiter",
    "EtcdSettings",
    "LocalProtocolError",
    "ProtocolError",
    "Query",
    "RemoteProtocolError",
    "Role",
    "Side",
    "State",
    "Store",
    "StoreCorruptError",
    "StoreError",
    "TestAndSet",
    "Undecided",
    "ask_until_answered",
    "connect",
    "format_address",
    "parse_address",
    "parse_arbiter",
    "query",
    "serve",
    "test_and_set",
    "test_and_set_retrying",
]
