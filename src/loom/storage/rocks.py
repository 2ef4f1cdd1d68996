"""The RocksDB `KVStore`, over rocksdict in raw mode. The only module that imports rocksdict.

Rules:
- raw mode everywhere (Options, WriteBatch): keys and values are stored as the exact
  bytes given, so RocksDB's bytewise comparator gives the contract's raw byte order.
  rocksdict's default mode would pickle or tag them and break that order;
- one `loom.storage.api.WriteBatch` becomes one RocksDB write batch, so it is atomic
  in memory and in the WAL; range deletes go first in it, as the port says;
- `write(sync=True)` fsyncs the WAL inside the write; `sync()` is
  `flush_wal(sync=True)`, which makes every earlier write durable;
- point-in-time WAL recovery: after a crash the DB holds a prefix of the batches
  written, never a hole (the contract's "never lose N but keep N+1");
- measured on rocksdict 0.3.29 (bench/storage_bench.py): `Rdict.write` keeps the GIL
  even while it fsyncs, `flush_wal` releases it. A caller that wants fsync off the
  interpreter's critical path writes with sync=False and calls `sync()` from a
  storage thread;
- every call is blocking IO: asyncio code calls this from a storage thread, never on
  the event loop. `sync()` may run in one thread while another writes (RocksDB allows
  it): it covers at least every batch written before it started. Errors from RocksDB
  propagate; the caller treats them as fatal.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from rocksdict import (
    BlockBasedOptions,
    DBRecoveryMode,
    Options,
    Rdict,
    RdictIter,
    ReadOptions,
    WriteOptions,
)
from rocksdict import WriteBatch as RocksWriteBatch

from loom.storage.api import WriteBatch

_BLOOM_BITS_PER_KEY = 10


@dataclass(slots=True)
class RocksStoreStats:
    batches: int = 0
    # Durability points: sync() calls and write(..., sync=True).
    syncs: int = 0
    # sync() calls with nothing unsynced since the last one (no fsync needed).
    skipped_syncs: int = 0


def _options() -> Options:
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_wal_recovery_mode(DBRecoveryMode.point_in_time())
    # Point reads (get by key) dominate; a bloom filter skips SST files without the key.
    table = BlockBasedOptions()
    table.set_bloom_filter(_BLOOM_BITS_PER_KEY, False)
    options.set_block_based_table_factory(table)
    return options


class RocksStore:
    """A `KVStore` in a RocksDB directory at `path` (created if missing)."""

    __slots__ = (
        "_db",
        "_is_closed",
        "_synced",
        "_write_synced",
        "_write_unsynced",
        "_written",
        "path",
        "stats",
    )

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = Rdict(path, options=_options())
        self._write_unsynced = WriteOptions()
        self._write_synced = WriteOptions()
        self._write_synced.sync = True
        self._is_closed = False
        # Batches written, and how many of them the last sync covered: a sync with
        # nothing new is skipped (a turn that only served reads must not wait for an
        # fsync of nothing). Counters, not a flag: a sync may run in another thread
        # while writes go on, and covers only what was written before it started.
        self._written = 0
        self._synced = 0
        self.stats = RocksStoreStats()

    def get(self, key: bytes) -> bytes | None:
        assert not self._is_closed, "store used after close()"
        value = self._db.get(key)
        assert value is None or isinstance(value, bytes)
        return value

    def scan(
        self, start: bytes, end: bytes, *, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        assert not self._is_closed, "store used after close()"
        assert limit is None or limit >= 0
        if start >= end or limit == 0:
            return iter(())
        read_options = ReadOptions()
        # The bound lets RocksDB stop at `end` itself instead of us reading past it
        # (and through any tombstones beyond it).
        read_options.set_iterate_upper_bound(end)
        # Created and positioned now: the iterator pins the DB state at this call.
        cursor = self._db.iter(read_options)
        cursor.seek(start)
        return _walk(cursor, limit)

    def write(self, batch: WriteBatch, *, sync: bool) -> None:
        assert not self._is_closed, "store used after close()"
        if len(batch) == 0:
            if sync:
                self.sync()
            return
        rocks_batch = RocksWriteBatch(raw_mode=True)
        for start, end in batch.ranges_deleted:
            # A reversed range is an error RocksDB makes sticky: every later write
            # fails. WriteBatch.delete_range checks this, but `ranges_deleted` is open.
            assert start <= end, "reversed range in WriteBatch.ranges_deleted"
            if start < end:
                rocks_batch.delete_range(start, end)
        for key, value in batch.ops:
            if value is None:
                rocks_batch.delete(key)
            else:
                rocks_batch.put(key, value)
        self._db.write(rocks_batch, self._write_synced if sync else self._write_unsynced)
        self.stats.batches += 1
        self._written += 1
        if sync:
            self.stats.syncs += 1

    def sync(self) -> None:
        assert not self._is_closed, "store used after close()"
        # Writes reach the OS at once (manual_wal_flush is off); this fdatasyncs the
        # WAL, which covers every batch written so far.
        target = self._written
        if target == self._synced:
            self.stats.skipped_syncs += 1
            return
        self._db.flush_wal(True)
        self._synced = max(self._synced, target)
        self.stats.syncs += 1

    def approximate_bytes(self) -> int:
        """Live data on disk plus memtables, as RocksDB estimates them."""
        total = 0
        for name in ("rocksdb.estimate-live-data-size", "rocksdb.cur-size-all-mem-tables"):
            total += self._db.property_int_value(name) or 0
        return total

    def close(self) -> None:
        """Sync, flush the memtable and close. A scan iterator still alive keeps the DB
        open underneath (rocksdict holds a reference), so finish scans first."""
        if self._is_closed:
            return
        self._is_closed = True
        self._db.flush_wal(True)
        self._db.close()


def _walk(cursor: RdictIter, limit: int | None) -> Iterator[tuple[bytes, bytes]]:
    yielded = 0
    while limit is None or yielded < limit:
        if not cursor.valid():
            # An IO error also ends the iteration; status() raises it rather than
            # letting it pass for the end of the range.
            cursor.status()
            return
        key = cursor.key()
        value = cursor.value()
        assert isinstance(key, bytes)
        assert isinstance(value, bytes)
        yield key, value
        yielded += 1
        cursor.next()
