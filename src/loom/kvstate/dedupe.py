"""The per-μshard table of recent requests and their results (PITFALLS 5).

Rules:
- The table keeps the exact set of recent request ids (clients pipeline, so a
  high-water mark is not enough) with the encoded result first returned; a retry gets
  that result back and changes nothing.
- Entries are forgotten only by replicated inputs, identically on every replica:
  a client's floor (`client_floor`: every request below it completed), a `Gc` command's
  wall-time cutoff, and the per-μshard size limit. The per-client floor record also
  turns a delayed duplicate of a request below the floor into a rejection instead of
  a second apply.
- Size limit: when a μshard holds more than `dedupe_entries_per_ushard_max` records,
  the oldest-stamped go first, ordered by (wall_ms, key) through the age index.
  RISK: a client retrying a request whose entry was trimmed this way gets it applied
  a second time. The limit must stay far above (clients times requests in flight), and
  the limit must be the same on every replica, since it changes the state.
- The record count lives at `dedupe_count_key(u)`, so checking the limit never
  scans; every insert and delete here keeps it exact.
"""

from __future__ import annotations

from collections.abc import Callable

from loom.core.ids import ClientId, RequestId, RequestSeq, UShard
from loom.core.limits import Limits
from loom.kvstate import keys
from loom.kvstate.commands import Result, decode_result, encode_result
from loom.kvstate.overlay import Overlay
from loom.kvstate.records import (
    DedupeRecord,
    FloorRecord,
    decode_dedupe_record,
    decode_floor_record,
    decode_uint64,
    encode_dedupe_record,
    encode_floor_record,
    encode_uint64,
)

# Raising a floor by at most this many seqs looks each one up instead of scanning.
POINT_LOOKUPS_MAX = 32


def lookup(view: Overlay, ushard: UShard, request: RequestId) -> Result | None:
    """The result this request already produced, if the table remembers it."""
    stored = view.get(keys.dedupe_key(ushard, request))
    if stored is None:
        return None
    return decode_result(decode_dedupe_record(stored).result)


def is_below_floor(view: Overlay, ushard: UShard, request: RequestId) -> bool:
    """True for a stale copy of a request the client already declared complete."""
    stored = view.get(keys.floor_key(ushard, request.client))
    return stored is not None and request.seq < decode_floor_record(stored).floor


def remember(
    view: Overlay,
    ushard: UShard,
    request: RequestId,
    *,
    wall_ms: int,
    result: Result,
    limits: Limits,
) -> None:
    """Store the request's result, then trim the oldest records over the limit."""
    key = keys.dedupe_key(ushard, request)
    assert view.get(key) is None, "a remembered request is answered, never re-applied"
    record = DedupeRecord(wall_ms=wall_ms, result=encode_result(result))
    view.put(key, encode_dedupe_record(record))
    view.put(keys.dedupe_age_key(ushard, wall_ms, request.client, request.seq), b"")
    count = _count(view, ushard) + 1
    ages = keys.dedupe_age_range(ushard)
    while count > limits.dedupe_entries_per_ushard_max:
        oldest = next(view.scan(ages.start, ages.end, limit=1), None)
        assert oldest is not None, "the dedupe count matches the age index"
        _forget(view, oldest[0])
        count -= 1
    _set_count(view, ushard, count)


def raise_floor(
    view: Overlay, ushard: UShard, client: ClientId, floor: RequestSeq, wall_ms: int
) -> None:
    """Record the client's floor (never lowered) and forget its entries below it."""
    if floor <= 0:
        return
    key = keys.floor_key(ushard, client)
    stored = view.get(key)
    count = _count(view, ushard)
    if stored is not None:
        previous = decode_floor_record(stored)
        if previous.floor >= floor:
            return
        view.delete(keys.dedupe_age_key(ushard, previous.wall_ms, client, None))
    else:
        count += 1
    view.put(key, encode_floor_record(FloorRecord(wall_ms=wall_ms, floor=floor)))
    view.put(keys.dedupe_age_key(ushard, wall_ms, client, None), b"")
    if stored is not None and floor - previous.floor <= POINT_LOOKUPS_MAX:
        # Entries below the previous floor are gone already: look up the few seqs in
        # between instead of opening an iterator (a pipelining client raises its floor
        # by one or two with almost every write).
        found = []
        for between in range(previous.floor, floor):
            entry_key = keys.dedupe_key(ushard, RequestId(client, RequestSeq(between)))
            value = view.get(entry_key)
            if value is not None:
                found.append((entry_key, value))
    else:
        below = keys.client_entries_below(ushard, client, floor)
        found = list(view.scan(below.start, below.end))
    for entry_key, value in found:
        stamped = decode_dedupe_record(value).wall_ms
        _, _, seq = keys.parse_dedupe_key(entry_key)
        view.delete(entry_key)
        view.delete(keys.dedupe_age_key(ushard, stamped, client, seq))
        count -= 1
    _set_count(view, ushard, count)


def forget_before(
    view: Overlay, before_wall_ms: int, is_owned: Callable[[UShard], bool] = lambda _: True
) -> int:
    """Forget every record, in every owned μshard, stamped before `before_wall_ms`.

    A μshard in a move (frozen, incoming) keeps its table unchanged: the copy must be
    the table as of the freeze, with its count.

    Skips from one μshard's age index to the next, so the work is proportional to
    the records forgotten plus the μshards present. Returns how many were forgotten.
    """
    forgotten = 0
    cursor = keys.ALL_DEDUPE_AGE.start
    while True:
        first = next(view.scan(cursor, keys.ALL_DEDUPE_AGE.end, limit=1), None)
        if first is None:
            return forgotten
        ushard = keys.ushard_of_table_key(first[0])
        old = keys.dedupe_age_range(ushard, before_wall_ms)
        stale = [] if not is_owned(ushard) else [k for k, _ in view.scan(old.start, old.end)]
        for age_key in stale:
            _forget(view, age_key)
        if stale:
            _set_count(view, ushard, _count(view, ushard) - len(stale))
        forgotten += len(stale)
        if ushard == keys.USHARD_MAX:
            return forgotten
        cursor = keys.dedupe_age_range(UShard(ushard + 1)).start


def _forget(view: Overlay, age_key: bytes) -> None:
    """Delete one record (entry or floor) and its age-index key; the caller counts."""
    view.delete(keys.dedupe_entry_key_for_age_key(age_key))
    view.delete(age_key)


def _count(view: Overlay, ushard: UShard) -> int:
    stored = view.get(keys.dedupe_count_key(ushard))
    return 0 if stored is None else decode_uint64(stored)


def _set_count(view: Overlay, ushard: UShard, count: int) -> None:
    assert count >= 0, "the dedupe count tracks every insert and delete exactly"
    if count == 0:
        view.delete(keys.dedupe_count_key(ushard))
    else:
        view.put(keys.dedupe_count_key(ushard), encode_uint64(count))
