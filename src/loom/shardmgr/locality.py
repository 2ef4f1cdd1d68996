"""The Akkio mapping's decisions: which μshard to move to which p-shard (DESIGN §2).

A keyspace with `mapping: akkio` places each μshard by where it is accessed: when most
of a μshard's accesses (`share_min`, e.g. 2/3) come from region R, and the p-shard that
owns it has its primary elsewhere, the μshard moves to a p-shard of the same keyspace
whose primary is in R (the one owning the fewest μshards). The moves themselves are
the resharding mover's (`loom.shardmgr.moves`); this module only decides. Primaries
follow too: a p-shard whose accesses come mostly from region R has R as its home
(`HomeRegions`), and the rebalancer hands its primary to an acceptor there
(`loom.shardmgr.rebalance`).

Hysteresis, so data does not flap between regions:
- a μshard stays at least `dwell_ms` where a move put it;
- moving it back to the region it last left needs `share_min + return_margin`;
- at most `moves_per_period_max` moves start in any `period_ms`;
- a μshard with fewer than `accesses_min` (decayed) accesses is not moved at all.

Pure: time arrives as `now`; decisions are sorted, never by set or hash order.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from loom.core.ids import ShardId, UShard
from loom.core.time import Instant
from loom.shardmgr.access import UShardAccess
from loom.shardmgr.routing import Keyspace

MAPPING_AKKIO = "akkio"


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalityParams:
    share_min: float = 2 / 3
    return_margin: float = 0.15
    accesses_min: float = 20.0
    dwell_ms: float = 30_000.0
    period_ms: float = 10_000.0
    moves_per_period_max: int = 4

    def problem(self) -> str | None:
        if not 0.5 < self.share_min <= 1:
            return f"share_min must be in (0.5, 1], not {self.share_min}"
        if not 0 <= self.return_margin <= 1 - self.share_min:
            return f"return_margin must be in [0, {1 - self.share_min:.3f}]"
        if self.accesses_min < 0 or self.dwell_ms < 0 or self.period_ms <= 0:
            return "accesses_min and dwell_ms must be ≥ 0, period_ms > 0"
        if self.moves_per_period_max < 1:
            return "moves_per_period_max must be ≥ 1"
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalityMove:
    keyspace: str
    ushard: UShard
    source: ShardId
    target: ShardId
    region: str
    share: float


Accesses = Mapping[tuple[str, int], Mapping[str, float]]


def accesses_by_ushard(
    reports: Sequence[UShardAccess], keyspace_of: Callable[[ShardId], str | None]
) -> dict[tuple[str, int], dict[str, float]]:
    """Sums the nodes' reports per (keyspace, μshard) and region: the replicas of a
    p-shard count separately (relaxed reads), and a moved μshard's old and new p-shards
    both count until the old counts fade."""
    totals: dict[tuple[str, int], dict[str, float]] = {}
    for row in reports:
        keyspace = keyspace_of(row.shard)
        if keyspace is None:
            continue
        regions = totals.setdefault((keyspace, row.ushard), {})
        regions[row.region] = regions.get(row.region, 0.0) + row.total
    return totals


def accesses_by_shard(
    reports: Sequence[UShardAccess], akkio: Callable[[ShardId], bool]
) -> dict[ShardId, dict[str, float]]:
    """Sums the nodes' reports per p-shard (of an akkio keyspace) and region."""
    totals: dict[ShardId, dict[str, float]] = {}
    for row in reports:
        if akkio(row.shard):
            regions = totals.setdefault(row.shard, {})
            regions[row.region] = regions.get(row.region, 0.0) + row.total
    return totals


@dataclass(slots=True)
class HomeRegions:
    """Each akkio p-shard's home: the region at least `share_min` of its accesses come
    from (at least `accesses_min` of them), where its primary belongs. A home, once
    set, holds for `dwell_ms` before another region can take it, and outlives a lull
    (a p-shard that nobody reads keeps its primary where it is)."""

    params: LocalityParams = field(default_factory=LocalityParams)
    homes: dict[ShardId, tuple[str, Instant]] = field(default_factory=dict)

    def update(
        self, now: Instant, mixes: Mapping[ShardId, Mapping[str, float]], shards: set[ShardId]
    ) -> dict[ShardId, str]:
        """Takes the latest access mixes; `shards`: the akkio p-shards that exist."""
        p = self.params
        for shard in [s for s in self.homes if s not in shards]:
            del self.homes[shard]
        for shard, regions in sorted(mixes.items()):
            total = sum(regions.values())
            if shard not in shards or total < max(p.accesses_min, 1e-9):
                continue
            region = min(sorted(r for r in regions if r), key=lambda r: -regions[r], default="")
            if not region or regions[region] / total < p.share_min:
                continue
            current = self.homes.get(shard)
            if current is None or (current[0] != region and now - current[1] >= p.dwell_ms):
                self.homes[shard] = (region, now)
        return {shard: region for shard, (region, _) in sorted(self.homes.items())}


@dataclass(slots=True)
class LocalityPlanner:
    params: LocalityParams = field(default_factory=LocalityParams)
    # (keyspace, μshard) → when its last move was decided and the region it left.
    last_move: dict[tuple[str, int], tuple[Instant, str]] = field(default_factory=dict)
    started: collections.deque[Instant] = field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        problem = self.params.problem()
        assert problem is None, problem

    def decide(
        self,
        now: Instant,
        keyspaces: Sequence[Keyspace],
        primary_region: Mapping[ShardId, str],
        accesses: Accesses,
        is_moving: Callable[[str, UShard], bool],
    ) -> list[LocalityMove]:
        """The moves to start now (the caller starts every one it gets)."""
        p = self.params
        while self.started and now - self.started[0] >= p.period_ms:
            self.started.popleft()
        budget = p.moves_per_period_max - len(self.started)
        candidates: list[tuple[float, LocalityMove]] = []
        for keyspace in sorted(keyspaces, key=lambda k: k.name):
            # Not during a shrink: a μshard must not move onto a p-shard being retired
            # (the shrink's moves would have to chase it; loom.shardmgr.shrink).
            if keyspace.spec.mapping != MAPPING_AKKIO or keyspace.retiring:
                continue
            for (name, ushard), regions in sorted(accesses.items()):
                if name != keyspace.name or not 0 <= ushard < keyspace.spec.ushards:
                    continue
                move = self._move_of(now, keyspace, UShard(ushard), regions, primary_region)
                if move is not None and not is_moving(name, move.ushard):
                    candidates.append((sum(regions.values()), move))
        candidates.sort(key=lambda c: (-c[0], c[1].keyspace, c[1].ushard))
        chosen = [move for _, move in candidates[: max(0, budget)]]
        for move in chosen:
            self.started.append(now)
            self.last_move[(move.keyspace, move.ushard)] = (
                now,
                primary_region.get(move.source, ""),
            )
        return chosen

    def _move_of(
        self,
        now: Instant,
        keyspace: Keyspace,
        ushard: UShard,
        regions: Mapping[str, float],
        primary_region: Mapping[ShardId, str],
    ) -> LocalityMove | None:
        p = self.params
        total = sum(regions.values())
        if total < p.accesses_min or total <= 0:
            return None
        region = min(sorted(r for r in regions if r), key=lambda r: -regions[r], default="")
        if not region:
            return None
        share = regions[region] / total
        source = keyspace.shard_of(ushard)
        if primary_region.get(source) == region:
            return None  # already served from there
        last = self.last_move.get((keyspace.name, ushard))
        needed = p.share_min
        if last is not None:
            decided_at, left = last
            if now - decided_at < p.dwell_ms:
                return None
            if left == region:
                needed = min(1.0, p.share_min + p.return_margin)
        if share < needed:
            return None
        owned = collections.Counter(keyspace.shard_of(u) for u in range(keyspace.spec.ushards))
        targets = sorted(
            (owned[s], s) for s in keyspace.shards() if primary_region.get(s) == region
        )
        if not targets:
            return None
        return LocalityMove(
            keyspace=keyspace.name,
            ushard=ushard,
            source=source,
            target=targets[0][1],
            region=region,
            share=share,
        )
