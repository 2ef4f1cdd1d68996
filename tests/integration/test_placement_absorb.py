"""New nodes are absorbed automatically, with real processes: a cluster of three nodes
serves two keyspaces under a mixed workload; a fourth node starts, and replicas and
primaries move onto it (graceful hand-offs, one move at a time) with no client error."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from loom import kv
from loom.runtime.localcluster import LocalCluster
from loom.shardmgr.routing import RoutingTable

from .placement_workload import MixedWorkload, run_scenario, start_cluster, until


def replicas(table: RoutingTable) -> Counter[str]:
    return Counter(m for s in table.shards for m in (*s.acceptors, *s.followers))


def primaries(table: RoutingTable) -> Counter[str]:
    return Counter(s.primary for s in table.shards)


@pytest.mark.timeout(150)
def test_a_new_node_takes_replicas_and_primaries_without_client_errors(tmp_path: Path) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        start_cluster(cluster, {"n1": "", "n2": "", "n3": ""})
        async with (
            kv.connect(cluster.manager_address, timeout_s=30) as admin,
            kv.connect(cluster.manager_address) as client,
        ):
            for name in ("a", "b"):
                await admin.create_keyspace(name, shards=2, replication=3)
            loads = [MixedWorkload(client.keyspace(name), tasks=2) for name in ("a", "b")]
            for load in loads:
                load.start()
            try:
                await asyncio.sleep(1.0)
                # In a thread: starting waits for the process to listen, and the
                # workload shares this event loop.
                await asyncio.to_thread(cluster.start_node, "n4")

                def absorbed(table: RoutingTable) -> bool:
                    moving = any(s.followers or len(s.acceptors) != 3 for s in table.shards)
                    return not moving and replicas(table)["n4"] >= 3 and primaries(table)["n4"] >= 1

                table = await until(admin, absorbed, timeout_s=90)
                await asyncio.sleep(0.5)
            finally:
                for load in loads:
                    await load.stop()
            for load in loads:
                assert load.errors == [], load.errors[:5]
                assert load.operations > 50
                await load.check()
            counts = replicas(table)
            assert sum(counts.values()) == 12  # still 3 replicas per p-shard
            assert max(counts.values()) - min(counts.values()) <= 1
            print(f"\nreplicas {dict(counts)}, primaries {dict(primaries(table))}")

    run_scenario(tmp_path, scenario)
