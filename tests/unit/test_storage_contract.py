"""The storage contract of `loom.storage.api`, run against every backend.

The same tests run on MemoryStore and on RocksStore (in tmp_path); crash tests are
memory-only, because only the twin can lose power on demand. Hypothesis checks the
twin against a plain dict model and RocksStore against the twin.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from loom.storage.api import KVStore, WriteBatch
from loom.storage.memory import MemoryStore
from loom.storage.rocks import RocksStore

# Raw-byte edge cases in sorted order: the empty key, NUL bytes, 0x7f < 0x80 (bytes are
# unsigned), 0xff, and prefixes (b"a" < b"a\x00" < b"ab" < b"a\xff").
EDGE_KEYS = [b"", b"\x00", b"\x00\x00", b"\x00\xff", b"\x01", b"a", b"a\x00", b"ab", b"a\xff"]
EDGE_KEYS += [b"b", b"\x7f", b"\x80", b"\xff", b"\xff\x00", b"\xff\xff"]
# Greater than every key in EDGE_KEYS, so [b"", END) covers them all.
END = b"\xff\xff\xff"


def batch_of(
    ops: list[tuple[bytes, bytes | None]], ranges_deleted: list[tuple[bytes, bytes]] | None = None
) -> WriteBatch:
    return WriteBatch(ops=list(ops), ranges_deleted=list(ranges_deleted or []))


def put(store: KVStore, key: bytes, value: bytes, *, sync: bool = False) -> None:
    store.write(batch_of([(key, value)]), sync=sync)


def everything(store: KVStore) -> list[tuple[bytes, bytes]]:
    return list(store.scan(b"", END))


@pytest.fixture(params=["memory", "rocks"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KVStore]:
    path = str(tmp_path / "db")
    backend: KVStore = MemoryStore() if request.param == "memory" else RocksStore(path)
    yield backend
    backend.close()


# --- get, put, delete ---------------------------------------------------------


def test_get_returns_none_for_a_missing_key(store: KVStore) -> None:
    assert store.get(b"missing") is None


def test_put_then_get_returns_the_value(store: KVStore) -> None:
    put(store, b"k", b"v")
    assert store.get(b"k") == b"v"


def test_empty_value_is_stored_and_differs_from_missing(store: KVStore) -> None:
    put(store, b"k", b"")
    assert store.get(b"k") == b""
    assert everything(store) == [(b"k", b"")]


def test_keys_and_values_keep_every_byte(store: KVStore) -> None:
    key = bytes(range(256))
    value = bytes(reversed(range(256))) * 4
    put(store, key, value)
    assert store.get(key) == value
    assert store.get(key[:-1]) is None


def test_overwrite_replaces_the_value(store: KVStore) -> None:
    put(store, b"k", b"old")
    put(store, b"k", b"new")
    assert store.get(b"k") == b"new"
    assert everything(store) == [(b"k", b"new")]


def test_delete_removes_the_key(store: KVStore) -> None:
    put(store, b"k", b"v")
    store.write(batch_of([(b"k", None)]), sync=False)
    assert store.get(b"k") is None
    assert everything(store) == []


def test_deleting_a_missing_key_changes_nothing(store: KVStore) -> None:
    put(store, b"a", b"1")
    store.write(batch_of([(b"b", None)]), sync=True)
    assert everything(store) == [(b"a", b"1")]


# --- scan -----------------------------------------------------------------------


def test_scan_returns_keys_in_raw_byte_order(store: KVStore) -> None:
    # Written in an order unlike the sorted one, one batch per key.
    for key in EDGE_KEYS[::2] + EDGE_KEYS[1::2][::-1]:
        put(store, key, b"v" + key)
    assert everything(store) == [(key, b"v" + key) for key in sorted(EDGE_KEYS)]
    assert sorted(EDGE_KEYS) == EDGE_KEYS


SCAN_CASES = [
    # start is included, end is excluded
    (b"\x00", b"a\xff", None, [b"\x00", b"\x00\x00", b"\x00\xff", b"\x01", b"a", b"a\x00", b"ab"]),
    # bounds need not be stored keys
    (b"\x00\x01", b"a\x01", None, [b"\x00\xff", b"\x01", b"a", b"a\x00"]),
    # a prefix range holds exactly the keys with that prefix
    (b"a", b"b", None, [b"a", b"a\x00", b"ab", b"a\xff"]),
    # limit takes the first keys of the range
    (b"\x01", END, 3, [b"\x01", b"a", b"a\x00"]),
    (b"\xff", END, 100, [b"\xff", b"\xff\x00", b"\xff\xff"]),
    (b"", END, 0, []),
    # empty and reversed ranges
    (b"a", b"a", None, []),
    (b"b", b"a", None, []),
    (b"", b"", None, []),
]


@pytest.mark.parametrize(("start", "end", "limit", "expected"), SCAN_CASES)
def test_scan_returns_keys_from_start_up_to_end_within_limit(
    store: KVStore, start: bytes, end: bytes, limit: int | None, expected: list[bytes]
) -> None:
    store.write(batch_of([(key, key) for key in EDGE_KEYS]), sync=False)
    assert list(store.scan(start, end, limit=limit)) == [(key, key) for key in expected]


def test_scan_shows_the_store_as_it_was_when_called(store: KVStore) -> None:
    store.write(batch_of([(b"a", b"1"), (b"c", b"3")]), sync=False)
    rows = store.scan(b"", END)
    store.write(batch_of([(b"b", b"2"), (b"c", None)]), sync=False)
    assert list(rows) == [(b"a", b"1"), (b"c", b"3")]


# --- batches --------------------------------------------------------------------


def test_batch_ops_apply_in_order(store: KVStore) -> None:
    ops: list[tuple[bytes, bytes | None]] = [
        (b"put-then-delete", b"x"),
        (b"put-then-delete", None),
        (b"delete-then-put", None),
        (b"delete-then-put", b"y"),
        (b"put-twice", b"first"),
        (b"put-twice", b"second"),
    ]
    store.write(batch_of(ops), sync=False)
    assert everything(store) == [(b"delete-then-put", b"y"), (b"put-twice", b"second")]


def test_range_delete_removes_start_and_keeps_end(store: KVStore) -> None:
    store.write(batch_of([(key, key) for key in EDGE_KEYS]), sync=False)
    store.write(batch_of([], [(b"\x00", b"a")]), sync=False)
    keys = [key for key, _ in everything(store)]
    assert keys == [b"", *EDGE_KEYS[5:]]
    assert EDGE_KEYS[5] == b"a"


def test_range_delete_then_put_in_the_same_batch_keeps_the_put(store: KVStore) -> None:
    store.write(batch_of([(b"k1", b"old"), (b"k2", b"old"), (b"k3", b"old")]), sync=False)
    # Ranges apply before ops, whatever order the calls were made in.
    batch = WriteBatch()
    batch.put(b"k2", b"new")
    batch.delete_range(b"k1", b"k9")
    store.write(batch, sync=True)
    assert everything(store) == [(b"k2", b"new")]


def test_empty_range_delete_changes_nothing(store: KVStore) -> None:
    put(store, b"a", b"1")
    store.write(batch_of([], [(b"a", b"a")]), sync=False)
    assert everything(store) == [(b"a", b"1")]


def test_empty_batch_is_accepted_synced_or_not(store: KVStore) -> None:
    put(store, b"a", b"1")
    store.write(WriteBatch(), sync=False)
    store.write(WriteBatch(), sync=True)
    store.sync()
    assert everything(store) == [(b"a", b"1")]


def test_batch_that_fails_midway_applies_nothing(store: KVStore) -> None:
    put(store, b"b", b"kept")
    # The second range is reversed: an invariant broken after the first range ran.
    batch = batch_of([(b"new", b"x")], [(b"a", b"c"), (b"z", b"y")])
    with pytest.raises(AssertionError):
        store.write(batch, sync=False)
    assert everything(store) == [(b"b", b"kept")]


def test_close_twice_is_harmless(store: KVStore) -> None:
    store.close()
    store.close()


# --- RocksStore on disk ---------------------------------------------------------


def test_rocks_store_reopened_keeps_synced_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    first = RocksStore(path)
    first.write(batch_of([(b"a", b"1"), (b"b", b"2")]), sync=True)
    put(first, b"c", b"3")
    first.sync()
    first.write(batch_of([(b"a", None)], [(b"b", b"c")]), sync=True)
    first.close()
    second = RocksStore(path)
    try:
        assert everything(second) == [(b"c", b"3")]
    finally:
        second.close()


def test_rocks_store_recovers_synced_batches_after_the_process_dies(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    # os._exit skips close(), so the reopen must replay the WAL, not read flushed SSTs.
    script = (
        "import os, sys\n"
        "from loom.storage.api import WriteBatch\n"
        "from loom.storage.rocks import RocksStore\n"
        "store = RocksStore(sys.argv[1])\n"
        "for i in range(100):\n"
        "    batch = WriteBatch()\n"
        "    batch.put(i.to_bytes(2, 'big'), b'v' * 100)\n"
        "    store.write(batch, sync=i % 10 == 9)\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, path], check=True, timeout=60)
    store = RocksStore(path)
    try:
        assert [key for key, _ in everything(store)] == [i.to_bytes(2, "big") for i in range(100)]
    finally:
        store.close()


# --- MemoryStore crashes --------------------------------------------------------


def test_crash_loses_batches_written_without_sync() -> None:
    store = MemoryStore()
    put(store, b"a", b"1")
    store.write(batch_of([(b"b", b"2"), (b"c", b"3")]), sync=False)
    store.crash()
    assert everything(store) == []
    assert store.stats.batches_lost == 2


def test_crash_keeps_batches_made_durable_by_sync() -> None:
    store = MemoryStore()
    put(store, b"a", b"1")
    put(store, b"b", b"2")
    store.sync()
    put(store, b"c", b"3")
    store.crash()
    assert everything(store) == [(b"a", b"1"), (b"b", b"2")]


def test_synced_write_makes_every_earlier_batch_durable() -> None:
    store = MemoryStore()
    put(store, b"a", b"1")
    put(store, b"b", b"2", sync=True)
    put(store, b"c", b"3")
    store.crash()
    assert everything(store) == [(b"a", b"1"), (b"b", b"2")]


def test_crash_restores_overwritten_and_deleted_values() -> None:
    store = MemoryStore()
    store.write(batch_of([(key, b"old") for key in EDGE_KEYS]), sync=True)
    store.write(batch_of([(b"a", b"new"), (b"b", None)], [(b"\x00", b"\x80")]), sync=False)
    store.write(batch_of([(b"a", None), (b"zz", b"added")], [(b"", END)]), sync=False)
    store.crash()
    assert everything(store) == [(key, b"old") for key in EDGE_KEYS]


@pytest.mark.parametrize("kept", [0, 1, 2, 3, 4, 10])
def test_crash_keeps_a_prefix_of_unsynced_batches_and_never_a_later_one(kept: int) -> None:
    batches = [
        batch_of([(b"a", b"1")]),
        batch_of([(b"a", b"2"), (b"b", b"1")]),
        batch_of([(b"b", None)], [(b"a", b"a\x00")]),
        batch_of([(b"c", b"1")]),
    ]
    store = MemoryStore()
    for batch in batches:
        store.write(batch, sync=False)
    store.crash(unsynced_batches_kept=kept)
    expected = MemoryStore()
    for batch in batches[:kept]:
        expected.write(batch, sync=False)
    assert everything(store) == everything(expected)
    # What survived a crash was read back from disk: a second crash keeps it.
    store.crash()
    assert everything(store) == everything(expected)


def test_crash_after_close_loses_nothing() -> None:
    store = MemoryStore()
    put(store, b"a", b"1")
    store.close()
    store.crash()
    assert everything(store) == [(b"a", b"1")]


def test_store_is_usable_after_a_crash() -> None:
    store = MemoryStore()
    put(store, b"a", b"1")
    store.crash()
    put(store, b"b", b"2")
    assert everything(store) == [(b"b", b"2")]
    assert store.stats.crashes == 1


# --- property tests -------------------------------------------------------------

# A tiny alphabet so keys collide, share prefixes and straddle range bounds.
keys = st.lists(st.sampled_from([0x00, 0x01, 0x61, 0x7F, 0x80, 0xFF]), max_size=3).map(bytes)
values = st.binary(max_size=4)
ops = st.lists(st.tuples(keys, st.none() | values), max_size=6)
ranges = st.lists(st.tuples(keys, keys).map(lambda pair: (min(pair), max(pair))), max_size=2)
batches = st.builds(batch_of, ops, ranges)


def apply_to_model(model: dict[bytes, bytes], batch: WriteBatch) -> None:
    for start, end in batch.ranges_deleted:
        for key in [key for key in model if start <= key < end]:
            del model[key]
    for key, value in batch.ops:
        if value is None:
            model.pop(key, None)
        else:
            model[key] = value


def model_scan(
    model: dict[bytes, bytes], start: bytes, end: bytes, limit: int | None
) -> list[tuple[bytes, bytes]]:
    rows = [(key, model[key]) for key in sorted(model) if start <= key < end]
    return rows if limit is None else rows[:limit]


class MemoryStoreAgainstDictModel(RuleBasedStateMachine):
    """The twin behaves like a dict, and a crash rolls it back to a synced prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore()
        self.durable: dict[bytes, bytes] = {}
        self.unsynced: list[WriteBatch] = []

    def live(self) -> dict[bytes, bytes]:
        model = dict(self.durable)
        for batch in self.unsynced:
            apply_to_model(model, batch)
        return model

    @rule(batch=batches, sync=st.booleans())
    def write(self, batch: WriteBatch, sync: bool) -> None:
        self.store.write(batch, sync=sync)
        self.unsynced.append(batch)
        if sync:
            self.durable = self.live()
            self.unsynced.clear()

    @rule()
    def sync(self) -> None:
        self.store.sync()
        self.durable = self.live()
        self.unsynced.clear()

    @rule(kept=st.integers(min_value=0, max_value=4))
    def crash(self, kept: int) -> None:
        self.store.crash(unsynced_batches_kept=kept)
        del self.unsynced[kept:]
        self.durable = self.live()
        self.unsynced.clear()

    @rule(start=keys, end=keys, limit=st.none() | st.integers(min_value=0, max_value=4))
    def scan_matches_the_model(self, start: bytes, end: bytes, limit: int | None) -> None:
        assert list(self.store.scan(start, end, limit=limit)) == model_scan(
            self.live(), start, end, limit
        )

    @rule(key=keys)
    def get_matches_the_model(self, key: bytes) -> None:
        assert self.store.get(key) == self.live().get(key)

    @invariant()
    def holds_exactly_the_model(self) -> None:
        assert everything(self.store) == model_scan(self.live(), b"", END, None)
        assert self.store.unsynced_batches == len(self.unsynced)


TestMemoryStoreAgainstDictModel = MemoryStoreAgainstDictModel.TestCase
TestMemoryStoreAgainstDictModel.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)


@settings(max_examples=25, deadline=None)
@given(written=st.lists(st.tuples(batches, st.booleans()), max_size=8))
def test_rocks_store_and_memory_store_agree_on_any_batches(
    written: list[tuple[WriteBatch, bool]],
) -> None:
    twin = MemoryStore()
    with tempfile.TemporaryDirectory() as directory:
        rocks = RocksStore(str(Path(directory) / "db"))
        try:
            for batch, sync in written:
                rocks.write(batch, sync=sync)
                twin.write(batch, sync=sync)
            assert everything(rocks) == everything(twin)
            for start, end in [(b"", b"\x01"), (b"\x00", b"\x80"), (b"a", END)]:
                assert list(rocks.scan(start, end, limit=2)) == list(twin.scan(start, end, limit=2))
        finally:
            rocks.close()
