"""Weighted fair queuing across tenants (deficit round robin): shares by weight, a quiet
tenant waits at most one round, bounds per tenant and in total, FIFO per tenant."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from loom.host.fair_queue import QUANTUM, FairQueue


def queue(per_tenant_max: int = 10_000, total_max: int = 100_000) -> FairQueue[tuple[str, int]]:
    return FairQueue(per_tenant_max=per_tenant_max, total_max=total_max)


def test_a_quiet_tenant_is_served_in_the_first_round_behind_a_noisy_backlog() -> None:
    fair = queue()
    for i in range(5000):
        assert fair.push("noisy", ("noisy", i))
    assert fair.push("quiet", ("quiet", 0))
    first = fair.pop(2 * QUANTUM)
    assert ("quiet", 0) in first
    assert len(fair) == 5000 - 2 * QUANTUM + 1


def test_busy_tenants_share_by_weight() -> None:
    fair = queue()
    fair.set_weights({"gold": 3, "bronze": 1})
    for i in range(4000):
        fair.push("gold", ("gold", i))
        fair.push("bronze", ("bronze", i))
    taken = Counter(tenant for tenant, _ in fair.pop(2000))
    assert taken["gold"] == 1500 and taken["bronze"] == 500


def test_each_tenant_is_served_in_arrival_order() -> None:
    fair = queue()
    for i in range(100):
        fair.push("a", ("a", i))
        fair.push("b", ("b", i))
    popped = fair.pop(7) + fair.pop(1000)
    for tenant in "ab":
        assert [i for t, i in popped if t == tenant] == list(range(100))


def test_bounds_refuse_instead_of_growing() -> None:
    fair = queue(per_tenant_max=3, total_max=5)
    assert all(fair.push("noisy", ("noisy", i)) for i in range(3))
    assert not fair.push("noisy", ("noisy", 3))  # its own queue is full
    assert fair.push("quiet", ("quiet", 0))  # others still get in
    assert fair.push("other", ("other", 0))
    assert not fair.push("fourth", ("fourth", 0))  # all queues together are full
    assert fair.queued("noisy") == 3 and len(fair) == 5


def test_a_tenant_that_empties_its_queue_keeps_no_credit() -> None:
    fair = queue()
    fair.set_weights({"a": 1, "b": 1})
    fair.push("a", ("a", 0))
    assert fair.pop(10) == [("a", 0)]  # a used 1 of its QUANTUM credit, then left
    for i in range(50):
        fair.push("a", ("a", i))
        fair.push("b", ("b", i))
    taken = Counter(t for t, _ in fair.pop(2 * QUANTUM))
    assert taken == {"a": QUANTUM, "b": QUANTUM}


@settings(max_examples=100, deadline=None)
@given(
    weights=st.dictionaries(st.sampled_from("abcd"), st.integers(1, 5), min_size=1),
    pops=st.lists(st.integers(1, 50), min_size=1, max_size=40),
)
def test_backlogged_tenants_get_their_weighted_share_within_one_round(
    weights: dict[str, int], pops: list[int]
) -> None:
    fair = queue()
    fair.set_weights(weights)
    for tenant in sorted(weights):
        for i in range(3000):
            fair.push(tenant, (tenant, i))
    taken: Counter[str] = Counter()
    for count in pops:
        popped = fair.pop(count)
        assert len(popped) == count
        taken.update(t for t, _ in popped)
    total = sum(taken.values())
    weight_sum = sum(weights.values())
    for tenant, weight in weights.items():
        fair_share = total * weight / weight_sum
        # Off by at most one round's quantum of any tenant.
        assert abs(taken[tenant] - fair_share) <= QUANTUM * max(weights.values()) * 2
