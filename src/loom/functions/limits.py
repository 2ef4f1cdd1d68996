"""Dispatch control, pure and clock-injected: token buckets, allotments of a global
limit to the schedulers that own DurableQ partitions, AIMD controllers for downstream
back-pressure, and weighted fair selection across tenants (DESIGN §8).

How a global limit holds across schedulers without talking: a function's limit is
divided among the DurableQ partitions once, by a fixed rule, and each partition has
exactly one owner (leases fenced in the store). A scheduler may use the sum of the
shares of the partitions it owns. The shares add up to the limit, so the schedulers
together never exceed it, whatever their number.
- Concurrency C over P partitions: partition p gets floor(C(p+1)/P) - floor(Cp/P)
  slots, used only by that partition's calls (the scheduler checks it per partition),
  so a partition's running index is its whole use and a new owner inherits it exactly.
  With C < P only C partitions get a slot; a function's calls are placed only in those
  (`allotted_partitions`), so no call waits in a partition that may never run it.
- Rate R: each allotted partition gets R / (number of allotted partitions), and the
  burst is divided the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from loom.core.errors import InvalidArgument

# A bucket never holds less than one token's room, or a tiny allotment could never
# dispatch anything.
BURST_S = 0.1


def allotted_partitions(concurrency_max: int | None, partitions: int) -> list[int]:
    """Partitions in which a function's calls are placed: all of them, or with a
    concurrency limit below the partition count, the ones that get a slot."""
    if concurrency_max is None or concurrency_max >= partitions:
        return list(range(partitions))
    return [p for p in range(partitions) if concurrency_share(concurrency_max, partitions, p)]


def concurrency_share(concurrency_max: int, partitions: int, partition: int) -> int:
    c, n, p = concurrency_max, partitions, partition
    return (c * (p + 1)) // n - (c * p) // n


@dataclass(frozen=True, slots=True)
class Allotment:
    """One scheduler's part of one function's limits, from the partitions it owns."""

    rate_per_s: float | None  # None: no rate limit
    burst: float
    concurrency: int | None  # None: no concurrency limit

    @staticmethod
    def of(
        owned: Iterable[int],
        partitions: int,
        *,
        rate_limit_per_s: float | None,
        concurrency_max: int | None,
    ) -> Allotment:
        allotted = allotted_partitions(concurrency_max, partitions)
        mine = sorted(set(owned).intersection(allotted))
        share = len(mine) / len(allotted)
        rate: float | None = None
        burst = 0.0
        if rate_limit_per_s is not None:
            rate = rate_limit_per_s * share
            # At least one token of room, or a small share could never dispatch.
            burst = max(1.0, rate_limit_per_s * BURST_S * share) if mine else 0.0
        concurrency = None
        if concurrency_max is not None:
            concurrency = sum(concurrency_share(concurrency_max, partitions, p) for p in mine)
        return Allotment(rate_per_s=rate, burst=burst, concurrency=concurrency)


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens per second up to `burst`; starts empty, so a scheduler that just
    took over partitions cannot add a burst to the one its predecessor spent."""

    rate: float
    burst: float
    tokens: float = 0.0
    at: float = 0.0

    def refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = max(self.at, now)

    def available(self, now: float) -> int:
        self.refill(now)
        return math.floor(self.tokens)

    def take(self, count: int, now: float) -> None:
        self.refill(now)
        self.tokens -= count

    def reshape(self, rate: float, burst: float, now: float) -> None:
        self.refill(now)
        self.rate, self.burst = rate, burst
        self.tokens = min(self.tokens, burst)


@dataclass(frozen=True, slots=True)
class AimdSettings:
    rate_initial: float = 200.0
    rate_min: float = 1.0
    rate_max: float = 100_000.0
    decrease_factor: float = 0.5
    increase_per_s: float = 50.0
    # One cut per this long: the signals of one overload come in a burst.
    cooldown_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.rate_min <= self.rate_initial <= self.rate_max:
            raise InvalidArgument("need 0 < rate_min <= rate_initial <= rate_max")
        if not 0 < self.decrease_factor < 1 or self.increase_per_s <= 0:
            raise InvalidArgument("decrease_factor must be in (0, 1), increase_per_s > 0")


@dataclass(slots=True)
class Aimd:
    """Additive increase, multiplicative decrease of a downstream's dispatch rate:
    halved on overload (at most once per cooldown), raised slowly while quiet."""

    settings: AimdSettings = field(default_factory=AimdSettings)
    rate: float = 0.0
    cut_at: float = -math.inf
    grew_at: float = 0.0
    cuts: int = 0
    signals: int = 0

    def __post_init__(self) -> None:
        self.rate = self.rate or self.settings.rate_initial

    def overloaded(self, now: float) -> None:
        self.signals += 1
        if now - self.cut_at < self.settings.cooldown_s:
            return
        self.current(now)
        self.rate = max(self.settings.rate_min, self.rate * self.settings.decrease_factor)
        self.cut_at = self.grew_at = now
        self.cuts += 1

    def current(self, now: float, *, used: float | None = None) -> float:
        """The rate now, after growing for the quiet time since the last update. With
        `used` (the rate actually dispatched lately), it grows to at most twice that:
        a rate nobody uses proves nothing, and a controller that crept far above what
        the downstream ever saw would need many cuts once it pushes back."""
        if now > self.grew_at:
            ceiling = self.settings.rate_max
            if used is not None:
                ceiling = min(ceiling, max(self.settings.rate_initial, 2 * used))
            grown = self.rate + (now - self.grew_at) * self.settings.increase_per_s
            self.rate = max(min(self.rate, grown), min(ceiling, grown))
            self.grew_at = now
        return self.rate

    @property
    def throttling(self) -> bool:
        return self.rate < self.settings.rate_max


@dataclass(slots=True)
class LatencyWatch:
    """Rising latency as an overload signal (DESIGN §8): a fast average of a function's
    call durations against a slow baseline that learns only while the fast one is near
    it, so an overload does not become the new normal."""

    factor: float = 4.0
    floor_ms: float = 100.0  # durations below this never signal
    warmup: int = 20  # calls seen before any signal
    fast: float = 0.0
    base: float = 0.0
    samples: int = 0

    def observe(self, duration_ms: float) -> bool:
        """Takes one duration; True when the recent ones are far above the baseline."""
        self.samples += 1
        if self.samples == 1:
            self.fast = self.base = duration_ms
            return False
        self.fast += 0.1 * (duration_ms - self.fast)  # one outlier is not an overload
        if self.fast <= 1.5 * self.base:
            self.base += 0.02 * (duration_ms - self.base)
        return self.samples > self.warmup and self.fast > max(
            self.floor_ms, self.factor * self.base
        )


class FairShare:
    """Weighted fair share of dispatch across tenants, by start-time fair queuing: each
    tenant has a virtual time that grows by `calls / weight` as it is served, and the
    tenant furthest behind goes next. The virtual times persist across dispatch passes,
    so when only a trickle of room frees at a time (one token per pass) it still goes
    to tenants in turn, not always to the first in some fixed order. A tenant that had
    no work starts at the least virtual time of those that do, so idleness banks no
    credit and a tenant with a backlog of millions gets its share and no more."""

    def __init__(self, quantum: int = 8) -> None:
        self.quantum = quantum
        self.vtime: dict[str, float] = {}

    def run(
        self, tenants: list[str], weights: dict[str, int], take: Callable[[str, int], int]
    ) -> dict[str, int]:
        """One pass: `take(tenant, allowance)` takes up to `allowance` calls and says
        how many (0 when it cannot take more now); goes on until no tenant can take
        anything. Returns the takes."""
        floor = min((self.vtime[t] for t in tenants if t in self.vtime), default=0.0)
        self.vtime = {t: max(self.vtime.get(t, floor), floor) for t in tenants}
        taken = dict.fromkeys(tenants, 0)
        active = set(tenants)
        while active:
            tenant = min(active, key=lambda t: (self.vtime[t], t))
            weight = weights.get(tenant, 1)
            count = take(tenant, weight * self.quantum)
            if count <= 0:
                active.discard(tenant)
                continue
            taken[tenant] += count
            self.vtime[tenant] += count / weight
        return taken
