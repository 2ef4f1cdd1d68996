"""Akkio placement: access counts (decay, bounded memory) and the pure move planner
with its hysteresis (dwell, return margin, moves per period)."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from loom.core.ids import NodeId, ShardId, UShard
from loom.core.time import Instant
from loom.host.requests import ReadRequest, WriteRequest
from loom.runtime.codec import ClientCall
from loom.runtime.locality import count_access
from loom.shardmgr.access import AccessCounter, AccessParams
from loom.shardmgr.locality import (
    HomeRegions,
    LocalityParams,
    LocalityPlanner,
    accesses_by_ushard,
)
from loom.shardmgr.routing import Keyspace, KeyspaceSpec, ShardPlacement, compact_ranges

SHARDS = (ShardId(1), ShardId(2), ShardId(3))
# p-shard 1's primary is in a, 2's in b, 3's in c.
PRIMARY_REGION = {ShardId(1): "a", ShardId(2): "b", ShardId(3): "c"}
PARAMS = LocalityParams(
    share_min=2 / 3,
    return_margin=0.15,
    accesses_min=10,
    dwell_ms=30_000,
    period_ms=10_000,
    moves_per_period_max=2,
)


def keyspace(mapping: str = "akkio") -> Keyspace:
    spec = KeyspaceSpec(name="ks", shards=3, ushards=6, mapping=mapping)
    return Keyspace(
        spec=spec,
        placements=tuple(ShardPlacement(s, (NodeId("n1"),)) for s in SHARDS),
        ranges=compact_ranges(6, SHARDS),
    )


def never_moving(_keyspace: str, _ushard: UShard) -> bool:
    return False


def test_access_counts_decay_by_half_life() -> None:
    counter = AccessCounter(AccessParams(half_life_ms=1000))
    for _ in range(8):
        counter.record(ShardId(1), 0, "b", is_write=False, now=Instant(0))
    counter.record(ShardId(1), 0, "b", is_write=True, now=Instant(0))
    (row,) = counter.report(Instant(1000))
    assert (row.reads, row.writes) == (4.0, 0.5)


def test_access_counter_memory_is_bounded_and_keeps_heavy_hitters() -> None:
    params = AccessParams(entries_per_shard_max=4, report_per_shard_max=2)
    counter = AccessCounter(params)
    for _ in range(50):
        counter.record(ShardId(1), 7, "b", is_write=False, now=Instant(0))
    for ushard in range(100):
        counter.record(ShardId(1), ushard + 100, "a", is_write=False, now=Instant(0))
    assert len(counter.counts[ShardId(1)]) == 4
    report = counter.report(Instant(0))
    assert len(report) == 2
    assert report[0].ushard == 7 and report[0].total == 50


def test_access_counter_ignores_bad_labels_and_unlabelled_clients() -> None:
    counter = AccessCounter()
    counter.record(ShardId(1), 0, "", is_write=False, now=Instant(0))
    counter.record(ShardId(1), 0, "bad label!", is_write=False, now=Instant(0))
    counter.record(ShardId(1), -3, "b", is_write=False, now=Instant(0))
    assert counter.report(Instant(0)) == ()
    assert counter.ignored == 2


def test_reports_from_several_replicas_and_pshards_sum_per_ushard() -> None:
    counter = AccessCounter()
    for shard in (ShardId(1), ShardId(2)):
        counter.record(shard, 3, "b", is_write=False, now=Instant(0))
    counter.record(ShardId(1), 3, "a", is_write=True, now=Instant(0))
    totals = accesses_by_ushard(
        counter.report(Instant(0)), {ShardId(1): "ks", ShardId(2): "ks"}.get
    )
    assert totals == {("ks", 3): {"a": 1.0, "b": 2.0}}


def test_a_ushard_read_mostly_from_b_moves_to_the_pshard_whose_primary_is_in_b() -> None:
    planner = LocalityPlanner(PARAMS)
    accesses = {("ks", 0): {"b": 80.0, "a": 20.0}}  # μshard 0 lives on p-shard 1 (a)
    moves = planner.decide(Instant(0), [keyspace()], PRIMARY_REGION, accesses, never_moving)
    assert [(m.ushard, m.source, m.target, m.region) for m in moves] == [
        (0, ShardId(1), ShardId(2), "b")
    ]


@pytest.mark.parametrize(
    "accesses",
    [
        {("ks", 0): {"b": 60.0, "a": 40.0}},  # under 2/3
        {("ks", 0): {"b": 9.0}},  # too few accesses
        {("ks", 2): {"b": 90.0}},  # μshard 2 is on p-shard 2 already (primary in b)
        {("ks", 0): {"d": 90.0}},  # no p-shard has its primary in d
        {("other", 0): {"b": 90.0}},  # not this keyspace
    ],
)
def test_no_move_without_a_clear_remote_majority(
    accesses: dict[tuple[str, int], dict[str, float]],
) -> None:
    planner = LocalityPlanner(PARAMS)
    assert planner.decide(Instant(0), [keyspace()], PRIMARY_REGION, accesses, never_moving) == []


def test_compact_keyspaces_and_ushards_already_moving_stay_put() -> None:
    accesses = {("ks", 0): {"b": 90.0}}
    planner = LocalityPlanner(PARAMS)
    assert (
        planner.decide(Instant(0), [keyspace("compact")], PRIMARY_REGION, accesses, never_moving)
        == []
    )
    assert (
        planner.decide(Instant(0), [keyspace()], PRIMARY_REGION, accesses, lambda k, u: True) == []
    )


def test_a_shrinking_keyspace_moves_nothing_for_locality() -> None:
    shrinking = msgspec.structs.replace(keyspace(), retiring=(ShardId(3),))
    accesses = {("ks", 0): {"b": 90.0}, ("ks", 2): {"c": 90.0}}
    planner = LocalityPlanner(PARAMS)
    assert planner.decide(Instant(0), [shrinking], PRIMARY_REGION, accesses, never_moving) == []


def test_moves_per_period_are_capped_heaviest_first() -> None:
    planner = LocalityPlanner(PARAMS)
    accesses = {("ks", u): {"c": 100.0 + u} for u in range(4)}  # μshards 0-3: p-shards 1, 2
    first = planner.decide(Instant(0), [keyspace()], PRIMARY_REGION, accesses, never_moving)
    assert [m.ushard for m in first] == [3, 2]
    assert (
        planner.decide(Instant(5_000), [keyspace()], PRIMARY_REGION, accesses, never_moving) == []
    )
    later = planner.decide(Instant(10_000), [keyspace()], PRIMARY_REGION, accesses, never_moving)
    assert [m.ushard for m in later] == [1, 0]


def test_a_moved_ushard_dwells_and_needs_a_margin_to_move_back() -> None:
    planner = LocalityPlanner(PARAMS)
    ks = keyspace()
    (move,) = planner.decide(
        Instant(0), [ks], PRIMARY_REGION, {("ks", 0): {"b": 90.0}}, never_moving
    )
    ks = ks.with_ushard(move.ushard, move.target)  # the mover committed it
    back = {("ks", 0): {"a": 90.0, "b": 10.0}}
    # Within the dwell time nothing moves, however clear the majority.
    assert planner.decide(Instant(29_000), [ks], PRIMARY_REGION, back, never_moving) == []
    # After it, going back to the region it left needs share_min + return_margin.
    marginal = {("ks", 0): {"a": 75.0, "b": 25.0}}
    assert planner.decide(Instant(31_000), [ks], PRIMARY_REGION, marginal, never_moving) == []
    (again,) = planner.decide(Instant(31_000), [ks], PRIMARY_REGION, back, never_moving)
    assert (again.target, again.region) == (ShardId(1), "a")


def test_no_flapping_when_access_alternates_between_regions() -> None:
    """Reads alternate between a and b every second (and, in a second phase, every 20 s)
    for ten minutes; counts decay with a 10 s half-life. With fast alternation the
    μshard never moves (neither region holds 2/3 of the decayed counts); with slow
    alternation it moves at most twice in 30 phases (the return margin), and never
    twice within the dwell time."""
    for phase_s, most_moves in ((1, 0), (20, 2)):
        counter = AccessCounter(AccessParams(half_life_ms=10_000))
        planner = LocalityPlanner(PARAMS)
        ks = keyspace()
        move_times: list[float] = []
        for second in range(600):
            now = Instant(second * 1000.0)
            region = "a" if (second // phase_s) % 2 == 0 else "b"
            shard = ks.shard_of(0)
            for _ in range(10):
                counter.record(shard, 0, region, is_write=False, now=now)
            accesses = accesses_by_ushard(counter.report(now), lambda s: "ks")
            for move in planner.decide(now, [ks], PRIMARY_REGION, accesses, never_moving):
                ks = ks.with_ushard(move.ushard, move.target)
                move_times.append(now)
        assert len(move_times) <= most_moves
        gaps = [b - a for a, b in itertools.pairwise(move_times)]
        assert all(gap >= PARAMS.dwell_ms for gap in gaps)


def test_bad_locality_settings_are_refused() -> None:
    assert LocalityParams(share_min=0.4).problem() is not None
    assert LocalityParams(moves_per_period_max=0).problem() is not None
    assert KeyspaceSpec(name="ks", mapping="nearest").problem() is not None
    assert KeyspaceSpec(name="ks", mapping="akkio").problem() is None


def test_nodes_count_reads_and_writes_of_calls_that_name_region_and_ushard() -> None:
    counter = AccessCounter()
    read = ReadRequest(token=1, ushard=UShard(4), key=b"k")
    write = WriteRequest(token=2, command=b"")
    for call in (
        ClientCall(shard=ShardId(1), request=read, region="b", ushard=4),
        ClientCall(shard=ShardId(1), request=write, region="b", ushard=4),
        ClientCall(shard=ShardId(1), request=read, region="", ushard=4),  # no region
        ClientCall(shard=ShardId(1), request=read),  # an older client: neither
    ):
        count_access(counter, call, Instant(0))
    (row,) = counter.report(Instant(0))
    assert (row.ushard, row.region, row.reads, row.writes) == (4, "b", 1.0, 1.0)


def test_access_reports_are_capped_per_node_and_go_out_once_per_interval() -> None:
    params = AccessParams(report_per_shard_max=4, report_rows_max=5, report_interval_ms=1000)
    counter = AccessCounter(params)
    for shard in range(1, 4):
        for ushard in range(4):
            for _ in range(shard + ushard):
                counter.record(ShardId(shard), ushard, "b", is_write=False, now=Instant(0))
    first = counter.report_due(Instant(0))
    assert first is not None and len(first) == 5
    assert first[0].shard == ShardId(3) and first[0].ushard == 3  # the largest first
    assert counter.report_due(Instant(999)) is None
    assert counter.report_due(Instant(1000)) is not None


def test_a_p_shards_home_is_where_most_accesses_come_from_and_holds_for_its_dwell() -> None:
    homes = HomeRegions(LocalityParams(share_min=2 / 3, accesses_min=20, dwell_ms=30_000))
    one, two = ShardId(1), ShardId(2)
    shards = {one, two}
    mostly_b = {"b": 80.0, "a": 20.0}
    assert homes.update(Instant(0), {one: mostly_b, two: {"a": 50.0, "b": 50.0}}, shards) == {
        one: "b"  # two: no region has 2/3 of its accesses
    }
    assert homes.update(Instant(1_000), {one: {"a": 90.0, "b": 10.0}}, shards) == {one: "b"}
    assert homes.update(Instant(31_000), {one: {"a": 90.0, "b": 10.0}}, shards) == {one: "a"}
    assert homes.update(Instant(32_000), {one: {"a": 5.0}}, shards) == {one: "a"}  # a lull
    assert homes.update(Instant(33_000), {}, {two}) == {}  # p-shard one is gone
