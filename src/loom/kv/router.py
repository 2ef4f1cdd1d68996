"""The client's cached routing table: keyspace → μshard → p-shard → nodes.

The table is advisory (a stale one costs a `NOT_PRIMARY` and a refresh). It comes from
the shard manager or from any node, which keeps the manager's last push — so a client
can route while the manager is down. Refreshes are single-flight and rate-limited:
a burst of failing requests causes one fetch, not one each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from loom.core.errors import (
    ConnectionFailed,
    LoomError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from loom.core.ids import NodeId, ShardId
from loom.shardmgr.routing import EMPTY_TABLE, Keyspace, NodeRoute, RoutingTable, ShardRoute

Address = tuple[str, int]
# No more than one refresh this often, however many requests ask for one.
REFRESH_INTERVAL_MIN_S = 0.05

Fetch = Callable[[Address], Awaitable[RoutingTable]]


class Router:
    def __init__(self, seeds: Sequence[Address], fetch: Fetch, *, region: str | None) -> None:
        self.seeds = list(seeds)
        self.fetch = fetch
        self.region = region
        self.table = EMPTY_TABLE
        self._keyspaces: dict[str, Keyspace] = {}
        self._shards: dict[ShardId, ShardRoute] = {}
        self._nodes: dict[NodeId, NodeRoute] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = -1.0

    # ---------------------------------------------------------------- refresh

    async def refresh(self, *, force: bool = False) -> None:
        """Fetch a newer table (at most one fetch at a time; skipped when fresh enough)."""
        if self._refreshing is None or self._refreshing.done():
            fresh = time.monotonic() - self._refreshed_at < REFRESH_INTERVAL_MIN_S
            if fresh and not force:
                return
            self._refreshing = asyncio.get_running_loop().create_task(self._fetch_any())
        await asyncio.shield(self._refreshing)

    async def _fetch_any(self) -> None:
        """Ask the seeds, then every known live node, until one answers."""
        self._refreshed_at = time.monotonic()  # failed rounds are rate-limited too
        failures = []
        candidates = list(self.seeds)
        candidates += [
            (n.info.host, n.info.port)
            for n in self._nodes.values()
            if n.alive and (n.info.host, n.info.port) not in candidates
        ]
        for address in candidates:
            try:
                table = await self.fetch(address)
            except (PermissionDenied, ConnectionFailed):
                # The token or TLS settings are refused: asking elsewhere will not help.
                raise
            except LoomError as error:
                failures.append(f"{address[0]}:{address[1]}: {error}")
                continue
            self.install(table)
            return
        raise Unavailable("no routing table from any of: " + "; ".join(failures))

    def install(self, table: RoutingTable) -> None:
        """Keeps `table` unless the cached one is newer (tables from one manager term are
        ordered; a new term — a restarted or new leader — always wins over older ones)."""
        if table.version < self.table.version:
            return
        self.table = table
        self._keyspaces = {k.name: k for k in table.keyspaces}
        self._shards = {s.shard: s for s in table.shards}
        self._nodes = {n.info.node: n for n in table.nodes}

    # ---------------------------------------------------------------- lookups

    def keyspace(self, name: str) -> Keyspace:
        keyspace = self._keyspaces.get(name)
        if keyspace is None:
            raise NotFound(f"no keyspace {name!r}")
        return keyspace

    def has_keyspace(self, name: str) -> bool:
        return name in self._keyspaces

    def shard(self, shard: ShardId) -> ShardRoute | None:
        return self._shards.get(shard)

    def address(self, node: NodeId) -> Address | None:
        route = self._nodes.get(node)
        return (route.info.host, route.info.port) if route is not None else None

    def primary(self, shard: ShardId) -> NodeId | None:
        route = self._shards.get(shard)
        return route.primary if route is not None else None

    def nearest(self, shard: ShardId) -> NodeId | None:
        """A live member for relaxed reads: one in the client's region if any, else the
        primary (closest to fresh), else any live member."""
        route = self._shards.get(shard)
        if route is None:
            return None
        members = (*route.acceptors, *route.followers)
        live = [m for m in members if (n := self._nodes.get(m)) is not None and n.alive]
        if self.region is not None:
            local = [m for m in live if self._nodes[m].info.region == self.region]
            if local:
                return local[hash_pick(len(local))]
        if route.primary in live:
            return route.primary
        return live[0] if live else route.primary

    def manager(self) -> Address | None:
        host, _, port = self.table.manager.rpartition(":")
        return (host, int(port)) if host and port.isascii() and port.isdigit() else None


def hash_pick(count: int) -> int:
    """Spreads relaxed reads over equally near replicas (per process, no randomness)."""
    return int(time.monotonic() * 1000) % count
