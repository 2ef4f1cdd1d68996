"""Dispatch control, pure and clock-injected: token buckets, allotments of a global
limit to the schedulers that own DurableQ partitions, AIMD controllers for downstream
back-pressure, and weighted fair selection across tenants (DESIGN §8).

How a global limit holds across schedulers without talking: a function's limit is
divided among the DurableQ partitions once, by a fixed rule, and each partition has
exactly one owner (leases fenced in the store). A scheduler may use the sum of the
shares of the partitions it owns. The shares add up to the limit, so the schedulers
together never exceed it, whatever their number.
- Concurrency C over P partitions: partition p gets floor(C(p+1)/P) - floor(Cp/P)
  slots. With C < P only C partitions get a slot; a function's calls are placed only
  in those (`allotted_partitions`), so no call waits in a partition that may never run it.
- Rate R: each allotted partition gets R / (number of allotted partitions), and the
  burst is divided the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from loom.core.errors import InvalidArgument

# A bucket never holds less than one token's room, or a tiny allotment could never
# dispatch anything.
BURST_S = 0.1
T = TypeVar("T")


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

    def current(self, now: float) -> float:
        """The rate now, after growing for the quiet time since the last update."""
        if now > self.grew_at:
            grown = self.rate + (now - self.grew_at) * self.settings.increase_per_s
            self.rate = min(self.settings.rate_max, grown)
            self.grew_at = now
        return self.rate

    @property
    def throttling(self) -> bool:
        return self.rate < self.settings.rate_max


def fair_rounds(
    tenants: list[T],
    weights: dict[T, int],
    take: Callable[[T, int], int],
    *,
    quantum: int = 8,
) -> dict[T, int]:
    """Weighted fair share by deficit round robin: in each round a tenant may take up
    to `weight × quantum` calls (`take(tenant, allowance)` takes some and says how
    many; 0 when it cannot take more now), so a tenant with a backlog of millions gets
    its share and no more while others have work. Rounds go on until no tenant can
    take anything. Returns the takes."""
    taken = dict.fromkeys(tenants, 0)
    active = list(tenants)
    while active:
        still = []
        for tenant in active:
            allowance = weights.get(tenant, 1) * quantum
            while allowance > 0:
                count = take(tenant, allowance)
                if count <= 0:
                    break
                taken[tenant] += count
                allowance -= count
            if allowance <= 0:
                still.append(tenant)
        active = still
    return taken
