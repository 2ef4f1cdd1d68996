"""How a keyspace's cluster-wide quota is split among the nodes that enforce it
(ADR 0008). Pure: a function of the routing table.

Rules of this module:
- writes go to primaries, so a node's write share is the quota × (the keyspace's
  p-shards whose primary it holds) / (the keyspace's p-shards). A node that holds a
  replica but no primary in the table still gets one p-shard's worth: the table lags a
  failover by up to one push, and a new primary must not throttle everything meanwhile
  (a non-primary answers writes with NOT_PRIMARY anyway, so this adds nothing while the
  table is right);
- reads may be served by any replica (relaxed reads go to the nearest one), so a node's
  read share is the quota × (the keyspace's p-shards it holds a replica of) / (p-shards):
  each replica may serve its p-shard's whole share. STRONG reads all reach the primary
  and meet the quota exactly; relaxed reads spread over R replicas may reach up to R ×
  the quota cluster-wide. We accept that over-admission: a node cannot know what other
  replicas served, and dividing by R would throttle a client that reads locally;
- stored bytes: every replica holds its whole p-shard, so a node's byte share is the
  quota × (p-shards it holds a replica of) / (p-shards), compared with what the node
  stores for the keyspace;
- a node with no replica of a keyspace gets no share (None: it serves nothing there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from loom.core.ids import NodeId, ShardId
from loom.shardmgr.routing import Keyspace, RoutingTable, ShardRoute


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeShare:
    """What one node enforces for one keyspace; None is unlimited."""

    keyspace: str
    tenant: str
    reads_per_s: float | None
    writes_per_s: float | None
    bytes_max: int | None
    shards: tuple[ShardId, ...]  # the keyspace's p-shards with a replica on this node


def node_share(keyspace: Keyspace, routes: Mapping[ShardId, ShardRoute], node: NodeId) -> NodeShare:
    """`node`'s share of `keyspace`'s quota, given the p-shards' routes."""
    total = len(keyspace.placements)
    assert total > 0
    held: list[ShardId] = []
    primaries = 0
    for shard in keyspace.shards():
        route = routes.get(shard)
        if route is None:
            continue
        if route.primary == node:
            primaries += 1
        if node in route.acceptors or node in route.followers or route.primary == node:
            held.append(shard)
    quota = keyspace.quota
    reads = None if quota.reads_per_s is None else quota.reads_per_s * len(held) / total
    writes = None
    if quota.writes_per_s is not None:
        writes = quota.writes_per_s * max(primaries, 1 if held else 0) / total
    stored = None if quota.bytes_max is None else quota.bytes_max * len(held) // total
    return NodeShare(
        keyspace=keyspace.name,
        tenant=keyspace.tenant,
        reads_per_s=reads,
        writes_per_s=writes,
        bytes_max=stored,
        shards=tuple(held),
    )


def node_shares(table: RoutingTable, node: NodeId) -> dict[str, NodeShare]:
    """Every keyspace `node` holds a replica of, with its share of the quota."""
    routes = {route.shard: route for route in table.shards}
    shares = {}
    for keyspace in table.keyspaces:
        share = node_share(keyspace, routes, node)
        if share.shards:
            shares[keyspace.name] = share
    return shares
