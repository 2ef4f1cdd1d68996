"""An in-memory `KVStore` twin with a crash switch, for the simulator and for tests.

Rules:
- pure and deterministic: no clock, no randomness, no threads, no IO. The simulator
  decides when a crash happens and how much of the unsynced tail survives it;
- same contract as every backend (see `loom.storage.api`); `crash()` is the worst
  case that contract allows: every batch written since the last sync is lost,
  unless the caller chooses to keep a prefix of them (a tail of the WAL that
  happened to reach the disk). It never keeps batch N+1 while losing batch N;
- `scan` returns a point-in-time view: later writes do not show up in it, as with
  a RocksDB iterator;
- the live state is a dict plus a sorted key list. Unsynced batches are kept as
  undo records (key, value before), so `sync()` is O(1) and a crash costs only
  what it throws away.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeAlias

from loom.storage.api import WriteBatch

# (key, value before the change, or None when the key was absent)
_Undo: TypeAlias = list[tuple[bytes, bytes | None]]


@dataclass(slots=True)
class MemoryStoreStats:
    """Plain counters; the simulator reads them into its trace."""

    batches: int = 0
    # Durability points: sync() calls and write(..., sync=True).
    syncs: int = 0
    crashes: int = 0
    batches_lost: int = 0


class MemoryStore:
    """An ordered byte-key store in memory that can lose its unsynced tail on `crash()`."""

    __slots__ = ("_is_closed", "_keys", "_unsynced", "_values", "stats")

    def __init__(self) -> None:
        self._values: dict[bytes, bytes] = {}
        # Sorted; the same keys as `_values`. Python compares bytes as raw unsigned
        # bytes, which is the order the contract asks for.
        self._keys: list[bytes] = []
        # One undo list per batch written since the last durability point, oldest first.
        self._unsynced: list[_Undo] = []
        self._is_closed = False
        self.stats = MemoryStoreStats()

    # --- the KVStore port -------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        assert not self._is_closed, "store used after close()"
        return self._values.get(key)

    def scan(
        self, start: bytes, end: bytes, *, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        assert not self._is_closed, "store used after close()"
        assert limit is None or limit >= 0
        lo = bisect_left(self._keys, start)
        hi = max(lo, bisect_left(self._keys, end))
        if limit is not None:
            hi = min(hi, lo + limit)
        # Materialised now, so the caller sees the store as it was at the call.
        values = self._values
        return iter([(key, values[key]) for key in self._keys[lo:hi]])

    def write(self, batch: WriteBatch, *, sync: bool) -> None:
        assert not self._is_closed, "store used after close()"
        undo: _Undo = []
        try:
            for start, end in batch.ranges_deleted:
                assert start <= end
                self._delete_range(start, end, undo)
            for key, value in batch.ops:
                if value is None:
                    self._delete(key, undo)
                else:
                    self._put(key, value, undo)
        except BaseException:
            # A batch is all or nothing even when it is malformed half way through.
            self._undo(undo)
            raise
        self.stats.batches += 1
        if sync:
            self._make_durable()
        else:
            self._unsynced.append(undo)

    def sync(self) -> None:
        assert not self._is_closed, "store used after close()"
        self._make_durable()

    def close(self) -> None:
        # A clean shutdown persists everything, as RocksDB's close does.
        if not self._is_closed:
            self._make_durable()
            self._is_closed = True

    # --- simulation controls ----------------------------------------------------

    @property
    def unsynced_batches(self) -> int:
        """Batches a crash could lose right now."""
        return len(self._unsynced)

    def crash(self, *, unsynced_batches_kept: int = 0) -> None:
        """Lose power and recover: keep the durable state plus the oldest
        `unsynced_batches_kept` unsynced batches, drop the rest.

        The store is usable (open) afterwards, as after a restart; the batches that
        survived were read back from disk, so they are durable now.
        """
        assert unsynced_batches_kept >= 0
        kept = min(unsynced_batches_kept, len(self._unsynced))
        lost = self._unsynced[kept:]
        for undo in reversed(lost):
            self._undo(undo)
        self._unsynced.clear()
        self._is_closed = False
        self.stats.crashes += 1
        self.stats.batches_lost += len(lost)

    def __len__(self) -> int:
        return len(self._keys)

    # --- helpers ----------------------------------------------------------------

    def _make_durable(self) -> None:
        self._unsynced.clear()
        self.stats.syncs += 1

    def _put(self, key: bytes, value: bytes, undo: _Undo) -> None:
        before = self._values.get(key)
        if before is None:
            insort(self._keys, key)
        self._values[key] = value
        undo.append((key, before))

    def _delete(self, key: bytes, undo: _Undo) -> None:
        before = self._values.pop(key, None)
        if before is None:
            return
        index = bisect_left(self._keys, key)
        assert self._keys[index] == key
        del self._keys[index]
        undo.append((key, before))

    def _delete_range(self, start: bytes, end: bytes, undo: _Undo) -> None:
        lo = bisect_left(self._keys, start)
        hi = max(lo, bisect_left(self._keys, end))
        for key in self._keys[lo:hi]:
            undo.append((key, self._values.pop(key)))
        del self._keys[lo:hi]

    def _undo(self, undo: _Undo) -> None:
        # Newest change first, so a key touched twice ends at its oldest value.
        scratch: _Undo = []
        for key, before in reversed(undo):
            if before is None:
                self._delete(key, scratch)
            else:
                self._put(key, before, scratch)
        assert len(self._keys) == len(self._values)
