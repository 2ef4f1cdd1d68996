"""Pieces of resharding outside the kv state machine: mapping versions, the μshards a
p-shard was created with, and a host that answers MOVED for what it does not own."""

from __future__ import annotations

from loom.core.ids import Epoch, Incarnation, NodeId, ShardId, UShard
from loom.core.time import Instant, WallMs
from loom.host.requests import Consistency, ErrorCode, ErrorReply, ReadReply, ReadRequest
from loom.host.shard import ShardHost
from loom.paxos.messages import Config
from loom.paxos.params import ReplicaParams
from loom.paxos.replica import Assignment
from loom.shardmgr.routing import Keyspace, KeyspaceSpec, ShardPlacement, compact_ranges
from loom.storage.memory import MemoryStore

A, B, C = ShardId(1), ShardId(2), ShardId(3)


def keyspace() -> Keyspace:
    spec = KeyspaceSpec(name="ks", shards=3, ushards=8)
    return Keyspace(
        spec=spec,
        placements=tuple(ShardPlacement(s, (NodeId("n1"),)) for s in (A, B, C)),
        ranges=compact_ranges(8, (A, B)),
    )


def test_a_committed_move_gives_the_next_mapping_version_with_merged_ranges() -> None:
    before = keyspace()
    after = before.with_ushard(4, C).with_ushard(5, C)
    assert [after.shard_of(u) for u in range(8)] == [A, A, A, A, C, C, B, B]
    assert after.ranges == ((0, A), (4, C), (6, B))
    assert after.mapping_version == before.mapping_version + 2
    back = after.with_ushard(4, B).with_ushard(5, B)
    assert back.ranges == before.ranges  # adjacent ranges of one p-shard merge again


def test_a_placement_names_the_ushards_its_pshard_was_created_with() -> None:
    assert ShardPlacement(A, (), initial=((0, 2), (5, 6))).initial_ushards() == frozenset(
        {UShard(0), UShard(1), UShard(5)}
    )
    assert ShardPlacement(A, (), initial=()).initial_ushards() == frozenset()
    assert ShardPlacement(A, ()).initial_ushards() is None  # before moves: every μshard


def _host(store: MemoryStore) -> ShardHost:
    return ShardHost(
        shard=A,
        node=NodeId("n1"),
        incarnation=Incarnation(1),
        store=store,
        params=ReplicaParams(),
        now=Instant(0.0),
    )


def test_a_new_replica_keeps_the_initial_ushards_it_was_assigned_across_restarts() -> None:
    store = MemoryStore()
    host = _host(store)
    config = Config(epoch=Epoch(1), acceptors=(NodeId("n2"), NodeId("n1"), NodeId("n3")))
    assignment = Assignment(
        epoch=Epoch(1), primary=NodeId("n2"), primary_incarnation=Incarnation(1), config=config
    )
    host.assign(assignment, Instant(0.0), initial=((0, 4),))
    assert host.initial == frozenset(UShard(u) for u in range(4))
    host.assign(assignment, Instant(0.0), initial=((4, 8),))  # fixed once known
    assert host.initial == frozenset(UShard(u) for u in range(4))
    store.sync()
    assert _host(store).initial == host.initial


def test_a_replica_answers_moved_for_a_ushard_it_does_not_own_even_for_eventual_reads() -> None:
    host = _host(MemoryStore())
    config = Config(epoch=Epoch(1), acceptors=(NodeId("n2"), NodeId("n1"), NodeId("n3")))
    assignment = Assignment(
        epoch=Epoch(1), primary=NodeId("n2"), primary_incarnation=Incarnation(1), config=config
    )
    host.assign(assignment, Instant(0.0), initial=((0, 4),))
    replies = []
    for token, ushard in ((1, UShard(6)), (2, UShard(1))):
        read = ReadRequest(token=token, ushard=ushard, key=b"k", consistency=Consistency.EVENTUAL)
        host.submit("c", read, Instant(10.0), WallMs(0))
        replies += [reply for _, reply in host.flush(Instant(10.0), WallMs(0)).replies]
    moved, served = sorted(replies, key=lambda r: r.token)
    assert isinstance(moved, ErrorReply) and moved.code is ErrorCode.MOVED
    assert isinstance(served, ReadReply) and served.item is None
