"""Akkio placement in the running processes (ADR 0013): nodes count accesses, the shard
manager moves μshards toward where they are read and written.

- On a node, `count_access` notes each admitted client call in the node's
  `AccessCounter` (loop thread only); the heartbeat carries its report.
- In the manager, `LocalityDriver` keeps each node's last report and, every
  `period_s`, asks the pure `LocalityPlanner` which μshards of `mapping: akkio`
  keyspaces to move; each decision becomes one planned move of the manager's
  `Resharder` (move id allocated in the metastore first), so it is carried out, stored
  and resumed like any resharding move. Only the leading manager decides.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from loom.core.errors import LoomError
from loom.core.ids import NodeId, ShardId, UShard
from loom.core.time import Instant
from loom.host.requests import ReadRequest, ScanRequest, WriteRequest
from loom.runtime.codec import ClientCall
from loom.runtime.resharding import Resharder
from loom.shardmgr.access import AccessCounter, UShardAccess
from loom.shardmgr.locality import (
    HomeRegions,
    LocalityParams,
    LocalityPlanner,
    accesses_by_shard,
    accesses_by_ushard,
)
from loom.shardmgr.routing import Keyspace

log = logging.getLogger("loom.sm.locality")
DEFAULT_LOCALITY_PERIOD_S = 2.0
# A node's access report older than this no longer counts (the node is gone or silent).
REPORT_STALE_S = 5.0


def count_access(counter: AccessCounter, call: ClientCall, now: Instant) -> None:
    """Counts a client's read or write of a μshard from its region (if it said both)."""
    if call.ushard < 0 or not call.region:
        return
    match call.request:
        case WriteRequest():
            is_write = True
        case ReadRequest() | ScanRequest():
            is_write = False
        case _:
            return
    counter.record(call.shard, call.ushard, call.region, is_write=is_write, now=now)


class LocalityDriver:
    def __init__(
        self,
        *,
        resharder: Resharder,
        keyspaces: Callable[[], Sequence[Keyspace]],
        keyspace_of_shard: Callable[[ShardId], str | None],
        primary_regions: Callable[[], Mapping[ShardId, str]],
        allocate_move_ids: Callable[[int], int],
        lock: asyncio.Lock,
        params: LocalityParams | None = None,
        period_s: float = DEFAULT_LOCALITY_PERIOD_S,
    ) -> None:
        self.resharder = resharder
        self.keyspaces = keyspaces
        self.keyspace_of_shard = keyspace_of_shard
        self.primary_regions = primary_regions
        self.allocate_move_ids = allocate_move_ids  # blocking: called off the loop
        self.lock = lock  # the manager's admin lock
        self.planner = LocalityPlanner(params or LocalityParams())
        self.home_regions = HomeRegions(params or LocalityParams())
        # Each akkio p-shard's home region: the rebalancer moves its primary there.
        self.homes: dict[ShardId, str] = {}
        self.period_s = period_s
        # Each node's last report and when it came (a silent node's counts expire).
        self.reports: dict[NodeId, tuple[float, tuple[UShardAccess, ...]]] = {}
        self.moves_started = 0

    def on_report(self, node: NodeId, access: tuple[UShardAccess, ...] | None) -> None:
        if access is not None:  # None: this heartbeat carries no access rows
            self.reports[node] = (time.monotonic(), access)

    def rows(self) -> list[UShardAccess]:
        """The access rows of the nodes that reported lately."""
        oldest = time.monotonic() - REPORT_STALE_S
        for node in [n for n, (at, _) in self.reports.items() if at < oldest]:
            del self.reports[node]
        return [row for node in sorted(self.reports) for row in self.reports[node][1]]

    def accesses(self) -> dict[tuple[str, int], dict[str, float]]:
        """Per (keyspace, μshard) and region, from the nodes that reported lately."""
        return accesses_by_ushard(self.rows(), self.keyspace_of_shard)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            await self.decide_once()

    async def decide_once(self) -> None:
        keyspaces = [k for k in self.keyspaces() if k.spec.mapping == "akkio"]
        now = Instant(time.monotonic() * 1000)
        shards = {shard for k in keyspaces for shard in k.shards()}
        mixes = accesses_by_shard(self.rows(), lambda shard: shard in shards)
        self.homes = self.home_regions.update(now, mixes, shards)
        if not keyspaces:
            return
        moves = self.planner.decide(
            now, keyspaces, self.primary_regions(), self.accesses(), self._is_moving
        )
        for move in moves:
            plan = [(move.ushard, move.target)]
            # As `reshard_keyspace` does, under the same lock: ids for this move and the
            # keyspace's planned ones, allocated and handed over without interleaving.
            async with self.lock:
                count = self.resharder.ids_needed(move.keyspace, plan)
                try:
                    first = await asyncio.to_thread(self.allocate_move_ids, count)
                except LoomError as error:
                    log.warning("no move id for %s/%d: %s", move.keyspace, move.ushard, error)
                    return
                self.resharder.plan(move.keyspace, plan, first)
            self.moves_started += 1
            log.info(
                "keyspace %s: μshard %d moves from p-shard %d to %d (%.0f %% of its "
                "accesses from region %s)",
                move.keyspace, move.ushard, move.source, move.target, move.share * 100,
                move.region,
            )  # fmt: skip

    def _is_moving(self, keyspace: str, ushard: UShard) -> bool:
        return self.resharder.is_moving(keyspace, ushard)
