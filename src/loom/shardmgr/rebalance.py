"""When and where the shard manager moves replicas and primaries (the policy; the core's
`replace_member` and `transfer_primary` are the mechanism, which the simulator runs).

One decision per call, and only while every p-shard is settled (active, no change in
progress), so moves never pile up and a bad plan stops after one step:
1. **Replace the dead**: a member whose node has not reported for `replace_after_ms`
   is replaced by a live node of the same tier, spread over regions like placement.
2. **Move to the keyspace's tier** (`loom keyspace set-tier`): a member on a node of
   another tier is replaced by a node of the shard's tier, one member at a time; the
   primary is first handed (gracefully) to an acceptor already on the tier.
3. **Absorb new nodes**: when one node holds two replicas more than another of its tier,
   one replica moves from the fullest node to the emptiest.
4. **Balance by load** (ops/s, decayed, as nodes report it): replicas, then primaries,
   move from the hottest node to the coolest when the hottest carries at least
   `imbalance_ratio_min` times the coolest's load (and `load_gap_min_per_s` more), at
   most one such move per `cooldown_ms`, and only a shard whose load is between a
   quarter of the gap and the gap less `load_gap_min_per_s` (so the hot spot does not
   just change sides); a replica move never widens the spread of replica counts.
   Without load data (an idle cluster) primaries are balanced by count instead: when
   one node leads two p-shards more than another that is an acceptor of one of them,
   that primary moves there.

5. **Primaries go home** (Akkio, ADR 0013): a p-shard of a `mapping: akkio` keyspace
   whose accesses come mostly from one region (its `home`, decided with hysteresis by
   `shardmgr.locality.HomeRegions`) and whose primary is elsewhere hands its primary to
   a live acceptor in that region — before balancing, and balancing never takes a
   primary out of its home region.

A move that would take a live primary out of its p-shard hands the primary to another
acceptor first (graceful: no lease wait, no failed request), and replaces it later.

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
    load_per_s: float = 0.0  # the p-shard's operations per second (its busiest replica)
    home: str = ""  # the region most of its accesses come from (Akkio), "" if none


@dataclass(frozen=True, slots=True, kw_only=True)
class BalanceParams:
    """Hysteresis of load balancing: act only on a clear imbalance, and not too often."""

    imbalance_ratio_min: float = 1.5
    load_gap_min_per_s: float = 20.0
    # Below this much load in a tier (all shards together), balance by counts only.
    load_total_min_per_s: float = 20.0
    cooldown_ms: float = 15_000.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplaceMember:
    shard: ShardId
    old: NodeId
    new: NodeId
    reason: str
    # Made to spread replicas or load (not to replace the dead or reach a tier): an
    # operator's recent hand-off holds these back. `by_load`: load, not counts.
    balancing: bool = False
    by_load: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferPrimary:
    shard: ShardId
    to: NodeId
    reason: str
    balancing: bool = False
    by_load: bool = False


Move = ReplaceMember | TransferPrimary
# A load move carries at least this share of the gap between the two nodes.
SHARE_OF_GAP_MIN = 0.25


def next_move(
    shards: Sequence[ShardView],
    nodes: Mapping[NodeId, NodeInfo],
    last_report_at: Mapping[NodeId, Instant],
    now: Instant,
    *,
    failure_timeout_ms: float,
    replace_after_ms: float,
    balance: BalanceParams = BalanceParams(),
    last_load_move_at: Instant | None = None,
) -> Move | None:
    """The next move, or None. `last_load_move_at`: when the last `by_load` move was
    made (the cooldown runs from it)."""
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
        return None  # move only in a healthy cluster
    move = _move_to_tier(shards, nodes, alive) or _balance_replicas(shards, nodes, alive)
    if move is not None:
        return _primary_first(move, shards, alive)
    home = _primary_home(shards, nodes, alive)
    if home is not None:
        return home
    cooled = last_load_move_at is None or now - last_load_move_at >= balance.cooldown_ms
    if _has_load(shards, balance):
        if not cooled:
            return None
        by_load = _balance_replicas_by_load(shards, nodes, alive, balance)
        if by_load is not None:
            return _primary_first(by_load, shards, alive)
        return _balance_primaries_by_load(shards, nodes, alive, balance)
    return _balance_primaries(shards, nodes, alive)


def _primary_home(
    shards: Sequence[ShardView], nodes: Mapping[NodeId, NodeInfo], alive: set[NodeId]
) -> Move | None:
    for view in sorted(shards, key=lambda s: s.shard):
        if not view.home or _region(nodes, view.primary) == view.home:
            continue
        at_home = [a for a in sorted(view.config.acceptors) if a in alive]
        at_home = [a for a in at_home if _region(nodes, a) == view.home]
        if at_home:
            reason = f"its accesses come mostly from region {view.home}"
            return TransferPrimary(shard=view.shard, to=at_home[0], reason=reason, balancing=True)
    return None


def _region(nodes: Mapping[NodeId, NodeInfo], node: NodeId) -> str:
    info = nodes.get(node)
    return info.region if info is not None else ""


def _keeps_home(view: ShardView, to: NodeId, nodes: Mapping[NodeId, NodeInfo]) -> bool:
    """Balancing may move a primary unless that takes it out of its home region."""
    if not view.home or _region(nodes, view.primary) != view.home:
        return True
    return _region(nodes, to) == view.home


def tier_progress(shards: Sequence[ShardView], nodes: Mapping[NodeId, NodeInfo]) -> tuple[int, int]:
    """(members on their shard's tier, all members): how far a tier move has come."""
    members = [(m, s.tier) for s in shards for m in s.config.members()]
    placed = sum(1 for m, tier in members if m in nodes and nodes[m].tier == tier)
    return placed, len(members)


def _primary_first(move: Move, shards: Sequence[ShardView], alive: set[NodeId]) -> Move:
    """A replacement of a live primary becomes a hand-off of that primary first (to the
    acceptor with the fewest primaries); the replacement comes on a later call."""
    if not isinstance(move, ReplaceMember):
        return move
    view = next(s for s in shards if s.shard == move.shard)
    if view.primary != move.old:
        return move
    leads = Counter(s.primary for s in shards)
    others = [a for a in view.config.acceptors if a != move.old and a in alive]
    if not others:
        return move
    to = min(others, key=lambda n: (leads[n], n))
    reason = f"{move.old} is to leave p-shard {move.shard} ({move.reason})"
    return TransferPrimary(
        shard=move.shard, to=to, reason=reason, balancing=move.balancing, by_load=move.by_load
    )


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
    """A live node of the shard's tier, not an acceptor: a follower already there first
    (left by a change a restarted manager forgot: it has caught up), then regions and
    zones the remaining members do not use, then the node with the fewest replicas."""
    config = view.config
    staying = [nodes[m] for m in config.acceptors if m != leaving and m in nodes]
    regions = Counter(i.region for i in staying)
    zones = Counter((i.region, i.zone) for i in staying)
    counts = _replica_counts(shards, alive)
    candidates = [
        nodes[n] for n in sorted(alive) if n not in config.acceptors and nodes[n].tier == view.tier
    ]
    if not candidates:
        return None
    best = min(
        candidates,
        key=lambda i: (
            i.node not in config.followers,
            regions[i.region],
            zones[i.region, i.zone],
            counts[i.node],
            i.node,
        ),
    )
    return best.node


def _move_to_tier(
    shards: Sequence[ShardView], nodes: Mapping[NodeId, NodeInfo], alive: set[NodeId]
) -> Move | None:
    """One member on a node of another tier than its shard's is replaced (non-primary
    members first, so the primary can be handed to a member already on the tier)."""
    for view in shards:
        strays = [m for m in view.config.members() if nodes[m].tier != view.tier]
        strays.sort(key=lambda m: (m == view.primary, m not in view.config.followers, m))
        for stray in strays:
            new = _best_newcomer(view, stray, nodes, alive, shards)
            if new is not None:
                reason = f"{stray} is on tier {nodes[stray].tier!r}, the keyspace on {view.tier!r}"
                return ReplaceMember(shard=view.shard, old=stray, new=new, reason=reason)
    return None


def _pools(
    shards: Sequence[ShardView], nodes: Mapping[NodeId, NodeInfo], alive: set[NodeId]
) -> list[tuple[str, list[NodeId]]]:
    """Each tier the shards use, with its live nodes (sorted), where there are two or more."""
    pools = []
    for tier in sorted({s.tier for s in shards}):
        in_tier = [n for n in sorted(alive) if nodes[n].tier == tier]
        if len(in_tier) >= 2:
            pools.append((tier, in_tier))
    return pools


def _balance_replicas(
    shards: Sequence[ShardView], nodes: Mapping[NodeId, NodeInfo], alive: set[NodeId]
) -> Move | None:
    counts = _replica_counts(shards, alive)
    for tier, in_tier in _pools(shards, nodes, alive):
        fullest = max(in_tier, key=lambda n: (counts[n], n))
        emptiest = min(in_tier, key=lambda n: (counts[n], n))
        if counts[fullest] - counts[emptiest] < 2:
            continue
        # Move a replica that is not a primary if possible: no hand-off needed.
        movable = [
            s
            for s in shards
            if s.tier == tier and fullest in s.config.members()
            if emptiest not in s.config.members()
        ]
        movable.sort(key=lambda s: (s.primary == fullest, s.shard))
        if movable:
            reason = f"{fullest} holds {counts[fullest]} replicas, {emptiest} {counts[emptiest]}"
            shard = movable[0].shard
            return ReplaceMember(
                shard=shard, old=fullest, new=emptiest, reason=reason, balancing=True
            )
    return None


def _balance_primaries(
    shards: Sequence[ShardView], nodes: Mapping[NodeId, NodeInfo], alive: set[NodeId]
) -> Move | None:
    leads: Counter[NodeId] = Counter({n: 0 for n in alive})
    leads.update(s.primary for s in shards)
    for view in sorted(shards, key=lambda s: (-leads[s.primary], s.shard)):
        for acceptor in sorted(view.config.acceptors, key=lambda n: (leads[n], n)):
            if not _keeps_home(view, acceptor, nodes):
                continue
            if acceptor in alive and leads[view.primary] - leads[acceptor] >= 2:
                reason = f"{view.primary} leads {leads[view.primary]}, {acceptor} {leads[acceptor]}"
                return TransferPrimary(shard=view.shard, to=acceptor, reason=reason, balancing=True)
    return None


# ------------------------------------------------------------------ by load


def _has_load(shards: Sequence[ShardView], balance: BalanceParams) -> bool:
    return sum(s.load_per_s for s in shards) >= balance.load_total_min_per_s


def _is_imbalanced(hot: float, cool: float, balance: BalanceParams) -> bool:
    return hot - cool >= balance.load_gap_min_per_s and hot >= balance.imbalance_ratio_min * cool


def _is_worth_moving(load: float, gap: float, balance: BalanceParams) -> bool:
    """Moving `load` from the hot node to the cool one lowers the hotter of the two by a
    clear margin (so the hot spot does not just change sides) and is not a trifle."""
    return gap * SHARE_OF_GAP_MIN <= load <= gap - balance.load_gap_min_per_s and load > 0


def _best_share(
    candidates: Sequence[ShardView], gap: float, balance: BalanceParams
) -> ShardView | None:
    """The shard whose load, moved across `gap`, narrows it most, if worth moving."""
    useful = [s for s in candidates if _is_worth_moving(s.load_per_s, gap, balance)]
    if not useful:
        return None
    return min(useful, key=lambda s: (abs(gap / 2 - s.load_per_s), s.shard))


def _balance_replicas_by_load(
    shards: Sequence[ShardView],
    nodes: Mapping[NodeId, NodeInfo],
    alive: set[NodeId],
    balance: BalanceParams,
) -> Move | None:
    counts = _replica_counts(shards, alive)
    for tier, in_tier in _pools(shards, nodes, alive):
        load = {n: 0.0 for n in in_tier}
        for view in shards:
            for member in view.config.members():
                if member in load:
                    load[member] += view.load_per_s
        hot = max(in_tier, key=lambda n: (load[n], n))
        cool = min(in_tier, key=lambda n: (load[n], n))
        if not _is_imbalanced(load[hot], load[cool], balance):
            continue
        spread = max(counts[n] for n in in_tier) - min(counts[n] for n in in_tier)
        after = Counter({n: counts[n] for n in in_tier})
        after[hot] -= 1
        after[cool] += 1
        if max(after.values()) - min(after.values()) > max(spread, 1):
            continue  # would undo what counting absorbed
        candidates = [
            s
            for s in shards
            if s.tier == tier and hot in s.config.members() and cool not in s.config.members()
        ]
        share = _best_share(candidates, load[hot] - load[cool], balance)
        if share is not None:
            reason = f"{hot} carries {load[hot]:.0f} ops/s, {cool} {load[cool]:.0f}"
            return ReplaceMember(
                shard=share.shard, old=hot, new=cool, reason=reason, balancing=True, by_load=True
            )
    return None


def _balance_primaries_by_load(
    shards: Sequence[ShardView],
    nodes: Mapping[NodeId, NodeInfo],
    alive: set[NodeId],
    balance: BalanceParams,
) -> Move | None:
    load = {n: 0.0 for n in alive}
    for view in shards:
        load[view.primary] = load.get(view.primary, 0.0) + view.load_per_s
    best: tuple[float, ShardId, NodeId, str] | None = None
    for view in shards:
        hot = view.primary
        for acceptor in sorted(view.config.acceptors):
            if acceptor == hot or acceptor not in alive or not _keeps_home(view, acceptor, nodes):
                continue
            if not _is_imbalanced(load[hot], load[acceptor], balance):
                continue
            gap = load[hot] - load[acceptor]
            if not _is_worth_moving(view.load_per_s, gap, balance):
                continue
            # The larger of the two loads after the move: the smaller the better.
            worst = max(load[hot] - view.load_per_s, load[acceptor] + view.load_per_s)
            reason = f"{hot} leads {load[hot]:.0f} ops/s, {acceptor} {load[acceptor]:.0f}"
            if best is None or (worst, view.shard, acceptor) < best[:3]:
                best = (worst, view.shard, acceptor, reason)
    if best is None:
        return None
    _worst, shard, to, reason = best
    return TransferPrimary(shard=shard, to=to, reason=reason, balancing=True, by_load=True)
