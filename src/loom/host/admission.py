"""Per-keyspace admission on one node: token buckets for reads/s and writes/s, and a
stored-bytes ceiling (DESIGN §7, ADR 0008). Pure: time arrives as `now` (ms, one
node's monotonic clock).

Rules of this module:
- a bucket holds at most `rate × BURST_S` tokens (at least one), starts full, refills
  continuously; a request takes one token or is refused with the time until one is
  there (`retry_after_ms`, at least 1): never queued, never silently dropped;
- a refused request takes nothing, so a client that retries after the hint is not
  punished twice;
- reconfiguring keeps a bucket's tokens (capped at the new size): a routing push that
  repeats the same quota every 2 s must not hand out a fresh burst each time;
- a keyspace with no configured limit is admitted at the cost of one dict lookup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A bucket holds this many seconds of its rate: short bursts pass, the average holds.
BURST_S = 0.5
# The client's back-off floor for a refusal: even a huge rate answers at least this.
RETRY_AFTER_MS_MIN = 1


class TokenBucket:
    """`rate_per_s` tokens per second, at most `capacity` held."""

    __slots__ = ("capacity", "rate_per_s", "tokens", "updated_at")

    def __init__(self, rate_per_s: float, now: float) -> None:
        assert rate_per_s > 0 and math.isfinite(rate_per_s)
        self.rate_per_s = rate_per_s
        self.capacity = max(1.0, rate_per_s * BURST_S)
        self.tokens = self.capacity
        self.updated_at = now

    def reconfigure(self, rate_per_s: float, now: float) -> None:
        assert rate_per_s > 0 and math.isfinite(rate_per_s)
        self._refill(now)
        self.rate_per_s = rate_per_s
        self.capacity = max(1.0, rate_per_s * BURST_S)
        self.tokens = min(self.tokens, self.capacity)

    def _refill(self, now: float) -> None:
        # A clock that did not move (or a caller's `now` from before) adds nothing.
        elapsed_ms = max(0.0, now - self.updated_at)
        self.tokens = min(self.capacity, self.tokens + elapsed_ms * self.rate_per_s / 1000)
        self.updated_at = max(self.updated_at, now)

    def take(self, now: float, count: int = 1) -> int | None:
        """None if `count` tokens were taken; else the ms until they will be there. (A
        count over the bucket's capacity takes all of it: it could never be there.)"""
        self._refill(now)
        need = min(float(count), self.capacity)
        if self.tokens >= need:
            self.tokens -= need
            return None
        missing = need - self.tokens
        return max(RETRY_AFTER_MS_MIN, math.ceil(missing * 1000 / self.rate_per_s))


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyspaceLimits:
    """What this node enforces for one keyspace; None is unlimited."""

    reads_per_s: float | None = None
    writes_per_s: float | None = None
    bytes_max: int | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was not admitted. `retry_after_ms` None: waiting will not help
    (the keyspace is over its stored-bytes quota until data is deleted)."""

    message: str
    retry_after_ms: int | None


class Admission:
    """The buckets of every keyspace this node serves."""

    def __init__(self) -> None:
        self._limits: dict[str, KeyspaceLimits] = {}
        self._reads: dict[str, TokenBucket] = {}
        self._writes: dict[str, TokenBucket] = {}
        self._stored: dict[str, int] = {}

    def configure(self, limits: dict[str, KeyspaceLimits], now: float) -> None:
        """Sets every keyspace's limits at once (keyspaces left out are unlimited)."""
        for name in sorted(set(self._limits) - set(limits)):
            del self._limits[name]
        for name in sorted(limits):
            self._limits[name] = limits[name]
            _set_bucket(self._reads, name, limits[name].reads_per_s, now)
            _set_bucket(self._writes, name, limits[name].writes_per_s, now)
        for buckets in (self._reads, self._writes):
            for name in [n for n in buckets if n not in limits]:
                del buckets[name]

    def set_stored_bytes(self, stored: dict[str, int]) -> None:
        """What this node stores per keyspace (measured off the request path)."""
        self._stored = dict(stored)

    def limits(self, keyspace: str) -> KeyspaceLimits | None:
        return self._limits.get(keyspace)

    def admit_read(self, keyspace: str, now: float, keys: int = 1) -> Refusal | None:
        bucket = self._reads.get(keyspace)
        if bucket is None:
            return None
        wait_ms = bucket.take(now, keys)
        if wait_ms is None:
            return None
        return Refusal(f"keyspace {keyspace!r} is over its reads/s quota", wait_ms)

    def is_over_bytes(self, keyspace: str) -> bool:
        limits = self._limits.get(keyspace)
        if limits is None or limits.bytes_max is None:
            return False
        return self._stored.get(keyspace, 0) > limits.bytes_max

    def admit_write(self, keyspace: str, now: float, *, adds_data: bool) -> Refusal | None:
        """`adds_data`: the write may grow the keyspace (a delete does not, so it passes
        a keyspace that is over its stored-bytes quota: that is how it gets back under)."""
        if adds_data and self.is_over_bytes(keyspace):
            limits = self._limits[keyspace]
            return Refusal(
                f"keyspace {keyspace!r} stores {self._stored.get(keyspace, 0)} bytes on this "
                f"node, over its share {limits.bytes_max} of the bytes quota; delete data or "
                "raise the quota",
                None,
            )
        bucket = self._writes.get(keyspace)
        if bucket is None:
            return None
        wait_ms = bucket.take(now)
        if wait_ms is None:
            return None
        return Refusal(f"keyspace {keyspace!r} is over its writes/s quota", wait_ms)


def _set_bucket(buckets: dict[str, TokenBucket], name: str, rate: float | None, now: float) -> None:
    if rate is None or rate <= 0:
        # A zero share (no p-shard here) is not enforced here: the node refuses those
        # requests as NOT_PRIMARY / not hosted on its own.
        buckets.pop(name, None)
        return
    bucket = buckets.get(name)
    if bucket is None:
        buckets[name] = TokenBucket(rate, now)
    elif bucket.rate_per_s != rate:
        bucket.reconfigure(rate, now)
