"""Stored record formats of the kv state machine. Disk format v1.

Rules:
- Every record is a msgspec array-like Struct whose integer tag (the first array
  element) is its format version; a later format adds a new tagged Struct and a union,
  so old records stay readable. Never pickle.
- These bytes were written by our own apply, so a record that fails to decode is
  corruption: decoding raises (crash, don't limp), unlike client command bytes.
- Counters are the user-visible value format of `Increment`: a signed 64-bit integer
  as 8 bytes big-endian.
"""

from __future__ import annotations

import msgspec
from msgspec import Struct

from loom.core.ids import RequestSeq, Version

COUNTER_BYTES = 8
COUNTER_MIN = -(2**63)
COUNTER_MAX = 2**63 - 1


class ValueRecord(Struct, frozen=True, array_like=True, tag=1):
    """One key's current record: a value, or a tombstone (value None) until GC.

    `expires_at_ms` is wall time stamped by the primary (0 = never); a value whose
    expiry is at or before the entry's wall time is treated as absent, but keeps its
    version for transaction checks.
    """

    version: Version
    value: bytes | None
    expires_at_ms: int = 0

    @property
    def is_tombstone(self) -> bool:
        return self.value is None

    def is_live(self, wall_ms: int) -> bool:
        """A readable value: not a tombstone and not expired at `wall_ms`."""
        return self.value is not None and (self.expires_at_ms == 0 or wall_ms < self.expires_at_ms)


class DedupeRecord(Struct, frozen=True, array_like=True, tag=1):
    """The outcome of one request: the encoded Result, exactly as first returned."""

    wall_ms: int
    result: bytes


class FloorRecord(Struct, frozen=True, array_like=True, tag=1):
    """Every request of this client below `floor` completed; a later copy is stale."""

    wall_ms: int
    floor: RequestSeq


_encoder = msgspec.msgpack.Encoder()
_value_decoder = msgspec.msgpack.Decoder(ValueRecord)
_dedupe_decoder = msgspec.msgpack.Decoder(DedupeRecord)
_floor_decoder = msgspec.msgpack.Decoder(FloorRecord)


def encode_value_record(record: ValueRecord) -> bytes:
    return _encoder.encode(record)


def decode_value_record(data: bytes) -> ValueRecord:
    return _value_decoder.decode(data)


def encode_dedupe_record(record: DedupeRecord) -> bytes:
    return _encoder.encode(record)


def decode_dedupe_record(data: bytes) -> DedupeRecord:
    return _dedupe_decoder.decode(data)


def encode_floor_record(record: FloorRecord) -> bytes:
    return _encoder.encode(record)


def decode_floor_record(data: bytes) -> FloorRecord:
    return _floor_decoder.decode(data)


def encode_uint64(n: int) -> bytes:
    """Meta integers (horizon, counts) as 8 bytes big-endian."""
    assert 0 <= n < 2**64, n
    return n.to_bytes(8, "big")


def decode_uint64(data: bytes) -> int:
    assert len(data) == 8, data
    return int.from_bytes(data, "big")


def encode_counter(n: int) -> bytes:
    assert COUNTER_MIN <= n <= COUNTER_MAX, n
    return n.to_bytes(COUNTER_BYTES, "big", signed=True)


def decode_counter(data: bytes) -> int | None:
    """None if `data` is not a counter (another length): the caller rejects, not crashes."""
    if len(data) != COUNTER_BYTES:
        return None
    return int.from_bytes(data, "big", signed=True)
