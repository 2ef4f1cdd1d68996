"""Shrinking a keyspace in the running shard manager: start the moves, then retire the
emptied p-shards (loom.shardmgr.shrink has the states and the checks; ADR 0012).

Rules of this module:
- `start` runs under the manager's admin lock (from `reshard_keyspace`); `finish`
  takes the lock itself and is called by the `Resharder`'s task once the keyspace's
  mover has nothing left (`finish_when_idle`), again until it returns True;
- every step is one compare-and-swap of the keyspace record, in an order a restarted
  manager can finish: it finds `retiring` in the record (`resume`) and calls `finish`
  again, which goes on from the stored state;
- a p-shard leaves the placements only when the mapping gives it nothing and its
  primary says it holds nothing; μshards still mapped to it (an aborted move) are
  planned again instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import msgspec

from loom.core.errors import InvalidArgument, NotFound
from loom.core.ids import ShardId, UShard
from loom.runtime.codec import ReshardReport
from loom.shardmgr.moves import plan_reshard
from loom.shardmgr.routing import Keyspace
from loom.shardmgr.shrink import (
    goal_mapping,
    is_moving_phase,
    retire_problem,
    retired,
    shrinking,
    staying,
    stranded,
    without_retiring,
)

if TYPE_CHECKING:
    from loom.runtime.manager import ManagerRuntime

log = logging.getLogger("loom.sm.reshard")


class Shrinker:
    def __init__(self, manager: ManagerRuntime) -> None:
        self.manager = manager

    async def start(self, keyspace: Keyspace, shards: int) -> Keyspace:
        """Under the admin lock: mark the p-shards beyond the first `shards` retiring
        and plan the moves to the compact mapping over the others."""
        name = keyspace.name
        resharder = self.manager.resharder
        if keyspace.retiring:
            if len(staying(keyspace)) == shards:
                return keyspace  # the same shrink asked again
            raise InvalidArgument(
                f"keyspace {name!r} is shrinking to {len(staying(keyspace))} p-shards; "
                "reshard it again once that is done"
            )
        if resharder.pending(name):
            raise InvalidArgument(
                f"keyspace {name!r} is being resharded ({resharder.pending(name)} moves "
                "left); shrink it once that is done"
            )
        problem = msgspec.structs.replace(keyspace.spec, shards=shards).problem()
        if problem is not None:
            raise InvalidArgument(problem)
        marked = shrinking(keyspace, shards)
        await asyncio.to_thread(self.manager.catalog.replace, name, keyspace, marked)
        self.manager.keyspaces[name] = marked
        moves = await self._plan(marked)
        resharder.finish_when_idle(name)
        log.info(
            "keyspace %s: shrinking to %d p-shards (retiring %s), %d moves",
            name, shards, list(marked.retiring), moves,
        )  # fmt: skip
        return marked

    def resume(self, keyspaces: list[Keyspace]) -> None:
        """After a restart: shrinks the stored records show under way go on."""
        for keyspace in keyspaces:
            if keyspace.retiring:
                self.manager.resharder.finish_when_idle(keyspace.name)

    async def finish(self, name: str) -> bool:
        """The keyspace's mover is idle: retire its emptied p-shards. True when nothing
        is left to do; False to be called again later."""
        manager = self.manager
        async with manager.admin_lock:
            keyspace = manager.keyspaces.get(name)
            if keyspace is None or not keyspace.retiring:
                return True
            if is_moving_phase(keyspace):
                if stranded(keyspace):
                    moves = await self._plan(keyspace)
                    log.warning("keyspace %s: %d μshards moved again before retiring", name, moves)
                    return False
                held: dict[ShardId, tuple[UShard, ...]] = {}
                for shard in keyspace.retiring:
                    answer = await manager.resharder.holding(shard, keyspace.spec.ushards)
                    if answer is not None:
                        held[shard] = answer
                problem = retire_problem(keyspace, held)
                if problem is not None:
                    log.info("keyspace %s: not retiring yet: %s", name, problem)
                    return False
                dropping = without_retiring(keyspace)
                await asyncio.to_thread(manager.catalog.replace, name, keyspace, dropping)
                manager.keyspaces[name] = keyspace = dropping
            await manager.drop_shards(keyspace.retiring)
            done = retired(keyspace)
            await asyncio.to_thread(manager.catalog.replace, name, keyspace, done)
            manager.keyspaces[name] = done
            log.info("keyspace %s: retired p-shards %s", name, list(keyspace.retiring))
            return True

    def report(self, name: str) -> ReshardReport:
        keyspace = self.manager.keyspaces.get(name)
        if keyspace is None:
            raise NotFound(f"no keyspace {name!r}")
        pauses = self.manager.resharder.pauses(name)
        return ReshardReport(
            name=name,
            moves_left=self.manager.resharder.pending(name),
            retiring=keyspace.retiring,
            pauses=tuple(sorted(pauses.items(), key=lambda p: (-p[1], p[0]))),
        )

    async def _plan(self, keyspace: Keyspace) -> int:
        plan = plan_reshard(keyspace.mapping(), goal_mapping(keyspace))
        resharder = self.manager.resharder
        count = max(1, resharder.ids_needed(keyspace.name, plan))
        first = await asyncio.to_thread(self.manager.catalog.allocate_move_ids, count)
        resharder.plan(keyspace.name, plan, first)
        return len(plan)
