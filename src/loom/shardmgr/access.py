"""Access counts per μshard and client region, kept by each node, reported to the sm.

The Akkio mapping (`loom.shardmgr.locality`) places a μshard where it is accessed; its
input is these counts. Rules:
- counts decay exponentially (`half_life_ms`): a region that stopped reading fades;
- memory is bounded: at most `entries_per_shard_max` (μshard, region) entries per
  p-shard; a new entry over the limit evicts the entry with the smallest decayed count,
  so the heavy hitters stay (their counts are what a move decision needs);
- a report carries at most `report_per_shard_max` entries per p-shard and
  `report_rows_max` in all, the largest, and goes out at most every
  `report_interval_ms` (`report_due`), so heartbeats stay small on a node with many
  p-shards;
- input comes from clients: a bad region label or μshard is ignored and counted, never
  asserted on.

Pure: time arrives as `now` (ms, monotonic).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from msgspec import Struct

from loom.core.ids import ShardId
from loom.core.time import Instant
from loom.shardmgr.routing import LABEL, USHARDS_MAX

# Counts below this are forgotten at report time.
COUNT_FORGET = 0.01


class UShardAccess(Struct, frozen=True, array_like=True):
    """Decayed accesses of one μshard of one p-shard from one client region."""

    shard: ShardId
    ushard: int
    region: str
    reads: float
    writes: float

    @property
    def total(self) -> float:
        return self.reads + self.writes


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessParams:
    half_life_ms: float = 10_000.0
    entries_per_shard_max: int = 64
    report_per_shard_max: int = 32
    report_rows_max: int = 1024
    report_interval_ms: float = 1000.0

    def __post_init__(self) -> None:
        assert self.half_life_ms > 0 and self.report_interval_ms >= 0
        assert 1 <= self.report_per_shard_max <= self.entries_per_shard_max
        assert self.report_rows_max >= 1


@dataclass(slots=True)
class _Count:
    reads: float
    writes: float
    at: float

    def decayed(self, now: float, half_life_ms: float) -> tuple[float, float]:
        factor = 0.5 ** (max(0.0, now - self.at) / half_life_ms)
        return self.reads * factor, self.writes * factor


@dataclass(slots=True)
class AccessCounter:
    params: AccessParams = field(default_factory=AccessParams)
    counts: dict[ShardId, dict[tuple[int, str], _Count]] = field(default_factory=dict)
    ignored: int = 0  # accesses with a bad region label or μshard
    reported_at: float = float("-inf")

    def record(
        self, shard: ShardId, ushard: int, region: str, *, is_write: bool, now: Instant
    ) -> None:
        if not region:
            return  # a client that gave no region: nothing to place by
        if not (0 <= ushard < USHARDS_MAX and LABEL.fullmatch(region)):
            self.ignored += 1
            return
        entries = self.counts.setdefault(shard, {})
        key = (ushard, region)
        count = entries.get(key)
        if count is None:
            if len(entries) >= self.params.entries_per_shard_max:
                self._evict_smallest(entries, now)
            count = entries[key] = _Count(0.0, 0.0, now)
        reads, writes = count.decayed(now, self.params.half_life_ms)
        count.reads, count.writes, count.at = reads, writes, now
        if is_write:
            count.writes += 1
        else:
            count.reads += 1

    def _evict_smallest(self, entries: dict[tuple[int, str], _Count], now: float) -> None:
        half_life = self.params.half_life_ms
        smallest = min(sorted(entries), key=lambda k: sum(entries[k].decayed(now, half_life)))
        del entries[smallest]

    def report(self, now: Instant) -> tuple[UShardAccess, ...]:
        """The largest decayed counts of every p-shard (and forgets faded ones)."""
        half_life = self.params.half_life_ms
        out: list[UShardAccess] = []
        for shard in sorted(self.counts):
            entries = self.counts[shard]
            rows = []
            for (ushard, region), count in sorted(entries.items()):
                reads, writes = count.decayed(now, half_life)
                if reads + writes < COUNT_FORGET:
                    del entries[(ushard, region)]
                    continue
                rows.append(UShardAccess(shard, ushard, region, round(reads, 3), round(writes, 3)))
            if not entries:
                del self.counts[shard]
            rows.sort(key=lambda r: (-r.total, r.ushard, r.region))
            out.extend(rows[: self.params.report_per_shard_max])
        if len(out) > self.params.report_rows_max:
            out.sort(key=lambda r: (-r.total, r.shard, r.ushard, r.region))
            del out[self.params.report_rows_max :]
        return tuple(out)

    def report_due(self, now: Instant) -> tuple[UShardAccess, ...] | None:
        """`report(now)` if `report_interval_ms` passed since the last one, else None
        (the heartbeat then carries no access rows, and the manager keeps the last)."""
        if now - self.reported_at < self.params.report_interval_ms:
            return None
        self.reported_at = now
        return self.report(now)
