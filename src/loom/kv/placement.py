"""The operator's placement calls on the client: a graceful primary hand-off and the
live move of a keyspace to another tier (`loom shard transfer-primary`, `loom keyspace
set-tier`). The manager does the work (runtime/placement.py); this module asks and
watches the routing table for progress."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from loom.core.errors import Unavailable
from loom.runtime.codec import KeyspaceReply, PrimaryMoved, SetKeyspaceTier, TransferPrimaryCall
from loom.shardmgr.routing import Keyspace, RoutingTable

if TYPE_CHECKING:
    from loom.kv.admin import ClusterAdmin

# `set_keyspace_tier` gives up waiting when no member moved for this long.
TIER_STALL_S = 60.0
POLL_S = 0.25


async def transfer_primary(client: ClusterAdmin, shard: int, to: str) -> PrimaryMoved:
    reply = await client._admin(TransferPrimaryCall(shard=shard, to=to))
    if not isinstance(reply, PrimaryMoved):
        raise Unavailable(f"the shard manager answered {type(reply).__name__}")
    return reply


def tier_progress(table: RoutingTable, name: str) -> tuple[int, int, bool]:
    """(members on the keyspace's tier, all members, done) of keyspace `name`: done once
    every member is on the tier, no member change is under way and every p-shard is
    ready."""
    keyspace = next(k for k in table.keyspaces if k.name == name)
    tiers = {n.info.node: n.info.tier for n in table.nodes}
    routes = [s for s in table.shards if s.shard in keyspace.shards()]
    members = [m for s in routes for m in (*s.acceptors, *s.followers)]
    placed = sum(1 for m in members if tiers.get(m) == keyspace.spec.tier)
    settled = all(
        s.ready and not s.followers and len(s.acceptors) == keyspace.spec.replication
        for s in routes
    )
    return placed, len(members), settled and placed == len(members)


async def set_keyspace_tier(
    client: ClusterAdmin,
    name: str,
    tier: str,
    *,
    wait: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Keyspace:
    reply = await client._admin_retrying(SetKeyspaceTier(name=name, tier=tier))
    if not isinstance(reply, KeyspaceReply):
        raise Unavailable(f"the shard manager answered {type(reply).__name__}")
    if not wait:
        return reply.keyspace
    loop = asyncio.get_running_loop()
    last, last_change = -1, loop.time()
    while True:
        await client.router.refresh(force=True)
        placed, total, done = tier_progress(client.router.table, name)
        if progress is not None:
            progress(placed, total)
        if done:
            return client.router.keyspace(name)
        if placed != last:
            last, last_change = placed, loop.time()
        elif loop.time() - last_change > TIER_STALL_S:
            raise Unavailable(
                f"moving {name!r} to tier {tier!r} made no progress for {TIER_STALL_S:g} s "
                f"({placed}/{total} members on it); it goes on in the shard manager"
            )
        await asyncio.sleep(POLL_S)
