"""When and where the shard manager moves replicas and primaries (the policy; the core's
`replace_member` and `transfer_primary` are the mechanism, which the simulator runs).

One decision per call, and only while every p-shard is settled (active, no change in
progress), so moves never pile up and a bad plan stops after one step:
1. **Replace the dead**: a member whose node has not reported for `replace_after_ms`
   is replaced by a live node of the same tier, spread over regions like placement.
2. **Absorb new nodes**: when one node holds two replicas more than another, one
   replica moves from the fullest node to the emptiest.
3. **Balance primaries**: when one node leads two p-shards more than another that is
   an acceptor of one of them, that primary moves there.

Pure: no IO, no clock (the caller passes `now`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loom.core.ids import NodeId, ShardId
from loom.core.time import Instant
from loom.paxos.messages import Config
from loom.shardmgr.routing import NodeInfo


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardView:
    shard: ShardId
    config: Config
    primary: NodeId
    tier: str
    settled: bool  # active, no membership change in progress


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplaceMember:
    shard: ShardId
    old: NodeId
    new: NodeId
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferPrimary:
    shard: ShardId
    to: NodeId
    reason: str


Move = ReplaceMember | TransferPrimary


def next_move(
    shards: Sequence[ShardView],
    nodes: Mapping[NodeId, NodeInfo],
    last_report_at: Mapping[NodeId, Instant],
    now: Instant,
    *,
    failure_timeout_ms: float,
    replace_after_ms: float,
) -> Move | None:
    if not shards or not all(s.settled for s in shards):
        return None
    alive = {n for n, at in last_report_at.items() if now - at <= failure_timeout_ms and n in nodes}
    for view in shards:
        for member in view.config.members():
            silent_ms = now - last_report_at.get(member, Instant(-1e18))
            if member not in alive and silent_ms > replace_after_ms:
                new = _best_newcomer(view, member, nodes, alive, shards)
                if new is not None:
                    reason = f"{member} silent for {silent_ms / 1000:.0f} s"
                    return ReplaceMember(shard=view.shard, old=member, new=new, reason=reason)
    if any(m not in alive for s in shards for m in s.config.members()):
        return None  # balance only a healthy cluster
    return _balance_replicas(shards, nodes, alive) or _balance_primaries(shards, alive)


def _replica_counts(shards: Sequence[ShardView], alive: set[NodeId]) -> Counter[NodeId]:
    counts: Counter[NodeId] = Counter({n: 0 for n in alive})
    for view in shards:
        counts.update(view.config.members())
    return counts


def _best_newcomer(
    view: ShardView,
    leaving: NodeId,
    nodes: Mapping[NodeId, NodeInfo],
    alive: set[NodeId],
    shards: Sequence[ShardView],
) -> NodeId | None:
    """A live node of the shard's tier, not a member: regions and zones the remaining
    members do not use first, then the node with the fewest replicas."""
    staying = [nodes[m] for m in view.config.members() if m != leaving and m in nodes]
    regions = Counter(i.region for i in staying)
    zones = Counter((i.region, i.zone) for i in staying)
    counts = _replica_counts(shards, alive)
    candidates = [
        nodes[n]
        for n in sorted(alive)
        if n not in view.config.members() and nodes[n].tier == view.tier
    ]
    if not candidates:
        return None
    best = min(
        candidates,
        key=lambda i: (regions[i.region], zones[i.region, i.zone], counts[i.node], i.node),
    )
    return best.node


def _balance_replicas(
    shards: Sequence[ShardView], nodes: Mapping[NodeId, NodeInfo], alive: set[NodeId]
) -> Move | None:
    counts = _replica_counts(shards, alive)
    for tier in sorted({s.tier for s in shards}):
        in_tier = [n for n in sorted(alive) if nodes[n].tier == tier]
        if len(in_tier) < 2:
            continue
        fullest = max(in_tier, key=lambda n: (counts[n], n))
        emptiest = min(in_tier, key=lambda n: (counts[n], n))
        if counts[fullest] - counts[emptiest] < 2:
            continue
        # Move a replica that is not a primary if possible: no failover needed.
        movable = [
            s
            for s in shards
            if s.tier == tier and fullest in s.config.members()
            if emptiest not in s.config.members()
        ]
        movable.sort(key=lambda s: (s.primary == fullest, s.shard))
        if movable:
            reason = f"{fullest} holds {counts[fullest]} replicas, {emptiest} {counts[emptiest]}"
            return ReplaceMember(shard=movable[0].shard, old=fullest, new=emptiest, reason=reason)
    return None


def _balance_primaries(shards: Sequence[ShardView], alive: set[NodeId]) -> Move | None:
    leads: Counter[NodeId] = Counter({n: 0 for n in alive})
    leads.update(s.primary for s in shards)
    for view in sorted(shards, key=lambda s: (-leads[s.primary], s.shard)):
        for acceptor in sorted(view.config.acceptors, key=lambda n: (leads[n], n)):
            if acceptor in alive and leads[view.primary] - leads[acceptor] >= 2:
                reason = f"{view.primary} leads {leads[view.primary]}, {acceptor} {leads[acceptor]}"
                return TransferPrimary(shard=view.shard, to=acceptor, reason=reason)
    return None
