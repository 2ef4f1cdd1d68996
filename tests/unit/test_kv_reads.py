"""Reads (point, version, scan with cursors), digests, and the apply overlay's scans."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from kv_state import DictState, Harness, U

from loom.core.ids import UShard
from loom.core.limits import DEFAULT_LIMITS, Limits
from loom.kvstate.commands import Delete, Put
from loom.kvstate.overlay import Overlay
from loom.kvstate.reads import Item, read_item, read_version, scan_ushard, state_digest
from loom.storage.api import WriteBatch


def put(h: Harness, key: bytes, value: bytes = b"v", ttl_ms: int | None = None) -> Put:
    return Put(request=h.next_request(), ushard=U, key=key, value=value, ttl_ms=ttl_ms)


def delete(h: Harness, key: bytes) -> Delete:
    return Delete(request=h.next_request(), ushard=U, key=key)


def scan_all(h: Harness, prefix: bytes, page: int, limits: Limits = DEFAULT_LIMITS) -> list[bytes]:
    """Follow cursors to the end, as a client paging through a scan would."""
    seen: list[bytes] = []
    cursor: bytes | None = None
    for _ in range(100):
        items, cursor = scan_ushard(
            h.state, U, prefix, start_after=cursor, limit=page, wall_ms=h.wall_ms, limits=limits
        )
        seen.extend(item.key for item in items)
        if cursor is None:
            return seen
    raise AssertionError("the scan did not finish")


def test_read_item_hides_tombstones_and_expired_values() -> None:
    h = Harness()
    h.entry([put(h, b"live"), put(h, b"short", ttl_ms=5), put(h, b"gone"), delete(h, b"gone")])
    live = read_item(h.state, U, b"live", h.wall_ms)
    assert isinstance(live, Item) and live.value == b"v"
    assert read_item(h.state, U, b"gone", h.wall_ms) is None
    assert read_item(h.state, U, b"short", h.wall_ms + 4) is not None
    assert read_item(h.state, U, b"short", h.wall_ms + 5) is None
    assert read_item(h.state, U, b"never", h.wall_ms) is None


def test_read_version_reports_tombstones_and_expired_values_but_not_absent_keys() -> None:
    h = Harness()
    h.entry([put(h, b"short", ttl_ms=5), delete(h, b"gone")])
    h.wall_ms += 10
    assert read_version(h.state, U, b"short") is not None
    assert read_version(h.state, U, b"gone") is not None
    assert read_version(h.state, U, b"never") is None


def test_scan_pages_through_live_keys_of_one_prefix_and_ushard() -> None:
    h = Harness()
    h.entry([put(h, f"user/{i:02}".encode()) for i in range(10)] + [put(h, b"zzz")])
    h.entry([delete(h, b"user/03"), put(h, b"user/05", ttl_ms=1), delete(h, b"user/nope")])
    h.one(Put(request=h.next_request(), ushard=UShard(8), key=b"user/99", value=b"v"))
    h.wall_ms += 1
    expected = [f"user/{i:02}".encode() for i in range(10) if i not in (3, 5)]
    for page in (1, 3, 8, 100):
        assert scan_all(h, b"user/", page) == expected
    assert scan_all(h, b"", 4) == [*expected, b"zzz"]


def test_scan_returns_no_cursor_when_the_page_ends_exactly_at_the_last_key() -> None:
    h = Harness()
    h.entry([put(h, b"a"), put(h, b"b")])
    items, cursor = scan_ushard(h.state, U, b"", start_after=None, limit=2, wall_ms=h.wall_ms)
    assert [i.key for i in items] == [b"a", b"b"]
    assert cursor is None


def test_scan_stops_after_examining_its_bound_even_in_a_run_of_tombstones() -> None:
    h = Harness()
    h.entry([delete(h, f"t{i}".encode()) for i in range(10)] + [put(h, b"z")])
    limits = Limits(scan_items_max=4)
    items, cursor = scan_ushard(
        h.state, U, b"", start_after=None, limit=10, wall_ms=h.wall_ms, limits=limits
    )
    assert items == [] and cursor == b"t3"
    assert scan_all(h, b"", 10, limits) == [b"z"]


def test_replicas_that_applied_the_same_entries_have_equal_digests() -> None:
    a, b = Harness(), Harness()
    for h in (a, b):
        h.entry([put(h, b"x"), delete(h, b"y")])
    assert state_digest(a.state) == state_digest(b.state)
    a.one(put(a, b"x", b"other"))
    assert state_digest(a.state) != state_digest(b.state)


pairs = st.dictionaries(st.binary(max_size=3), st.binary(max_size=2), max_size=12)
writes = st.lists(st.tuples(st.binary(max_size=3), st.none() | st.binary(max_size=2)), max_size=12)


@given(pairs, writes, st.binary(max_size=3), st.binary(max_size=3), st.none() | st.integers(0, 8))
def test_overlay_scans_equal_a_scan_of_the_written_state(
    durable: dict[bytes, bytes],
    pending: list[tuple[bytes, bytes | None]],
    start: bytes,
    end: bytes,
    limit: int | None,
) -> None:
    state = DictState()
    state.data.update(durable)
    view = Overlay(state)
    model = dict(durable)
    for key, value in pending:
        if value is None:
            view.delete(key)
            model.pop(key, None)
        else:
            view.put(key, value)
            model[key] = value
    expected = sorted((k, v) for k, v in model.items() if start <= k < end)
    assert list(view.scan(start, end, limit=limit)) == expected[:limit]
    for key, _ in pending:
        assert view.get(key) == model.get(key)
    batch = WriteBatch()
    view.flush(batch)
    assert [k for k, _ in batch.ops] == sorted({k for k, _ in pending})
    state.write(batch)
    assert state.data == model


def test_scan_with_a_cursor_past_the_prefix_returns_nothing() -> None:
    h = Harness()
    h.entry([put(h, b"user/1"), put(h, b"zzz")])
    items, cursor = scan_ushard(h.state, U, b"user/", start_after=b"v", limit=5, wall_ms=h.wall_ms)
    assert (items, cursor) == ([], None)
    items, _ = scan_ushard(h.state, U, b"user/", start_after=b"a", limit=5, wall_ms=h.wall_ms)
    assert [i.key for i in items] == [b"user/1"]
