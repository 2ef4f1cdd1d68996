"""The automatic split with real runtimes on 127.0.0.1: a keyspace created with one
p-shard, under a manager with low split thresholds, grows by itself while a writer
keeps writing — no client-visible error, every acknowledged write readable after."""

from __future__ import annotations

import asyncio
from pathlib import Path

from loom.core.errors import LoomError
from loom.shardmgr.autosplit import SplitParams
from loom.shardmgr.routing import compact_ranges

from .test_reshard import wait_for
from .test_reshard_shrink import Cluster

VALUE = b"x" * 200
SPLIT = SplitParams(
    bytes_max=20_000, ops_per_s_max=None, shards_max=2, sustain_ms=500.0, cooldown_ms=60_000.0
)


def test_a_keyspace_over_the_size_threshold_splits_by_itself_under_writes(tmp_path: Path) -> None:
    asyncio.run(auto_split(tmp_path))


async def auto_split(tmp: Path) -> None:
    cluster = Cluster(tmp, split=SPLIT)
    try:
        await cluster.start()
        client = await cluster.client()
        created = await client.create_keyspace("ks", shards=1, replication=3, ushards=16)
        ks = client.keyspace("ks")
        manager = cluster.manager
        acked: list[bytes] = []
        errors: list[str] = []
        stop = asyncio.Event()

        async def write() -> None:
            n = 0
            while not stop.is_set():
                key = b"key-%06d" % n
                n += 1
                try:
                    await ks.put(key, VALUE)
                    acked.append(key)
                except LoomError as error:
                    errors.append(f"{key!r}: {type(error).__name__}: {error}")

        writers = [asyncio.create_task(write()) for _ in range(2)]

        def split_done() -> bool:
            keyspace = manager.keyspaces["ks"]
            return (
                len(keyspace.shards()) == 2
                and keyspace.ranges == compact_ranges(16, keyspace.shards())
                and manager.resharder.pending("ks") == 0
            )

        await wait_for(split_done, timeout_s=45)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*writers)

        assert errors == [], errors[:5]
        grown = manager.keyspaces["ks"]
        assert grown.shards()[0] == created.shards()[0]
        assert {grown.shard_of(u) for u in range(16)} == set(grown.shards())
        report = await client.reshard_status("ks")
        print(f"{len(acked)} writes; split 1 → 2; longest pauses: {report.pauses[:3]}")
        assert report.pauses
        for key in acked[:: max(1, len(acked) // 200)]:
            item = await ks.get(key)
            assert item is not None and item.value == VALUE, key
    finally:
        await cluster.close()
