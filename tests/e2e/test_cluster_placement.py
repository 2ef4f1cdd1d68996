"""Placement with real processes: a new node is absorbed (replicas move onto it while
clients write, with no client-visible error), and the replicas of a node that stays
dead past the grace period move to a live node."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import pytest

from loom import kv
from loom.runtime.localcluster import LocalCluster
from loom.shardmgr.routing import RoutingTable

from .harness import Writer


def replicas(table: RoutingTable) -> Counter[str]:
    return Counter(m for s in table.shards for m in (*s.acceptors, *s.followers))


async def settle(client: kv.Client, done: object, timeout_s: float = 90.0) -> RoutingTable:
    deadline = time.monotonic() + timeout_s
    while True:
        table = await client.routing()
        if all(s.ready for s in table.shards) and done(table):  # type: ignore[operator]
            return table
        assert time.monotonic() < deadline, f"did not settle: {replicas(table)}"
        await asyncio.sleep(0.2)


async def check_all(ks: kv.Keyspace, keys: list[bytes]) -> None:
    for start in range(0, len(keys), 200):
        chunk = keys[start : start + 200]
        items = await asyncio.gather(*(ks.get(k) for k in chunk))
        assert [i.value if i else None for i in items] == chunk


@pytest.mark.timeout(240)
def test_a_new_node_is_absorbed_without_client_errors(tmp_path: Path) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        async with kv.connect(cluster.manager_address, timeout_s=30) as client:
            await client.create_keyspace("ks", shards=3, replication=3)
            writer = Writer(client.keyspace("ks"))
            tasks = [asyncio.create_task(writer.run(f"w{i}")) for i in range(4)]
            try:
                await asyncio.sleep(1)
                cluster.start_node("n4")

                def balanced(table: RoutingTable) -> bool:
                    counts = replicas(table)
                    moving = any(s.followers or len(s.acceptors) != 3 for s in table.shards)
                    spread = max(counts.values()) - min(counts.values())
                    return not moving and counts["n4"] >= 2 and spread <= 1

                table = await settle(client, balanced)
                await asyncio.sleep(1)
            finally:
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            assert writer.errors == []
            assert len(writer.acked) > 100
            assert sum(replicas(table).values()) == 9  # still 3 replicas per p-shard
            await check_all(writer.ks, writer.acked)

    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()


@pytest.mark.timeout(240)
def test_the_replicas_of_a_dead_node_move_to_a_live_one(tmp_path: Path) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        cluster.start_manager(extra=("--replace-after", "3"))
        for name in ("n1", "n2", "n3", "n4"):
            cluster.start_node(name)
        async with kv.connect(cluster.manager_address, timeout_s=30) as client:
            await client.create_keyspace("ks", shards=2, replication=3)
            ks = client.keyspace("ks")
            keys = [f"k{i}".encode() for i in range(100)]
            for key in keys:
                await ks.put(key, key)
            table = await client.routing()
            victim = replicas(table).most_common(1)[0][0]
            cluster.kill(victim)

            def replaced(table: RoutingTable) -> bool:
                moving = any(s.followers or len(s.acceptors) != 3 for s in table.shards)
                return not moving and victim not in replicas(table)

            table = await settle(client, replaced)
            for shard in table.shards:
                assert len(shard.acceptors) == 3
            await check_all(ks, keys)

    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()
