"""Balancing by load with real processes: two p-shards under a steady workload, their
primaries put on one node by an operator; the shard manager, seeing the nodes' load
reports, hands one of them to a cool node (gracefully: no client error), and then
leaves things alone (no flapping: moving either hot primary again would not narrow the
gap)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from loom import kv
from loom.runtime.localcluster import LocalCluster
from loom.shardmgr.routing import RoutingTable

from .placement_workload import MixedWorkload, run_scenario, until

LOAD_MOVE = re.compile(r"p-shard (\d+): primary hand-off to (\S+) \((\S+) leads .* ops/s")


def hot_leaders(table: RoutingTable) -> list[str]:
    return sorted(s.primary for s in table.shards if s.keyspace == "hot")


@pytest.mark.timeout(150)
def test_a_node_leading_two_hot_shards_hands_one_to_a_cool_node(tmp_path: Path) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        cluster.start_manager(extra=("--balance-cooldown", "3", "--balance-min-ops", "5"))
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        async with (
            kv.connect(cluster.manager_address, timeout_s=30) as admin,
            kv.connect(cluster.manager_address) as client,
        ):
            await admin.create_keyspace("hot", shards=2, replication=3)
            await admin.create_keyspace("cold", shards=2, replication=3)
            load = MixedWorkload(client.keyspace("hot"))
            load.start()
            try:
                table = await admin.routing()
                for route in table.shards:
                    to = "n1" if route.keyspace == "hot" else "n2"
                    if route.primary != to:
                        await admin.transfer_primary(route.shard, to)
                assert hot_leaders(await admin.routing()) == ["n1", "n1"]
                started = time.monotonic()

                def spread(table: RoutingTable) -> bool:
                    return hot_leaders(table).count("n1") == 1

                await until(admin, spread, timeout_s=60)
                took = time.monotonic() - started
                await asyncio.sleep(6)  # several cooldowns: nothing more should move
                leaders = hot_leaders(await admin.routing())
            finally:
                await load.stop()
            assert load.errors == [], load.errors[:5]
            await load.check()
            log = (cluster.data_dir / "logs" / "sm.log").read_text()
            moves = LOAD_MOVE.findall(log)
            # Load moves only ever took a primary off the hot node (one, or the same one
            # again if a hand-off did not complete): nothing moved back or on (no flapping).
            assert moves and all(hot == "n1" for _shard, _to, hot in moves), moves
            assert leaders.count("n1") == 1
            status = await admin.status()
            loads = {s.shard: s.load_per_s for s in status.shards if s.keyspace == "hot"}
            print(f"\nload move after {took:.1f} s: {moves[0]}; hot p-shards' load {loads}")

    run_scenario(tmp_path, scenario)
