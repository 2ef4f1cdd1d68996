"""Per-p-shard load on one node: operations per second (commands applied plus reads
served), decayed exponentially so the shard manager balances by recent load, not by
a burst or by all-time totals.

Rules of this module:
- pure: the caller passes the cumulative counts and `now` (its monotonic clock, ms);
- a figure is a rate over at least `window_ms` of counts, smoothed with half-life
  `half_life_ms`; a counter that goes backwards (a replica rebuilt) restarts the shard;
- a shard no longer reported is forgotten.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from loom.core.ids import ShardId
from loom.core.time import Instant

WINDOW_MS = 500.0
HALF_LIFE_MS = 10_000.0


@dataclass(slots=True)
class _Meter:
    at: float
    count: int
    per_s: float = 0.0


class LoadMeter:
    def __init__(self, *, window_ms: float = WINDOW_MS, half_life_ms: float = HALF_LIFE_MS) -> None:
        assert window_ms > 0 and half_life_ms > 0
        self.window_ms = window_ms
        self.half_life_ms = half_life_ms
        self._meters: dict[ShardId, _Meter] = {}

    def observe(self, counts: Mapping[ShardId, int], now: Instant) -> dict[ShardId, float]:
        """Takes each shard's cumulative operation count; returns its decayed ops/s."""
        for gone in [s for s in self._meters if s not in counts]:
            del self._meters[gone]
        for shard, count in counts.items():
            meter = self._meters.get(shard)
            if meter is None or count < meter.count:
                self._meters[shard] = _Meter(at=now, count=count)
                continue
            elapsed = now - meter.at
            if elapsed < self.window_ms:
                continue
            rate = (count - meter.count) * 1000.0 / elapsed
            keep = math.pow(0.5, elapsed / self.half_life_ms)
            meter.per_s = keep * meter.per_s + (1 - keep) * rate
            meter.at, meter.count = now, count
        return {shard: round(m.per_s, 2) for shard, m in sorted(self._meters.items())}
