"""loom kv: the Python client of loom's distributed key-value store.

    from loom import kv

    async with kv.connect("127.0.0.1:7300") as client:
        await client.create_keyspace("ks", shards=4, replication=3)
        ks = client.keyspace("ks")
        version = await ks.put(b"k", b"v")
        item = await ks.get(b"k", consistency=kv.bounded(50))

`connect_sync` is the blocking twin. Errors are the typed `loom.core.errors` ones,
re-exported here.
"""

from __future__ import annotations

from loom.core.errors import (
    CertificateRefused,
    ConditionFailed,
    ConnectionFailed,
    InvalidArgument,
    LoomError,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    QuotaExceeded,
    Throttled,
    TlsRequired,
    TransactionConflict,
    Unavailable,
    WriteLost,
)
from loom.core.ids import Version
from loom.kv.client import Client, connect
from loom.kv.keyspace import Keyspace
from loom.kv.options import (
    EVENTUAL,
    FAST_ACK,
    QUORUM,
    READ_YOUR_WRITES,
    STRONG,
    Item,
    Page,
    ReadConsistency,
    bounded,
)
from loom.kv.sync import SyncClient, SyncKeyspace, SyncTransaction, connect_sync
from loom.kv.transaction import Transaction
from loom.kvstate.records import decode_counter
from loom.runtime.tls import TlsConfig


def counter_value(value: bytes) -> int:
    """The number a counter's stored value holds (what `increment` returned last)."""
    number = decode_counter(value)
    if number is None:
        raise InvalidArgument(f"{value!r} is not a counter's value")
    return number


__all__ = [
    "EVENTUAL",
    "FAST_ACK",
    "QUORUM",
    "READ_YOUR_WRITES",
    "STRONG",
    "CertificateRefused",
    "Client",
    "ConditionFailed",
    "ConnectionFailed",
    "InvalidArgument",
    "Item",
    "Keyspace",
    "LoomError",
    "NotFound",
    "OutcomeUnknown",
    "Page",
    "PermissionDenied",
    "QuotaExceeded",
    "ReadConsistency",
    "SyncClient",
    "SyncKeyspace",
    "SyncTransaction",
    "Throttled",
    "TlsConfig",
    "TlsRequired",
    "Transaction",
    "TransactionConflict",
    "Unavailable",
    "Version",
    "WriteLost",
    "bounded",
    "connect",
    "connect_sync",
    "counter_value",
]
