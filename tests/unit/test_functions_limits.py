"""Dispatch control: allotments add up to the global limit however the partitions
are split among schedulers; buckets, AIMD and fair rounds behave as documented."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from loom.functions.limits import (
    Aimd,
    AimdSettings,
    Allotment,
    FairShare,
    LatencyWatch,
    TokenBucket,
    allotted_partitions,
    concurrency_share,
)
from loom.functions.worker import PREFETCH, PREFETCH_CALL_MS_MAX, capacity_for


@given(st.integers(1, 300), st.integers(1, 64), st.integers(1, 5), st.randoms())
def test_allotments_of_any_split_add_up_to_the_limit(
    limit: int, partitions: int, owners: int, rnd: random.Random
) -> None:
    owner_of = [rnd.randrange(owners) for _ in range(partitions)]
    splits = [[p for p in range(partitions) if owner_of[p] == o] for o in range(owners)]
    allotments = [
        Allotment.of(owned, partitions, rate_limit_per_s=float(limit), concurrency_max=limit)
        for owned in splits
    ]
    assert sum(a.concurrency or 0 for a in allotments) == limit
    assert abs(sum(a.rate_per_s or 0.0 for a in allotments) - limit) < 1e-6
    # Every partition a call may be placed in has at least one slot.
    for p in allotted_partitions(limit, partitions):
        assert concurrency_share(limit, partitions, p) >= 1


def test_a_small_concurrency_limit_places_calls_where_the_slots_are() -> None:
    assert allotted_partitions(None, 4) == [0, 1, 2, 3]
    assert allotted_partitions(2, 8) == [3, 7]
    alone = Allotment.of([0, 1, 2], 8, rate_limit_per_s=None, concurrency_max=2)
    assert alone.concurrency == 0 and alone.rate_per_s is None


def test_token_bucket_starts_empty_and_refills_to_its_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=5.0, at=0.0)
    assert bucket.available(0.0) == 0  # a new owner adds no burst of its own
    assert bucket.available(0.3) == 3
    bucket.take(3, 0.3)
    assert bucket.available(10.0) == 5
    bucket.reshape(rate=1.0, burst=2.0, now=10.0)
    assert bucket.available(10.0) == 2


def test_aimd_halves_once_per_cooldown_and_grows_additively() -> None:
    aimd = Aimd(AimdSettings(rate_initial=100, rate_max=200, increase_per_s=10, cooldown_s=1))
    aimd.overloaded(0.0)
    aimd.overloaded(0.5)  # the same overload: no second cut
    assert aimd.current(0.5) == 50 + 5
    aimd.overloaded(2.0)
    assert aimd.current(2.0) == (55 + 15) / 2
    assert aimd.current(100.0) == 200
    assert aimd.cuts == 2 and aimd.signals == 3 and not aimd.throttling


def test_fair_share_divides_by_weight_while_everyone_has_work() -> None:
    backlog = {"flood": 10**6, "small": 50, "heavy": 10**6}
    room = 400

    def take(tenant: str, allowance: int) -> int:
        count = min(allowance, backlog[tenant], room - sum(taken.values()))
        backlog[tenant] -= count
        taken[tenant] = taken.get(tenant, 0) + count
        return count

    taken: dict[str, int] = {}
    FairShare(quantum=10).run(["flood", "heavy", "small"], {"heavy": 2}, take)
    assert taken["small"] == 50  # its whole backlog, despite the flood
    assert taken["heavy"] >= 1.8 * taken["flood"]
    assert sum(taken.values()) == room


def trickle(fair: FairShare, tenants: list[str], passes: int, taken: dict[str, int]) -> None:
    """`passes` dispatch passes, each with room for one call, every tenant backlogged."""
    room = [0]

    def take_one(tenant: str, allowance: int) -> int:
        if room[0] == 0:
            return 0
        room[0] -= 1
        taken[tenant] = taken.get(tenant, 0) + 1
        return 1

    for _ in range(passes):
        room[0] = 1
        fair.run(tenants, {}, take_one)


def test_fair_share_holds_when_room_frees_one_call_per_pass() -> None:
    # A rate-limited downstream frees one token at a time: every pass has room for one
    # call. The share must still alternate, not go to the first tenant every time
    # (the bug a CI run caught: the flood got three calls to the quiet tenant's one).
    taken: dict[str, int] = {}
    trickle(FairShare(), ["flood", "quiet"], 200, taken)
    assert taken == {"flood": 100, "quiet": 100}


def test_a_tenant_back_from_idle_banks_no_credit() -> None:
    fair = FairShare()
    taken: dict[str, int] = {}
    trickle(fair, ["busy"], 100, taken)  # only "busy" has work
    trickle(fair, ["back", "busy"], 20, taken)  # "back" shares from now on, no catching up
    assert taken == {"busy": 110, "back": 10}


def test_aimd_grows_to_at_most_twice_the_rate_in_use() -> None:
    aimd = Aimd(AimdSettings(rate_initial=100, rate_max=10_000, increase_per_s=50))
    assert aimd.current(100.0, used=30.0) == 100  # never below the initial rate's ceiling
    assert aimd.current(200.0, used=400.0) == 800  # twice what is used
    assert aimd.current(300.0, used=10.0) == 800  # a lull does not cut it
    assert aimd.current(400.0) == 5_800  # without a measure: additive growth alone


def test_rising_latency_signals_after_warmup_and_the_baseline_does_not_follow() -> None:
    watch = LatencyWatch()
    assert not any(watch.observe(50.0) for _ in range(40))  # normal, and under the floor
    signals = [watch.observe(900.0) for _ in range(20)]
    assert signals[-1] and not signals[0]  # the fast average needs a few slow calls
    assert watch.base < 100.0  # the overload did not become the baseline
    assert not any(LatencyWatch().observe(900.0) for _ in range(20))  # warmup: no signal


def test_a_worker_prefetches_only_short_calls_of_unlimited_apps() -> None:
    assert capacity_for(16, None, limited=False) == 16  # nothing measured yet
    assert capacity_for(16, 5.0, limited=False) == 16 * (1 + PREFETCH)
    assert capacity_for(16, PREFETCH_CALL_MS_MAX + 1, limited=False) == 16  # others may be free
    assert capacity_for(16, 5.0, limited=True) == 16  # starts must keep the claims' pace
