"""The placement policy by load and by tier: replicas and primaries move from the hottest
node to the coolest only on a clear imbalance (ratio and gap), once per cooldown, and
only when the move narrows the gap; counts decide when there is no load; a keyspace on
another tier moves one member at a time, its primary handed off first."""

from __future__ import annotations

from loom.core.ids import Epoch, NodeId, ShardId
from loom.core.time import Instant
from loom.host.load import LoadMeter
from loom.paxos.messages import Config
from loom.shardmgr.rebalance import (
    BalanceParams,
    ReplaceMember,
    ShardView,
    TransferPrimary,
    next_move,
    tier_progress,
)
from loom.shardmgr.routing import NodeInfo

NOW = Instant(100_000.0)
BALANCE = BalanceParams(
    imbalance_ratio_min=1.5, load_gap_min_per_s=20.0, load_total_min_per_s=20.0, cooldown_ms=10_000
)


def node(name: str, tier: str = "wildcard") -> NodeInfo:
    return NodeInfo(node=NodeId(name), host="127.0.0.1", port=1, tier=tier)


def view(
    shard: int, acceptors: str, primary: str, load: float = 0.0, tier: str = "wildcard"
) -> ShardView:
    return ShardView(
        shard=ShardId(shard),
        config=Config(Epoch(1), tuple(NodeId(a) for a in acceptors.split(",")), ()),
        primary=NodeId(primary),
        tier=tier,
        settled=True,
        load_per_s=load,
    )


def decide(
    shards: list[ShardView], nodes: list[NodeInfo], last_load_move_at: Instant | None = None
) -> ReplaceMember | TransferPrimary | None:
    return next_move(
        shards,
        {n.node: n for n in nodes},
        {n.node: NOW for n in nodes},
        NOW,
        failure_timeout_ms=600.0,
        replace_after_ms=60_000.0,
        balance=BALANCE,
        last_load_move_at=last_load_move_at,
    )


THREE = [node("n1"), node("n2"), node("n3")]


def test_a_hot_primary_node_hands_a_primary_to_a_cool_acceptor() -> None:
    # n1 leads 300 ops/s, n2 and n3 lead 10 each: equal counts, very unequal load.
    shards = [
        view(1, "n1,n2,n3", "n1", 200),
        view(2, "n1,n2,n3", "n1", 100),
        view(3, "n2,n1,n3", "n2", 10),
        view(4, "n3,n1,n2", "n3", 10),
    ]
    move = decide(shards, THREE)
    assert isinstance(move, TransferPrimary) and move.by_load
    # The 100 ops/s shard narrows the gap most (n1: 300 → 200, the target: 10 → 110).
    assert (move.shard, move.to) in ((2, "n2"), (2, "n3"))


def test_a_small_imbalance_moves_nothing() -> None:
    shards = [
        view(1, "n1,n2,n3", "n1", 110),
        view(2, "n2,n1,n3", "n2", 100),
        view(3, "n3,n1,n2", "n3", 95),
    ]
    assert decide(shards, THREE) is None  # ratio 110/95 < 1.5


def test_no_load_move_within_the_cooldown() -> None:
    shards = [view(1, "n1,n2,n3", "n1", 200), view(2, "n1,n2,n3", "n1", 100)]
    assert decide(shards, THREE, last_load_move_at=Instant(NOW - 5_000)) is None
    assert decide(shards, THREE, last_load_move_at=Instant(NOW - 10_000)) is not None


def test_a_shard_hotter_than_the_gap_stays_where_it_is() -> None:
    # One shard carries all the load: moving its primary would only move the hot spot.
    shards = [view(1, "n1,n2,n3", "n1", 500), view(2, "n2,n1,n3", "n2", 0)]
    assert decide(shards, THREE) is None


def test_a_shard_carrying_nearly_all_of_the_gap_or_a_trifle_of_it_stays() -> None:
    # n2 leads 75 ops/s (one shard of 70, idle ones of 5), n3 nothing: moving the 70
    # would only make n3 the hot one; moving a 5 would barely change anything.
    shards = [
        view(1, "n2,n1,n3", "n2", 70),
        view(2, "n2,n1,n3", "n2", 5),
        view(3, "n1,n2,n3", "n1", 60),
    ]
    assert decide(shards, THREE) is None


def test_without_load_primaries_are_balanced_by_count() -> None:
    shards = [view(s, "n1,n2,n3", "n1") for s in (1, 2, 3)]
    move = decide(shards, THREE)
    assert isinstance(move, TransferPrimary) and not move.by_load
    assert move.balancing  # held back for a while after an operator's hand-off


def test_replicas_move_from_the_hottest_node_to_the_coolest_of_the_tier() -> None:
    nodes = [*THREE, node("n4")]
    # Replicas: n1 3, n2 4, n3 4, n4 4 (spread 1). Load: n4 carries 185 ops/s, n1 70.
    shards = [
        view(1, "n1,n2,n4", "n2", 60),
        view(2, "n2,n3,n4", "n3", 60),
        view(3, "n1,n3,n4", "n3", 5),
        view(4, "n1,n2,n3", "n2", 5),
        view(5, "n2,n3,n4", "n3", 60),
    ]
    move = decide(shards, nodes)
    assert isinstance(move, ReplaceMember) and move.by_load
    # A 60 ops/s replica of a shard n1 is not in: the gap of 115 narrows to 5.
    assert (move.old, move.new) == ("n4", "n1")
    assert move.shard in (2, 5)


def test_a_load_move_never_widens_the_replica_count_spread() -> None:
    nodes = [*THREE, node("n4")]
    # n4 is cool but already holds as many replicas as n1 plus one.
    shards = [
        view(1, "n1,n2,n3", "n2", 200),
        view(2, "n2,n3,n4", "n2", 1),
        view(3, "n4,n3,n2", "n4", 1),
        view(4, "n4,n1,n2", "n4", 1),
    ]
    move = decide(shards, nodes)
    assert not (isinstance(move, ReplaceMember) and move.old == "n1" and move.new == "n4")


def test_a_keyspace_on_another_tier_moves_a_non_primary_member_first() -> None:
    nodes = [*THREE, node("g1", "gold"), node("g2", "gold"), node("g3", "gold")]
    shards = [view(1, "n1,n2,n3", "n1", tier="gold")]
    move = decide(shards, nodes)
    assert isinstance(move, ReplaceMember)
    assert move.old in ("n2", "n3") and move.new.startswith("g")
    assert not move.balancing  # a tier move goes on whatever the operator just did


def test_the_last_member_off_tier_is_the_primary_which_is_handed_off_first() -> None:
    nodes = [*THREE, node("g1", "gold"), node("g2", "gold"), node("g3", "gold")]
    shards = [view(1, "n1,g1,g2", "n1", tier="gold")]
    move = decide(shards, nodes)
    assert isinstance(move, TransferPrimary)
    assert move.to in ("g1", "g2")
    # Once handed off, n1 is replaced by the last gold node.
    after = decide([view(1, "n1,g1,g2", "g1", tier="gold")], nodes)
    assert isinstance(after, ReplaceMember)
    assert (after.old, after.new) == ("n1", "g3")


def test_tier_progress_counts_members_on_their_shards_tier() -> None:
    nodes = {n.node: n for n in [*THREE, node("g1", "gold"), node("g2", "gold")]}
    shards = [view(1, "n1,g1,g2", "n1", tier="gold"), view(2, "n1,n2,n3", "n1")]
    assert tier_progress(shards, nodes) == (5, 6)


def test_the_load_meter_reports_a_decayed_rate_and_forgets_gone_shards() -> None:
    meter = LoadMeter(window_ms=500, half_life_ms=1_000)
    shard = ShardId(1)
    assert meter.observe({shard: 0}, Instant(0)) == {shard: 0.0}
    rates = []
    for step in range(1, 41):  # 100 ops/s for 20 s
        rates.append(meter.observe({shard: 50 * step}, Instant(500 * step))[shard])
    assert rates == sorted(rates)  # rises monotonically towards the true rate
    assert 95 < rates[-1] <= 100
    for step in range(41, 81):  # then idle: decays
        rate = meter.observe({shard: 2000}, Instant(500 * step))[shard]
    assert rate < 5
    assert meter.observe({}, Instant(50_000)) == {}


def test_a_follower_left_on_the_tier_by_a_forgotten_change_is_promoted_first() -> None:
    nodes = [*THREE, node("g1", "gold"), node("g2", "gold"), node("g3", "gold")]
    stray = ShardView(
        shard=ShardId(1),
        config=Config(Epoch(4), (NodeId("n1"), NodeId("g1"), NodeId("n3")), (NodeId("g3"),)),
        primary=NodeId("g1"),
        tier="gold",
        settled=True,
    )
    move = decide([stray], nodes)
    assert isinstance(move, ReplaceMember)
    assert move.new == "g3"  # not g2, which would leave g3 a follower for ever


def regional(name: str, region: str) -> NodeInfo:
    return NodeInfo(node=NodeId(name), host="127.0.0.1", port=1, region=region)


REGIONS = [regional("n1", "a"), regional("n2", "b"), regional("n3", "c")]


def with_home(v: ShardView, home: str) -> ShardView:
    return ShardView(
        shard=v.shard,
        config=v.config,
        primary=v.primary,
        tier=v.tier,
        settled=v.settled,
        load_per_s=v.load_per_s,
        home=home,
    )


def test_a_primary_goes_to_the_region_its_accesses_come_from() -> None:
    shards = [with_home(view(1, "n1,n2,n3", "n1"), "b"), view(2, "n2,n1,n3", "n2")]
    move = decide(shards, REGIONS)
    assert isinstance(move, TransferPrimary)
    assert (move.shard, move.to) == (ShardId(1), NodeId("n2"))
    assert "region b" in move.reason
    # At home already, or no acceptor in its home region: nothing to do.
    assert decide([with_home(view(1, "n1,n2,n3", "n2"), "b")], REGIONS) is None
    assert decide([with_home(view(1, "n1,n3", "n1"), "b")], REGIONS) is None


def test_balancing_never_takes_a_primary_out_of_its_home_region() -> None:
    # n2 leads all three: balancing by count would hand one away, but not one whose
    # home is b (n2's region); the one without a home goes.
    shards = [
        with_home(view(1, "n1,n2,n3", "n2"), "b"),
        with_home(view(2, "n1,n2,n3", "n2"), "b"),
        view(3, "n1,n2,n3", "n2"),
    ]
    move = decide(shards, REGIONS)
    assert isinstance(move, TransferPrimary) and move.shard == ShardId(3)
    homes_only = [with_home(view(i, "n1,n2,n3", "n2"), "b") for i in (1, 2, 3)]
    assert decide(homes_only, REGIONS) is None
