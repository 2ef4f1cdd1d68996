"""When the shard manager grows a keyspace by itself (automatic split): a p-shard that
stores too many bytes or applies too many commands per second makes its keyspace grow
through the ordinary reshard path (docs/protocols/resharding.md, ADR 0012).

Rules of this module:
- pure: the caller passes what the nodes reported (bytes per p-shard from its primary,
  smoothed commands per second) and `now`; `decide` returns the splits to ask for;
- hysteresis: a keyspace must be over a threshold for `sustain_ms` in a row before it
  splits (one hot report does nothing), and after a split it waits `cooldown_ms`
  before the next one (the moved μshards' load and size need time to show on their
  new p-shards); a keyspace being resharded is never split and its over-time restarts;
- a split doubles the p-shard count, bounded by the μshard count and `shards_max`;
  at the bound nothing is asked (and nothing is repeated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from loom.core.ids import ShardId
from loom.core.time import Instant


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitParams:
    enabled: bool = True
    # A p-shard over either threshold is hot; None: that threshold is off.
    bytes_max: int | None = 1 << 30
    ops_per_s_max: float | None = 20_000.0
    shards_max: int = 64  # the manager never grows a keyspace above this by itself
    sustain_ms: float = 10_000.0
    cooldown_ms: float = 120_000.0

    def problem(self) -> str | None:
        if self.bytes_max is not None and self.bytes_max < 1:
            return f"split bytes_max must be at least 1, not {self.bytes_max}"
        if self.ops_per_s_max is not None and not self.ops_per_s_max > 0:
            return f"split ops_per_s_max must be above 0, not {self.ops_per_s_max}"
        if self.shards_max < 1:
            return f"split shards_max must be at least 1, not {self.shards_max}"
        if self.sustain_ms < 0 or self.cooldown_ms < 0:
            return "split sustain_ms and cooldown_ms must not be negative"
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardLoad:
    shard: ShardId
    stored_bytes: int  # as its primary last measured it (0: not measured yet)
    ops_per_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyspaceLoad:
    name: str
    ushards: int
    shards: tuple[ShardLoad, ...]
    resharding: bool  # moves planned or under way, or p-shards being retired


@dataclass(frozen=True, slots=True, kw_only=True)
class Split:
    name: str
    shards: int  # the p-shard count to reshard to
    reason: str


@dataclass(slots=True)
class AutoSplitter:
    params: SplitParams = field(default_factory=SplitParams)
    # Since when each keyspace has been over a threshold without a break.
    over_since: dict[str, Instant] = field(default_factory=dict)
    last_split: dict[str, Instant] = field(default_factory=dict)

    def decide(self, keyspaces: Sequence[KeyspaceLoad], now: Instant) -> list[Split]:
        if not self.params.enabled:
            return []
        splits = []
        for keyspace in sorted(keyspaces, key=lambda k: k.name):
            split = self._decide_one(keyspace, now)
            if split is not None:
                splits.append(split)
        known = {k.name for k in keyspaces}
        for gone in [n for n in self.over_since if n not in known]:
            del self.over_since[gone]
        return splits

    def _decide_one(self, keyspace: KeyspaceLoad, now: Instant) -> Split | None:
        name = keyspace.name
        reason = self._hot(keyspace)
        if keyspace.resharding or reason is None:
            self.over_since.pop(name, None)
            return None
        since = self.over_since.setdefault(name, now)
        if now - since < self.params.sustain_ms:
            return None
        last = self.last_split.get(name)
        if last is not None and now - last < self.params.cooldown_ms:
            return None
        have = len(keyspace.shards)
        target = min(2 * have, keyspace.ushards, self.params.shards_max)
        if target <= have:
            return None
        self.last_split[name] = now
        del self.over_since[name]
        return Split(name=name, shards=target, reason=reason)

    def _hot(self, keyspace: KeyspaceLoad) -> str | None:
        """Why the keyspace is over a threshold (its first hot p-shard), or None."""
        p = self.params
        for load in sorted(keyspace.shards, key=lambda s: s.shard):
            if p.bytes_max is not None and load.stored_bytes > p.bytes_max:
                return f"p-shard {load.shard} stores {load.stored_bytes} bytes > {p.bytes_max}"
            if p.ops_per_s_max is not None and load.ops_per_s > p.ops_per_s_max:
                return (
                    f"p-shard {load.shard} applies {load.ops_per_s:.0f} commands/s "
                    f"> {p.ops_per_s_max:g}"
                )
        return None
