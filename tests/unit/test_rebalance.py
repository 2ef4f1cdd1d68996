"""The shard manager's placement policy: replace the dead after a grace period, absorb
new nodes, balance primaries — one move at a time, only while everything is settled."""

from __future__ import annotations

from loom.core.ids import Epoch, NodeId, ShardId
from loom.core.time import Instant
from loom.paxos.messages import Config
from loom.shardmgr.rebalance import ReplaceMember, ShardView, TransferPrimary, next_move
from loom.shardmgr.routing import NodeInfo

NOW = Instant(100_000.0)
FAILURE_MS = 600.0
GRACE_MS = 60_000.0


def node(name: str, region: str = "", tier: str = "wildcard") -> NodeInfo:
    return NodeInfo(node=NodeId(name), host="127.0.0.1", port=1, region=region, tier=tier)


def view(shard: int, acceptors: str, primary: str, *, settled: bool = True) -> ShardView:
    members = tuple(NodeId(a) for a in acceptors.split(","))
    return ShardView(
        shard=ShardId(shard),
        config=Config(Epoch(1), members, ()),
        primary=NodeId(primary),
        tier="wildcard",
        settled=settled,
    )


def decide(
    shards: list[ShardView], nodes: list[NodeInfo], silent: dict[str, float] | None = None
) -> ReplaceMember | TransferPrimary | None:
    silent = silent or {}
    reports = {n.node: Instant(NOW - silent.get(n.node, 0.0)) for n in nodes}
    return next_move(
        shards,
        {n.node: n for n in nodes},
        reports,
        NOW,
        failure_timeout_ms=FAILURE_MS,
        replace_after_ms=GRACE_MS,
    )


def test_nothing_to_do_in_a_balanced_cluster() -> None:
    shards = [view(1, "n1,n2,n3", "n1"), view(2, "n2,n3,n1", "n2"), view(3, "n3,n1,n2", "n3")]
    assert decide(shards, [node("n1"), node("n2"), node("n3")]) is None


def test_a_member_silent_past_the_grace_period_is_replaced_preferring_another_region() -> None:
    nodes = [node("n1", "a"), node("n2", "b"), node("n3", "c"), node("n4", "a"), node("n5", "c")]
    shards = [view(1, "n1,n2,n3", "n1")]
    move = decide(shards, nodes, {"n3": GRACE_MS + 1000})
    # n3 (region c) leaves; n5 keeps three regions, n4 would put two replicas in region a.
    assert isinstance(move, ReplaceMember)
    assert (move.shard, move.old, move.new) == (1, "n3", "n5")


def test_a_member_silent_for_less_than_the_grace_period_stays() -> None:
    nodes = [node("n1"), node("n2"), node("n3"), node("n4")]
    assert decide([view(1, "n1,n2,n3", "n1")], nodes, {"n3": GRACE_MS - 1000}) is None


def test_nothing_moves_while_a_shard_is_unsettled() -> None:
    nodes = [node("n1"), node("n2"), node("n3"), node("n4")]
    shards = [view(1, "n1,n2,n3", "n1", settled=False), view(2, "n1,n2,n3", "n2")]
    assert decide(shards, nodes, {"n3": GRACE_MS + 1000}) is None


def test_a_new_node_gets_a_replica_that_is_not_a_primary_first() -> None:
    nodes = [node("n1"), node("n2"), node("n3"), node("n4")]
    shards = [view(1, "n1,n2,n3", "n1"), view(2, "n2,n3,n1", "n2"), view(3, "n3,n1,n2", "n3")]
    move = decide(shards, nodes)
    assert isinstance(move, ReplaceMember)
    assert move.new == "n4"
    moved = next(s for s in shards if s.shard == move.shard)
    assert moved.primary != move.old


def test_primaries_move_to_an_acceptor_that_leads_two_fewer() -> None:
    nodes = [node("n1"), node("n2"), node("n3")]
    shards = [view(1, "n1,n2,n3", "n1"), view(2, "n1,n2,n3", "n1"), view(3, "n1,n2,n3", "n1")]
    move = decide(shards, nodes)
    assert isinstance(move, TransferPrimary)
    assert move.to in ("n2", "n3")


def test_no_balancing_while_a_member_is_down() -> None:
    nodes = [node("n1"), node("n2"), node("n3"), node("n4")]
    shards = [view(1, "n1,n2,n3", "n1"), view(2, "n2,n3,n1", "n2"), view(3, "n3,n1,n2", "n3")]
    assert decide(shards, nodes, {"n2": 5_000.0}) is None  # down, not yet past the grace


def test_only_nodes_of_the_shards_tier_are_candidates() -> None:
    nodes = [node("n1"), node("n2"), node("n3"), node("n4", tier="gold")]
    assert decide([view(1, "n1,n2,n3", "n1")], nodes, {"n3": GRACE_MS + 1000}) is None
