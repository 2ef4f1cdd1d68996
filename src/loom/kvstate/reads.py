"""Reads of the kv state: point reads, versions for transactions, scans, digests.

Rules:
- Reads see the durable state as of the last applied entry; they never write.
- A read hides tombstones and values expired at the `wall_ms` the caller passes (the
  serving replica's notion of now; expiry is advisory to reads, exact only in apply).
- `read_version` is for transactions: it reports the current record's version,
  tombstones and expired values included, so apply can tell "absent since before the
  snapshot" from "deleted after it".
- Inputs are validated by the caller (`keys.is_valid_ushard`); `limit` is clamped to
  1..`limits.scan_items_max`, and a scan also stops after examining that many
  records (so a run of tombstones cannot make it unbounded), returning a cursor.
"""

from __future__ import annotations

import hashlib

from msgspec import Struct

from loom.core.ids import UShard, Version
from loom.core.limits import DEFAULT_LIMITS, Limits
from loom.kvstate import keys
from loom.kvstate.overlay import StateReader
from loom.kvstate.records import decode_value_record

_DIGEST_BYTES = 32


class Item(Struct, frozen=True, kw_only=True):
    """A live value as a client sees it. `expires_at_ms` is 0 for never."""

    key: bytes
    value: bytes
    version: Version
    expires_at_ms: int = 0


def read_item(state: StateReader, ushard: UShard, key: bytes, wall_ms: int) -> Item | None:
    """The key's live value, or None if absent, deleted or expired at `wall_ms`."""
    return read_item_and_version(state, ushard, key, wall_ms)[0]


def read_item_and_version(
    state: StateReader, ushard: UShard, key: bytes, wall_ms: int
) -> tuple[Item | None, Version | None]:
    """`read_item` and `read_version` from one lookup (a client read needs both)."""
    stored = state.get(keys.data_key(ushard, key))
    if stored is None:
        return None, None
    record = decode_value_record(stored)
    if not record.is_live(wall_ms):
        return None, record.version
    assert record.value is not None
    item = Item(
        key=key, value=record.value, version=record.version, expires_at_ms=record.expires_at_ms
    )
    return item, record.version


def read_version(state: StateReader, ushard: UShard, key: bytes) -> Version | None:
    """The current record's version, tombstone or expired value included; None if none."""
    stored = state.get(keys.data_key(ushard, key))
    return None if stored is None else decode_value_record(stored).version


def scan_ushard(
    state: StateReader,
    ushard: UShard,
    prefix: bytes,
    *,
    start_after: bytes | None,
    limit: int,
    wall_ms: int,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[list[Item], bytes | None]:
    """Live items of `ushard` whose key starts with `prefix`, after `start_after`.

    Returns (items, cursor): pass the cursor as `start_after` for the next page; it is
    None only when nothing is left. A page may hold fewer than `limit` items (even
    none) and still carry a cursor when it stopped at the examination bound.
    """
    limit = max(1, min(limit, limits.scan_items_max))
    examine_max = limits.scan_items_max
    span = keys.data_prefix_range(ushard, prefix)
    start = span.start
    if start_after is not None:
        start = max(start, keys.data_key(ushard, start_after + b"\x00"))
    if start >= span.end:
        return [], None  # the cursor is past the prefix: nothing is left
    items: list[Item] = []
    last_key: bytes | None = None
    scanned = state.scan(start, span.end, limit=examine_max + 1)
    for examined, (stored_key, stored) in enumerate(scanned):
        if len(items) >= limit or examined >= examine_max:
            # Something is left: the cursor is the last key looked at.
            assert last_key is not None
            return items, last_key
        _, last_key = keys.parse_data_key(stored_key)
        record = decode_value_record(stored)
        if record.is_live(wall_ms):
            assert record.value is not None
            items.append(
                Item(
                    key=last_key,
                    value=record.value,
                    version=record.version,
                    expires_at_ms=record.expires_at_ms,
                )
            )
    return items, None


def state_digest(state: StateReader) -> bytes:
    """blake2b over every key/value this module's tables hold, in key order.

    Replicas that applied the same entries have equal digests. Lengths are framed, so
    different contents never concatenate to the same byte stream.
    """
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    for key_range in keys.ALL_RANGES:
        for key, value in state.scan(key_range.start, key_range.end):
            digest.update(len(key).to_bytes(4, "big"))
            digest.update(key)
            digest.update(len(value).to_bytes(4, "big"))
            digest.update(value)
    return digest.digest()
