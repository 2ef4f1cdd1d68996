"""Shrinking a keyspace: which p-shards stay, where μshards go, and when the emptied
p-shards may be retired (docs/protocols/resharding.md, ADR 0012).

A shrink to M p-shards keeps the first M placements and retires the rest, in three
states of the stored keyspace record (each reached by one compare-and-swap):

    MOVING    retiring = R, R still in placements: μshards move to the compact mapping
              over the staying p-shards (the same Freeze/Ingest/Own/Drop moves as a grow)
    DROPPING  retiring = R, R no longer in placements (nor in the mapping): the replicas
              of R are being unassigned and deleted on the nodes
    DONE      retiring = ()

A restarted manager finds the state in the record and goes on from it. Rules:
- a p-shard is removed from the placements only when the mapping gives it no μshard
  and the caller has checked that its replicas own none (`retire_problem`);
- pure functions of the keyspace record: no IO, no clock.
"""

from __future__ import annotations

import msgspec

from loom.core.ids import ShardId, UShard
from loom.shardmgr.routing import Keyspace, compact_ranges


def staying(keyspace: Keyspace) -> tuple[ShardId, ...]:
    """The p-shards the keyspace keeps (all of them when it is not shrinking)."""
    return tuple(s for s in keyspace.shards() if s not in keyspace.retiring)


def goal_ranges(keyspace: Keyspace) -> tuple[tuple[int, ShardId], ...]:
    """The compact mapping over the p-shards that stay: where a reshard ends."""
    return compact_ranges(keyspace.spec.ushards, staying(keyspace))


def goal_mapping(keyspace: Keyspace) -> dict[UShard, ShardId]:
    return msgspec.structs.replace(keyspace, ranges=goal_ranges(keyspace)).mapping()


def shrinking(keyspace: Keyspace, shards: int) -> Keyspace:
    """The record that starts a shrink to `shards` p-shards: the first `shards`
    placements stay, the others are marked retiring (they keep their μshards until
    the moves take them away)."""
    assert 1 <= shards < len(keyspace.placements)
    assert not keyspace.retiring
    return msgspec.structs.replace(keyspace, retiring=keyspace.shards()[shards:])


def is_moving_phase(keyspace: Keyspace) -> bool:
    """Retiring p-shards are still placements: μshards are moving off them."""
    return any(s in keyspace.shards() for s in keyspace.retiring)


def stranded(keyspace: Keyspace) -> list[UShard]:
    """μshards the mapping still gives to a retiring p-shard (a move aborted or not
    yet run): they must move before anything is retired."""
    retiring = set(keyspace.retiring)
    return [UShard(u) for u in range(keyspace.spec.ushards) if keyspace.shard_of(u) in retiring]


def retire_problem(keyspace: Keyspace, owned: dict[ShardId, tuple[UShard, ...]]) -> str | None:
    """Why the retiring p-shards cannot leave the placements yet, or None. `owned`:
    what each retiring p-shard's primary says it owns (its replicated ownership
    records); a p-shard missing from it was not asked successfully."""
    left = stranded(keyspace)
    if left:
        return f"{len(left)} μshards are still mapped to retiring p-shards"
    for shard in keyspace.retiring:
        if shard not in owned:
            return f"p-shard {shard} did not say what it owns"
        if owned[shard]:
            return f"p-shard {shard} still owns μshards {list(owned[shard])[:8]}"
    return None


def without_retiring(keyspace: Keyspace) -> Keyspace:
    """MOVING → DROPPING: the retiring p-shards leave the placements (and the spec's
    count); `retiring` keeps naming them until their replicas are dropped."""
    assert not stranded(keyspace)
    kept = tuple(p for p in keyspace.placements if p.shard not in keyspace.retiring)
    spec = msgspec.structs.replace(keyspace.spec, shards=len(kept))
    return msgspec.structs.replace(keyspace, spec=spec, placements=kept)


def retired(keyspace: Keyspace) -> Keyspace:
    """DROPPING → DONE."""
    assert not is_moving_phase(keyspace)
    return msgspec.structs.replace(keyspace, retiring=())
