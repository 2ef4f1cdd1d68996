"""The automatic split in the running shard manager: every `CHECK_S` it hands what the
nodes reported (each p-shard's stored bytes from its primary, the smoothed commands per
second) to the pure `AutoSplitter` (loom.shardmgr.autosplit) and asks for the splits it
decides through the ordinary reshard path (`ManagerRuntime.reshard_keyspace`).

Rules of this module: one task (`run`), owned by the manager; a split that fails is
logged and decided again later (the splitter's cooldown applies to it too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from loom.core.errors import LoomError
from loom.core.ids import ShardId
from loom.core.time import Instant
from loom.shardmgr.autosplit import AutoSplitter, KeyspaceLoad, ShardLoad, SplitParams

if TYPE_CHECKING:
    from loom.runtime.manager import ManagerRuntime

log = logging.getLogger("loom.sm.split")
CHECK_S = 1.0


class SplitDriver:
    def __init__(self, manager: ManagerRuntime, params: SplitParams) -> None:
        self.manager = manager
        self.splitter = AutoSplitter(params)
        # Each p-shard's stored bytes, from its primary's last report.
        self.shard_bytes: dict[ShardId, int] = {}

    def on_primary_report(self, shard: ShardId, stored_bytes: int) -> None:
        if stored_bytes:  # 0: not measured yet; keep the last figure
            self.shard_bytes[shard] = stored_bytes

    def loads(self) -> list[KeyspaceLoad]:
        manager = self.manager
        resharder = manager.resharder
        for gone in [s for s in self.shard_bytes if s not in manager.core.shards]:
            del self.shard_bytes[gone]  # dropped p-shards
        loads = []
        for name, keyspace in sorted(manager.keyspaces.items()):
            shards = tuple(
                ShardLoad(
                    shard=shard,
                    stored_bytes=self.shard_bytes.get(shard, 0),
                    ops_per_s=manager.rates[shard].per_s if shard in manager.rates else 0.0,
                )
                for shard in keyspace.shards()
            )
            busy = bool(resharder.pending(name) or keyspace.retiring or name in resharder.finishing)
            loads.append(
                KeyspaceLoad(
                    name=name, ushards=keyspace.spec.ushards, shards=shards, resharding=busy
                )
            )
        return loads

    async def run(self) -> None:
        if not self.splitter.params.enabled:
            return
        while True:
            await asyncio.sleep(CHECK_S)
            now = Instant(time.monotonic() * 1000)
            for split in self.splitter.decide(self.loads(), now):
                log.info(
                    "keyspace %s: splitting to %d p-shards (%s)",
                    split.name,
                    split.shards,
                    split.reason,
                )
                try:
                    await self.manager.reshard_keyspace(split.name, split.shards)
                except LoomError as error:
                    log.warning("keyspace %s: automatic split refused: %s", split.name, error)
