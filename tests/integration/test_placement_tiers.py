"""Moving a keyspace to another tier is a live operation, with real processes: a keyspace
on the shared `wildcard` tier moves to a dedicated tier of three nodes under a mixed
workload, with a shard-manager crash (-9) and restart in the middle. The move resumes by
itself, clients see no error, every replica ends on the tier's nodes and the data is
intact. A tier with too few live nodes is refused with a typed error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from loom import kv
from loom.core.errors import InvalidArgument, NotFound
from loom.kv.placement import tier_progress
from loom.runtime.localcluster import LocalCluster
from loom.shardmgr.routing import RoutingTable

from .placement_workload import MixedWorkload, run_scenario, start_cluster, until

NODES = {"n1": "", "n2": "", "n3": "", "g1": "gold", "g2": "gold", "g3": "gold", "s1": "silver"}


@pytest.mark.timeout(180)
def test_a_keyspace_moves_to_a_dedicated_tier_live_and_resumes_after_a_manager_crash(
    tmp_path: Path,
) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        start_cluster(cluster, NODES)
        async with (
            kv.connect(cluster.manager_address, timeout_s=30) as admin,
            kv.connect(cluster.manager_address) as client,
        ):
            await admin.create_keyspace("ks", shards=2, replication=3)
            table = await admin.routing()
            assert {m for s in table.shards for m in s.acceptors} == {"n1", "n2", "n3"}
            with pytest.raises(InvalidArgument, match="tier 'silver' has 1 live node"):
                await admin.set_keyspace_tier("ks", "silver")
            with pytest.raises(NotFound):
                await admin.set_keyspace_tier("nothing", "gold")
            load = MixedWorkload(client.keyspace("ks"))
            load.start()
            try:
                await asyncio.sleep(1.0)
                moved = await admin.set_keyspace_tier("ks", "gold", wait=False)
                assert moved.spec.tier == "gold"

                def partly(table: RoutingTable) -> bool:
                    return tier_progress(table, "ks")[0] >= 2

                await until(admin, partly, timeout_s=60)
                cluster.kill("sm")
                await asyncio.sleep(0.5)
                # In a thread: a restart waits for the process to listen, and the
                # workload shares this event loop.
                await asyncio.to_thread(cluster.restart, "sm")
                shown: list[tuple[int, int]] = []
                final = await admin.set_keyspace_tier(
                    "ks", "gold", progress=lambda placed, total: shown.append((placed, total))
                )
                assert final.spec.tier == "gold"
                await asyncio.sleep(0.5)
            finally:
                await load.stop()
            assert load.errors == [], load.errors[:5]
            assert load.operations > 100
            await load.check()
            table = await admin.routing()
            members = {m for s in table.shards for m in (*s.acceptors, *s.followers)}
            assert members == {"g1", "g2", "g3"}
            assert shown[-1] == (6, 6)
            print(
                f"\nmoved to gold: {load.operations} operations, slowest "
                f"{load.slowest_s * 1000:.0f} ms, 0 errors; progress seen {shown[0]}→{shown[-1]}"
                f"; over 1 s: {load.slow}"
            )

    run_scenario(tmp_path, scenario)
