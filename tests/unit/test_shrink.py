"""The states of a shrink (loom.shardmgr.shrink): which p-shards stay, where μshards go,
and when the emptied p-shards may leave the keyspace."""

from __future__ import annotations

import pytest

from loom.core.ids import NodeId, ShardId, UShard
from loom.shardmgr.moves import plan_reshard
from loom.shardmgr.routing import Keyspace, KeyspaceSpec, ShardPlacement, compact_ranges
from loom.shardmgr.shrink import (
    goal_mapping,
    is_moving_phase,
    retire_problem,
    retired,
    shrinking,
    staying,
    stranded,
    without_retiring,
)

SHARDS = tuple(ShardId(s) for s in (1, 2, 3, 4))
USHARDS = 16


def keyspace() -> Keyspace:
    return Keyspace(
        spec=KeyspaceSpec(name="ks", shards=4, ushards=USHARDS),
        placements=tuple(ShardPlacement(s, (NodeId("n1"),)) for s in SHARDS),
        ranges=compact_ranges(USHARDS, SHARDS),
    )


def moved_all(ks: Keyspace) -> Keyspace:
    for ushard, target in plan_reshard(ks.mapping(), goal_mapping(ks)):
        ks = ks.with_ushard(ushard, target)
    return ks


def test_a_shrink_keeps_the_first_pshards_and_plans_moves_only_off_the_retiring_ones() -> None:
    ks = shrinking(keyspace(), 2)
    assert staying(ks) == SHARDS[:2] and ks.retiring == SHARDS[2:]
    plan = plan_reshard(ks.mapping(), goal_mapping(ks))
    assert {target for _, target in plan} <= set(SHARDS[:2])
    assert goal_mapping(ks) == dict(enumerate([SHARDS[0]] * 8 + [SHARDS[1]] * 8))


def test_a_pshard_still_mapped_or_still_holding_a_ushard_is_not_retired() -> None:
    ks = shrinking(keyspace(), 2)
    assert stranded(ks) == [UShard(u) for u in range(8, 16)]
    assert retire_problem(ks, {}) == "8 μshards are still mapped to retiring p-shards"
    done = moved_all(ks)
    assert stranded(done) == []
    # The mapping is clean, but what the replicas say decides.
    assert retire_problem(done, {SHARDS[2]: ()}) == "p-shard 4 did not say what it owns"
    holding = {SHARDS[2]: (), SHARDS[3]: (UShard(12),)}
    assert retire_problem(done, holding) == "p-shard 4 still owns μshards [12]"
    assert retire_problem(done, {SHARDS[2]: (), SHARDS[3]: ()}) is None


def test_retiring_goes_moving_then_dropping_then_done() -> None:
    ks = moved_all(shrinking(keyspace(), 1))
    assert is_moving_phase(ks)
    dropping = without_retiring(ks)
    assert not is_moving_phase(dropping)
    assert dropping.shards() == SHARDS[:1] and dropping.spec.shards == 1
    assert dropping.retiring == SHARDS[1:]  # still named until their replicas are dropped
    assert retired(dropping).retiring == ()


def test_the_retiring_pshards_cannot_leave_while_a_ushard_is_mapped_to_them() -> None:
    with pytest.raises(AssertionError):
        without_retiring(shrinking(keyspace(), 2))
