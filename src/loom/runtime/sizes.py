"""How many bytes each p-shard's kv state takes on this node, for the stored-bytes quota
(ADR 0008). RocksDB's estimates are per database, not per key range, so we count:
key + value lengths of the shard's kv namespace (data, dedupe table, metadata; not the
log, whose length is bounded by truncation).

Rules of this module:
- runs in the storage thread (it reads the store), a bounded number of items per call,
  so a big shard never holds up a turn: a pass over all shards takes as many calls as
  it needs, and each shard's figure is replaced when its own pass ends. The figure is
  an approximation that lags writes by one pass; the quota is approximate by design;
- a shard no longer hosted is forgotten at the next call.
"""

from __future__ import annotations

from collections.abc import Collection

from loom.core.ids import ShardId
from loom.host import layout
from loom.host.shard import shard_prefix
from loom.storage.api import KVStore

# Items read per call; the node calls once per report (every 100 ms).
ITEMS_PER_CALL_MAX = 5_000


class ShardSizes:
    def __init__(self) -> None:
        self.bytes: dict[ShardId, int] = {}
        self._shard: ShardId | None = None  # the shard being counted
        self._after: bytes | None = None  # the last key counted in it
        self._counted = 0

    def measure(self, store: KVStore, shards: Collection[ShardId]) -> dict[ShardId, int]:
        """Counts up to ITEMS_PER_CALL_MAX more items; the latest complete figures."""
        for gone in [s for s in self.bytes if s not in shards]:
            del self.bytes[gone]
        if self._shard not in shards:
            self._start(min(shards, default=None))
        budget = ITEMS_PER_CALL_MAX
        while self._shard is not None and budget > 0:
            base = shard_prefix(self._shard)
            start = base + layout.STATE if self._after is None else self._after + b"\x00"
            end = base + layout.STATE_END
            seen = 0
            for key, value in store.scan(start, end, limit=budget):
                seen += 1
                self._counted += len(key) - len(base) + len(value)
                self._after = key
            budget -= seen
            if budget > 0:  # the scan ended before the budget: the shard is counted
                self.bytes[self._shard] = self._counted
                later = sorted(s for s in shards if s > self._shard)
                self._start(later[0] if later else None)
                if self._shard is None:
                    break  # next call starts the next pass from the first shard
        return dict(self.bytes)

    def _start(self, shard: ShardId | None) -> None:
        self._shard, self._after, self._counted = shard, None, 0
