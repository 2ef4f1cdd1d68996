"""Keyspace specs, μshard → p-shard ranges, and placement of p-shards on nodes."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.core.ids import NodeId, ShardId
from loom.shardmgr.routing import (
    DEFAULT_TIER,
    REGIONS_MAX,
    SHARDS_PER_KEYSPACE_MAX,
    USHARDS_MAX,
    Keyspace,
    KeyspaceSpec,
    NodeInfo,
    PlacementError,
    ShardPlacement,
    compact_ranges,
    place,
)

# ------------------------------------------------------------------ KeyspaceSpec.problem

VALID_SPECS = [
    KeyspaceSpec(name="a"),
    KeyspaceSpec(name="0"),
    KeyspaceSpec(name="_"),
    KeyspaceSpec(name="a.b-c_D9"),
    KeyspaceSpec(name="k" * 64),
    KeyspaceSpec(name="ks", shards=1, ushards=1, replication=1),
    KeyspaceSpec(name="ks", shards=SHARDS_PER_KEYSPACE_MAX, ushards=SHARDS_PER_KEYSPACE_MAX),
    KeyspaceSpec(name="ks", shards=SHARDS_PER_KEYSPACE_MAX, ushards=USHARDS_MAX),
    KeyspaceSpec(name="ks", ushards=USHARDS_MAX),
    KeyspaceSpec(name="ks", replication=5),
    KeyspaceSpec(name="ks", tier="t"),
    KeyspaceSpec(name="ks", tier="ssd.fast-1_x"),
    KeyspaceSpec(name="ks", tier="t" * 64),
    KeyspaceSpec(name="ks", regions=("eu",)),
    KeyspaceSpec(name="ks", regions=("r" * 64,)),
    KeyspaceSpec(name="ks", regions=tuple(f"r{i}" for i in range(REGIONS_MAX))),
]


@pytest.mark.parametrize("spec", VALID_SPECS, ids=repr)
def test_spec_problem_is_none_for_valid_edge_values(spec: KeyspaceSpec) -> None:
    assert spec.problem() is None


INVALID_SPECS = [
    (KeyspaceSpec(name=""), "keyspace name"),
    (KeyspaceSpec(name=".ks"), "keyspace name"),
    (KeyspaceSpec(name="-ks"), "keyspace name"),
    (KeyspaceSpec(name="k" * 65), "keyspace name"),
    (KeyspaceSpec(name="a b"), "keyspace name"),
    (KeyspaceSpec(name="a/b"), "keyspace name"),
    (KeyspaceSpec(name="ks\n"), "keyspace name"),
    (KeyspaceSpec(name="ключ"), "keyspace name"),
    (KeyspaceSpec(name="ks", shards=0), "shards must be"),
    (KeyspaceSpec(name="ks", shards=-1), "shards must be"),
    (KeyspaceSpec(name="ks", shards=SHARDS_PER_KEYSPACE_MAX + 1, ushards=USHARDS_MAX), "shards"),
    (KeyspaceSpec(name="ks", replication=0), "replication"),
    (KeyspaceSpec(name="ks", replication=2), "replication"),
    (KeyspaceSpec(name="ks", replication=4), "replication"),
    (KeyspaceSpec(name="ks", replication=7), "replication"),
    (KeyspaceSpec(name="ks", shards=4, ushards=3), "ushards"),
    (KeyspaceSpec(name="ks", ushards=0), "ushards"),
    (KeyspaceSpec(name="ks", ushards=USHARDS_MAX + 1), "ushards"),
    (KeyspaceSpec(name="ks", tier=""), "tier"),
    (KeyspaceSpec(name="ks", tier="a b"), "tier"),
    (KeyspaceSpec(name="ks", tier="t" * 65), "tier"),
    (KeyspaceSpec(name="ks", regions=("",)), "regions"),
    (KeyspaceSpec(name="ks", regions=("eu", "a b")), "regions"),
    (KeyspaceSpec(name="ks", regions=("r" * 65,)), "regions"),
    (KeyspaceSpec(name="ks", regions=tuple(f"r{i}" for i in range(REGIONS_MAX + 1))), "regions"),
]


@pytest.mark.parametrize(("spec", "names"), INVALID_SPECS, ids=repr)
def test_spec_problem_names_the_invalid_field(spec: KeyspaceSpec, names: str) -> None:
    problem = spec.problem()
    assert problem is not None
    assert names in problem


def test_spec_problem_quotes_the_rejected_value() -> None:
    problem = KeyspaceSpec(name="ks", shards=2000).problem()
    assert problem is not None and "2000" in problem


# ------------------------------------------------------------------ compact_ranges


def shard_ids(count: int) -> list[ShardId]:
    return [ShardId(100 + i) for i in range(count)]


@st.composite
def ushards_and_shards(draw: st.DrawFn) -> tuple[int, int]:
    ushards = draw(st.integers(1, USHARDS_MAX))
    shards = draw(st.integers(1, min(ushards, SHARDS_PER_KEYSPACE_MAX)))
    return ushards, shards


@settings(max_examples=150)
@given(ushards_and_shards())
def test_compact_ranges_cover_every_ushard_once_with_near_equal_sizes(
    sizes: tuple[int, int],
) -> None:
    ushards, count = sizes
    shards = shard_ids(count)
    ranges = compact_ranges(ushards, shards)
    # One range per p-shard, in the order given, the first starting at μshard 0.
    assert [shard for _, shard in ranges] == shards
    starts = [first for first, _ in ranges]
    assert starts[0] == 0
    # Strictly increasing starts ending below `ushards`: the ranges [start_i, start_i+1)
    # and [start_last, ushards) partition 0..ushards-1, so each μshard has exactly one owner.
    bounds = [*starts, ushards]
    range_sizes = [end - start for start, end in itertools.pairwise(bounds)]
    assert all(size >= 1 for size in range_sizes)
    assert sum(range_sizes) == ushards
    assert max(range_sizes) - min(range_sizes) <= 1


@settings(max_examples=80)
@given(ushards_and_shards(), st.data())
def test_compact_ranges_map_sampled_ushards_to_the_shard_of_their_range(
    sizes: tuple[int, int], data: st.DataObject
) -> None:
    ushards, count = sizes
    shards = shard_ids(count)
    keyspace = Keyspace(
        spec=KeyspaceSpec(name="ks", shards=count, ushards=ushards),
        placements=(),
        ranges=compact_ranges(ushards, shards),
    )
    samples = data.draw(st.lists(st.integers(0, ushards - 1), min_size=1, max_size=20))
    samples += [0, ushards - 1]
    for ushard in samples:
        assert keyspace.shard_of(ushard) == brute_force_owner(keyspace.ranges, ushards, ushard)


def test_compact_ranges_on_a_small_example() -> None:
    assert compact_ranges(10, [ShardId(7), ShardId(8), ShardId(9)]) == (
        (0, ShardId(7)),
        (3, ShardId(8)),
        (6, ShardId(9)),
    )
    assert compact_ranges(1, [ShardId(5)]) == ((0, ShardId(5)),)


def test_compact_ranges_give_every_shard_one_ushard_when_counts_are_equal() -> None:
    ranges = compact_ranges(1024, shard_ids(1024))
    assert [first for first, _ in ranges] == list(range(1024))


# ------------------------------------------------------------------ Keyspace.shard_of


def brute_force_owner(ranges: Sequence[tuple[int, ShardId]], ushards: int, ushard: int) -> ShardId:
    """The p-shard of the one range [first_i, first_i+1) that holds `ushard`, by scanning."""
    owners = [
        shard
        for i, (first, shard) in enumerate(ranges)
        if first <= ushard < (ranges[i + 1][0] if i + 1 < len(ranges) else ushards)
    ]
    assert len(owners) == 1
    return owners[0]


@st.composite
def split_keyspaces(draw: st.DrawFn) -> Keyspace:
    """Keyspaces whose ranges were split by moves: any sorted starts, shards repeating."""
    ushards = draw(st.integers(1, 512))
    starts = sorted(draw(st.sets(st.integers(1, ushards - 1), max_size=40)) if ushards > 1 else [])
    owners = draw(
        st.lists(
            st.integers(1, 6).map(ShardId),
            min_size=len(starts) + 1,
            max_size=len(starts) + 1,
        )
    )
    ranges = tuple(zip([0, *starts], owners, strict=True))
    return Keyspace(
        spec=KeyspaceSpec(name="ks", shards=1, ushards=ushards), placements=(), ranges=ranges
    )


@settings(max_examples=100)
@given(split_keyspaces())
def test_shard_of_agrees_with_a_scan_of_the_ranges_for_every_ushard(keyspace: Keyspace) -> None:
    ushards = keyspace.spec.ushards
    for ushard in range(ushards):
        assert keyspace.shard_of(ushard) == brute_force_owner(keyspace.ranges, ushards, ushard)


def test_shard_of_switches_owner_exactly_at_a_range_start() -> None:
    keyspace = Keyspace(
        spec=KeyspaceSpec(name="ks", shards=3, ushards=4096),
        placements=(),
        ranges=compact_ranges(4096, [ShardId(1), ShardId(2), ShardId(3)]),
    )
    # starts: 0, 1365, 2730
    assert keyspace.shard_of(0) == ShardId(1)
    assert keyspace.shard_of(1364) == ShardId(1)
    assert keyspace.shard_of(1365) == ShardId(2)
    assert keyspace.shard_of(2729) == ShardId(2)
    assert keyspace.shard_of(2730) == ShardId(3)
    assert keyspace.shard_of(4095) == ShardId(3)


def test_shard_of_refuses_an_ushard_outside_the_keyspace() -> None:
    keyspace = Keyspace(
        spec=KeyspaceSpec(name="ks", ushards=16),
        placements=(),
        ranges=compact_ranges(16, [ShardId(1)]),
    )
    with pytest.raises(AssertionError):
        keyspace.shard_of(16)
    with pytest.raises(AssertionError):
        keyspace.shard_of(-1)


# ------------------------------------------------------------------ place


def node(name: str, *, region: str = "", zone: str = "", tier: str = DEFAULT_TIER) -> NodeInfo:
    return NodeInfo(
        node=NodeId(name), host="127.0.0.1", port=7000, region=region, zone=zone, tier=tier
    )


def equal_nodes(count: int) -> list[NodeInfo]:
    return [node(f"n{i:02d}") for i in range(count)]


def grid(regions: int, zones: int, per_zone: int) -> list[NodeInfo]:
    return [
        node(f"r{r}z{z}n{n}", region=f"r{r}", zone=f"z{z}")
        for r in range(regions)
        for z in range(zones)
        for n in range(per_zone)
    ]


def spec_of(
    replication: int, *, tier: str = DEFAULT_TIER, regions: tuple[str, ...] = ()
) -> KeyspaceSpec:
    return KeyspaceSpec(name="ks", shards=1, replication=replication, tier=tier, regions=regions)


def place_fresh(
    spec: KeyspaceSpec, nodes: Sequence[NodeInfo], shards: int
) -> tuple[ShardPlacement, ...]:
    return place(spec, shard_ids(shards), nodes, {}, {})


def replica_counts(
    placements: Sequence[ShardPlacement], nodes: Sequence[NodeInfo]
) -> Counter[NodeId]:
    counts = Counter({n.node: 0 for n in nodes})
    counts.update(a for p in placements for a in p.acceptors)
    return counts


def primary_counts(
    placements: Sequence[ShardPlacement], nodes: Sequence[NodeInfo]
) -> Counter[NodeId]:
    counts = Counter({n.node: 0 for n in nodes})
    counts.update(p.acceptors[0] for p in placements)
    return counts


def test_place_returns_one_placement_per_shard_in_order() -> None:
    placements = place_fresh(spec_of(3), equal_nodes(5), 4)
    assert [p.shard for p in placements] == shard_ids(4)
    assert all(len(p.acceptors) == 3 for p in placements)
    assert place_fresh(spec_of(3), equal_nodes(5), 0) == ()


@pytest.mark.parametrize("replication", [3, 5])
def test_place_spreads_replicas_over_distinct_regions_when_there_are_enough(
    replication: int,
) -> None:
    nodes = grid(regions=5, zones=2, per_zone=2)
    by_node = {n.node: n for n in nodes}
    for p in place_fresh(spec_of(replication), nodes, 50):
        assert len({by_node[a].region for a in p.acceptors}) == replication


def test_place_spreads_replicas_over_distinct_zones_when_regions_run_out() -> None:
    nodes = grid(regions=1, zones=3, per_zone=3)
    by_node = {n.node: n for n in nodes}
    for p in place_fresh(spec_of(3), nodes, 30):
        assert len({by_node[a].zone for a in p.acceptors}) == 3


def test_place_uses_every_region_then_distinct_zones_inside_a_region() -> None:
    # 5 replicas over 2 regions of 3 zones: 3 + 2 (or 2 + 3), each region's on distinct zones.
    nodes = grid(regions=2, zones=3, per_zone=2)
    by_node = {n.node: n for n in nodes}
    for p in place_fresh(spec_of(5), nodes, 40):
        regions = Counter(by_node[a].region for a in p.acceptors)
        assert sorted(regions.values()) == [2, 3]
        for region in regions:
            zones = [by_node[a].zone for a in p.acceptors if by_node[a].region == region]
            assert len(set(zones)) == len(zones)


node_sets = st.lists(
    st.tuples(st.sampled_from(["", "r1", "r2", "r3"]), st.sampled_from(["", "za", "zb", "zc"])),
    min_size=1,
    max_size=14,
).map(lambda cells: [node(f"n{i:02d}", region=r, zone=z) for i, (r, z) in enumerate(cells)])


@settings(max_examples=120)
@given(node_sets, st.sampled_from([1, 3, 5]), st.integers(1, 30))
def test_place_spreads_over_regions_then_zones_and_never_repeats_a_node(
    nodes: list[NodeInfo], replication: int, shards: int
) -> None:
    if len(nodes) < replication:
        with pytest.raises(PlacementError):
            place_fresh(spec_of(replication), nodes, shards)
        return
    by_node = {n.node: n for n in nodes}
    regions_available = {n.region for n in nodes}
    for p in place_fresh(spec_of(replication), nodes, shards):
        assert len(set(p.acceptors)) == replication
        chosen = [by_node[a] for a in p.acceptors]
        regions = Counter(n.region for n in chosen)
        assert len(regions) == min(replication, len(regions_available))
        # Regions are filled evenly (as far as their nodes allow)...
        for region, count in regions.items():
            others = [r for r in regions_available if r != region]
            for other in others:
                in_other = sum(1 for n in nodes if n.region == other)
                if regions[other] < in_other:  # `other` still had a free node
                    assert count <= regions[other] + 1
            # ...and inside a region, zones are distinct while it has unused zones.
            zones_here = {n.zone for n in nodes if n.region == region}
            zones_chosen = {n.zone for n in chosen if n.region == region}
            assert len(zones_chosen) == min(count, len(zones_here))


@settings(max_examples=100)
@given(st.integers(1, 20), st.sampled_from([1, 3, 5]), st.integers(1, 200))
def test_place_balances_replicas_on_equal_nodes(nodes: int, replication: int, shards: int) -> None:
    if nodes < replication:
        return
    pool = equal_nodes(nodes)
    counts = replica_counts(place_fresh(spec_of(replication), pool, shards), pool)
    assert sum(counts.values()) == replication * shards
    assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize(
    ("nodes", "replication", "shards"),
    [(3, 3, 99), (4, 3, 100), (5, 3, 100), (10, 5, 100), (5, 1, 101), (9, 3, 90)],
)
def test_place_balances_primaries_exactly_in_simple_layouts(
    nodes: int, replication: int, shards: int
) -> None:
    pool = equal_nodes(nodes)
    counts = primary_counts(place_fresh(spec_of(replication), pool, shards), pool)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_place_keeps_primaries_within_two_of_each_other_on_equal_nodes() -> None:
    # The primary is the least-loaded of the shard's chosen acceptors, so perfect balance
    # is not promised (7 nodes, RF 3, 100 shards: 13..15); it never drifts further.
    for replication in (1, 3, 5):
        for count in range(replication, 16):
            pool = equal_nodes(count)
            for shards in (count, 2 * count + 1, 100):
                counts = primary_counts(place_fresh(spec_of(replication), pool, shards), pool)
                assert max(counts.values()) - min(counts.values()) <= 2, (count, shards)


def test_place_picks_as_primary_the_acceptor_with_fewest_primaries() -> None:
    pool = equal_nodes(3)
    primaries = {NodeId("n00"): 4, NodeId("n01"): 1, NodeId("n02"): 3}
    [placement] = place(spec_of(3), shard_ids(1), pool, {}, primaries)
    assert placement.acceptors[0] == NodeId("n01")
    assert sorted(placement.acceptors) == [NodeId("n00"), NodeId("n01"), NodeId("n02")]


def test_place_avoids_nodes_that_already_hold_many_replicas() -> None:
    pool = equal_nodes(5)
    replicas = {NodeId("n00"): 10, NodeId("n01"): 10}
    [placement] = place(spec_of(3), shard_ids(1), pool, replicas, {})
    assert sorted(placement.acceptors) == [NodeId("n02"), NodeId("n03"), NodeId("n04")]


def test_place_evens_out_existing_replica_load() -> None:
    pool = equal_nodes(4)
    replicas = {NodeId("n00"): 6}
    placements = place(spec_of(3), shard_ids(6), pool, replicas, {})
    counts = replica_counts(placements, pool)
    counts[NodeId("n00")] += 6
    assert set(counts.values()) == {6}


@settings(max_examples=60)
@given(node_sets, st.sampled_from([1, 3]), st.integers(1, 12), st.integers(0, 12))
def test_placing_in_two_batches_with_the_load_carried_over_equals_placing_at_once(
    nodes: list[NodeInfo], replication: int, shards: int, split: int
) -> None:
    if len(nodes) < replication:
        return
    split = min(split, shards)
    spec = spec_of(replication)
    ids = shard_ids(shards)
    at_once = place(spec, ids, nodes, {}, {})
    first = place(spec, ids[:split], nodes, {}, {})
    second = place(
        spec,
        ids[split:],
        nodes,
        replica_counts(first, nodes),
        primary_counts(first, nodes),
    )
    assert (*first, *second) == at_once


def test_place_only_uses_nodes_of_the_keyspace_tier() -> None:
    pool = [*(node(f"ssd{i}", tier="ssd") for i in range(3)), *equal_nodes(6)]
    for p in place_fresh(spec_of(3, tier="ssd"), pool, 10):
        assert sorted(p.acceptors) == [NodeId("ssd0"), NodeId("ssd1"), NodeId("ssd2")]
    for p in place_fresh(spec_of(3), pool, 10):
        assert not any(a.startswith("ssd") for a in p.acceptors)


def test_place_only_uses_nodes_in_the_keyspace_regions() -> None:
    pool = grid(regions=4, zones=1, per_zone=2)
    by_node = {n.node: n for n in pool}
    placements = place_fresh(spec_of(3, regions=("r1", "r3")), pool, 20)
    used = {by_node[a].region for p in placements for a in p.acceptors}
    assert used == {"r1", "r3"}


@pytest.mark.parametrize(
    ("spec", "pool", "expected"),
    [
        (
            spec_of(3),
            equal_nodes(2),
            "replication 3 needs 3 live nodes in tier 'wildcard'; 2 available",
        ),
        (
            spec_of(5),
            equal_nodes(4),
            "replication 5 needs 5 live nodes in tier 'wildcard'; 4 available",
        ),
        (spec_of(1), [], "replication 1 needs 1 live nodes in tier 'wildcard'; 0 available"),
        (
            spec_of(3, tier="ssd"),
            [*equal_nodes(5), node("s", tier="ssd")],
            "replication 3 needs 3 live nodes in tier 'ssd'; 1 available",
        ),
        (
            spec_of(3, regions=("eu",)),
            [
                *grid(regions=3, zones=1, per_zone=3),
                node("e1", region="eu"),
                node("e2", region="eu"),
            ],
            "replication 3 needs 3 live nodes in tier 'wildcard' in regions ['eu']; 2 available",
        ),
    ],
)
def test_place_explains_why_there_are_too_few_eligible_nodes(
    spec: KeyspaceSpec, pool: list[NodeInfo], expected: str
) -> None:
    with pytest.raises(PlacementError) as raised:
        place_fresh(spec, pool, 1)
    assert str(raised.value) == expected


def test_place_is_deterministic_and_ignores_the_order_nodes_arrive_in() -> None:
    pool = grid(regions=3, zones=2, per_zone=2) + equal_nodes(3)
    replicas = {NodeId("n00"): 2, NodeId("r1z0n1"): 1}
    primaries = {NodeId("r2z1n0"): 1}
    expected = place(spec_of(3), shard_ids(40), pool, replicas, primaries)
    assert place(spec_of(3), shard_ids(40), list(pool), dict(replicas), dict(primaries)) == expected
    rng = random.Random(7)
    for _ in range(10):
        shuffled = pool[:]
        rng.shuffle(shuffled)
        assert place(spec_of(3), shard_ids(40), iter(shuffled), replicas, primaries) == expected


def test_place_does_not_change_the_load_maps_it_is_given() -> None:
    replicas = {NodeId("n00"): 1}
    primaries = {NodeId("n01"): 1}
    place(spec_of(3), shard_ids(5), equal_nodes(4), replicas, primaries)
    assert replicas == {NodeId("n00"): 1}
    assert primaries == {NodeId("n01"): 1}
