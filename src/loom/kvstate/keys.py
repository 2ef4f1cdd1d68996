"""Key layout inside ONE p-shard's namespace (the host adds the shard prefix).

Rules:
- Every key starts with a one-byte table prefix; this module owns the prefixes
  `a d m r u`. Hosts that keep their own keys in the same namespace (applied_seq,
  ballots) must use another first byte.
- Every per-μshard table puts the μshard right after the prefix as 4 bytes big-endian,
  so one μshard's keys are contiguous in each table. A μshard's whole state is exactly
  `ushard_ranges(u)`: a move copies those ranges and nothing else (DESIGN §6).
- Integers are fixed-width big-endian so byte order equals numeric order; the client
  id is length-prefixed so one client's keys never interleave with another's whose
  id it prefixes ("ab" vs "a" + seq bytes).
- Builders assert their inputs are in range: callers validate client input first
  (`is_valid_ushard`, `is_valid_request`). Parsers assert: they only ever see keys
  this module built.

Tables:
- data          `d | ushard | user key`                     → ValueRecord
- dedupe        `r | ushard | len16 | client | seq64`       → DedupeRecord
- client floor  `r | ushard | len16 | client`               → FloorRecord
- dedupe age    `a | ushard | wall64 | len16 | client [| seq64]` → b"" (index of
  the dedupe table by stamp, so trimming the oldest never scans the table)
- μshard meta   `u | ushard | name`                         (dedupe_count, owner,
  generation)
- meta          `m | name`                                  (e.g. tombstone horizon)
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.core.ids import ClientId, RequestId, RequestSeq, UShard

DATA_PREFIX = b"d"
DEDUPE_PREFIX = b"r"
DEDUPE_AGE_PREFIX = b"a"
USHARD_META_PREFIX = b"u"
META_PREFIX = b"m"

USHARD_MAX = 2**32 - 1
REQUEST_SEQ_MAX = 2**64 - 1
WALL_MS_MAX = 2**64 - 1
CLIENT_ID_BYTES_MAX = 2**16 - 1

_U32 = 4
_U64 = 8
_LEN16 = 2


@dataclass(frozen=True, slots=True)
class KeyRange:
    """[start, end) in raw byte order."""

    start: bytes
    end: bytes


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix`."""
    stripped = prefix.rstrip(b"\xff")
    assert stripped, "a prefix of only 0xff bytes has no finite end"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _prefix_range(prefix: bytes) -> KeyRange:
    return KeyRange(prefix, prefix_end(prefix))


def _u32(n: int) -> bytes:
    return n.to_bytes(_U32, "big")


def _u64(n: int) -> bytes:
    return n.to_bytes(_U64, "big")


# --- validation of client-supplied parts --------------------------------------------


def is_valid_ushard(ushard: int) -> bool:
    return 0 <= ushard <= USHARD_MAX


def is_valid_request(request: RequestId) -> bool:
    return 0 <= request.seq <= REQUEST_SEQ_MAX and (
        len(request.client.encode()) <= CLIENT_ID_BYTES_MAX
    )


# --- data ----------------------------------------------------------------------------


def _ushard_prefix(table: bytes, ushard: UShard) -> bytes:
    assert is_valid_ushard(ushard), ushard
    return table + _u32(ushard)


def data_key(ushard: UShard, key: bytes) -> bytes:
    return _ushard_prefix(DATA_PREFIX, ushard) + key


def parse_data_key(stored: bytes) -> tuple[UShard, bytes]:
    assert stored[:1] == DATA_PREFIX and len(stored) >= 1 + _U32, stored
    return UShard(int.from_bytes(stored[1 : 1 + _U32], "big")), stored[1 + _U32 :]


def data_range(ushard: UShard) -> KeyRange:
    return _prefix_range(_ushard_prefix(DATA_PREFIX, ushard))


def data_prefix_range(ushard: UShard, prefix: bytes) -> KeyRange:
    """Data keys of `ushard` whose user key starts with `prefix`."""
    return _prefix_range(data_key(ushard, prefix))


ALL_DATA = _prefix_range(DATA_PREFIX)


# --- dedupe table --------------------------------------------------------------------


def _client_part(client: ClientId) -> bytes:
    encoded = client.encode()
    assert len(encoded) <= CLIENT_ID_BYTES_MAX
    return len(encoded).to_bytes(_LEN16, "big") + encoded


def floor_key(ushard: UShard, client: ClientId) -> bytes:
    """The client's floor record; a strict prefix of (so sorted before) its entries."""
    return _ushard_prefix(DEDUPE_PREFIX, ushard) + _client_part(client)


def dedupe_key(ushard: UShard, request: RequestId) -> bytes:
    assert 0 <= request.seq <= REQUEST_SEQ_MAX
    return floor_key(ushard, request.client) + _u64(request.seq)


def client_entries_below(ushard: UShard, client: ClientId, floor: RequestSeq) -> KeyRange:
    """The client's dedupe entries with seq < floor (the floor record excluded)."""
    base = floor_key(ushard, client)
    assert 0 <= floor <= REQUEST_SEQ_MAX + 1
    end = base + _u64(floor) if floor <= REQUEST_SEQ_MAX else prefix_end(base)
    return KeyRange(base + _u64(0), end)


def _parse_client_tail(tail: bytes) -> tuple[ClientId, RequestSeq | None]:
    """`len16 | client [| seq64]` → (client, seq or None for a floor record)."""
    length = int.from_bytes(tail[:_LEN16], "big")
    client = ClientId(tail[_LEN16 : _LEN16 + length].decode())
    rest = tail[_LEN16 + length :]
    assert len(rest) in (0, _U64), tail
    return client, (RequestSeq(int.from_bytes(rest, "big")) if rest else None)


def parse_dedupe_key(stored: bytes) -> tuple[UShard, ClientId, RequestSeq | None]:
    """Inverse of dedupe_key / floor_key; seq is None for a floor record."""
    assert stored[:1] == DEDUPE_PREFIX, stored
    ushard = UShard(int.from_bytes(stored[1 : 1 + _U32], "big"))
    return (ushard, *_parse_client_tail(stored[1 + _U32 :]))


def dedupe_range(ushard: UShard) -> KeyRange:
    return _prefix_range(_ushard_prefix(DEDUPE_PREFIX, ushard))


def dedupe_age_key(ushard: UShard, wall_ms: int, client: ClientId, seq: RequestSeq | None) -> bytes:
    """Index entry for the dedupe entry (seq) or floor record (None) stamped at wall_ms."""
    assert 0 <= wall_ms <= WALL_MS_MAX
    tail = b"" if seq is None else _u64(seq)
    return _ushard_prefix(DEDUPE_AGE_PREFIX, ushard) + _u64(wall_ms) + _client_part(client) + tail


def parse_dedupe_age_key(stored: bytes) -> tuple[UShard, int, ClientId, RequestSeq | None]:
    assert stored[:1] == DEDUPE_AGE_PREFIX, stored
    ushard = UShard(int.from_bytes(stored[1 : 1 + _U32], "big"))
    wall_ms = int.from_bytes(stored[1 + _U32 : 1 + _U32 + _U64], "big")
    return (ushard, wall_ms, *_parse_client_tail(stored[1 + _U32 + _U64 :]))


def dedupe_age_range(ushard: UShard, before_wall_ms: int | None = None) -> KeyRange:
    """Age-index entries of `ushard`, all or only those stamped before `before_wall_ms`."""
    whole = _prefix_range(_ushard_prefix(DEDUPE_AGE_PREFIX, ushard))
    if before_wall_ms is None or before_wall_ms > WALL_MS_MAX:
        return whole
    return KeyRange(whole.start, whole.start + _u64(max(0, before_wall_ms)))


def dedupe_entry_key_for_age_key(age_key: bytes) -> bytes:
    """The dedupe-table key (entry or floor record) an age-index key points at."""
    ushard, _, client, seq = parse_dedupe_age_key(age_key)
    if seq is None:
        return floor_key(ushard, client)
    return dedupe_key(ushard, RequestId(client=client, seq=seq))


ALL_DEDUPE_AGE = _prefix_range(DEDUPE_AGE_PREFIX)


def ushard_of_table_key(stored: bytes) -> UShard:
    """The μshard of any per-μshard table key (data, dedupe, age, μshard meta)."""
    assert stored[:1] in (DATA_PREFIX, DEDUPE_PREFIX, DEDUPE_AGE_PREFIX, USHARD_META_PREFIX)
    return UShard(int.from_bytes(stored[1 : 1 + _U32], "big"))


# --- meta ----------------------------------------------------------------------------


def ushard_meta_key(ushard: UShard, name: bytes) -> bytes:
    return _ushard_prefix(USHARD_META_PREFIX, ushard) + name


def ushard_meta_range(ushard: UShard) -> KeyRange:
    return _prefix_range(_ushard_prefix(USHARD_META_PREFIX, ushard))


def dedupe_count_key(ushard: UShard) -> bytes:
    """Number of records (entries + floor records) in the μshard's dedupe table."""
    return ushard_meta_key(ushard, b"dedupe_count")


def owner_key(ushard: UShard) -> bytes:
    """The μshard's ownership record (loom.kvstate.ownership); a move never copies it."""
    return ushard_meta_key(ushard, b"owner")


def generation_key(ushard: UShard) -> bytes:
    """The μshard's generation, set by Own so versions grow across moves (PITFALLS 17)."""
    return ushard_meta_key(ushard, b"generation")


def meta_key(name: bytes) -> bytes:
    return META_PREFIX + name


TOMBSTONE_HORIZON_KEY = meta_key(b"tombstone_horizon")


def ushard_ranges(ushard: UShard) -> tuple[KeyRange, ...]:
    """Everything that belongs to one μshard: what a move copies and a drop deletes."""
    return (
        dedupe_age_range(ushard),
        data_range(ushard),
        dedupe_range(ushard),
        ushard_meta_range(ushard),
    )


# Every table this module owns, in key order (for digests and snapshots).
ALL_RANGES: tuple[KeyRange, ...] = tuple(
    _prefix_range(prefix)
    for prefix in sorted(
        (DATA_PREFIX, DEDUPE_PREFIX, DEDUPE_AGE_PREFIX, USHARD_META_PREFIX, META_PREFIX)
    )
)
