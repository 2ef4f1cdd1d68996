"""Graceful primary hand-offs with real processes (`loom sm`, three `loom node`): a
client running a steady mixed workload sees no error while the operator hands the
primaries of two p-shards around several times (`transfer_primary`, the call behind
`loom shard transfer-primary`); every acknowledged write is there afterwards, and each
increment counted exactly once. Bad requests get typed errors."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from loom import kv
from loom.core.errors import InvalidArgument, NotFound
from loom.runtime.localcluster import LocalCluster

from .placement_workload import MixedWorkload, run_scenario, start_cluster

HANDOFFS = 6


@pytest.mark.timeout(120)
def test_primaries_are_handed_off_repeatedly_under_a_mixed_workload_without_errors(
    tmp_path: Path,
) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        start_cluster(cluster, {"n1": "", "n2": "", "n3": ""})
        async with (
            kv.connect(cluster.manager_address, timeout_s=30) as admin,
            kv.connect(cluster.manager_address) as client,  # the default 10 s deadline
        ):
            await admin.create_keyspace("ks", shards=2, replication=3)
            load = MixedWorkload(client.keyspace("ks"))
            load.start()
            took = []
            try:
                await asyncio.sleep(1.0)
                for turn in range(HANDOFFS):
                    table = await admin.routing()
                    route = table.shards[turn % len(table.shards)]
                    to = next(a for a in sorted(route.acceptors) if a != route.primary)
                    started = time.monotonic()
                    primary, epoch = await admin.transfer_primary(route.shard, to)
                    took.append(time.monotonic() - started)
                    assert primary == to and epoch > route.epoch
                    await asyncio.sleep(0.5)
                done_before = load.operations
                await asyncio.sleep(0.5)
                assert load.operations > done_before  # still serving after the last one
            finally:
                await load.stop()
            assert load.errors == [], load.errors[:5]
            assert load.operations > 200
            await load.check()
            print(
                f"\n{HANDOFFS} hand-offs: each took {min(took):.2f}-{max(took):.2f} s "
                f"(catch-up + activation); {load.operations} operations, slowest "
                f"{load.slowest_s * 1000:.0f} ms, 0 errors"
            )
            # Typed refusals.
            table = await admin.routing()
            route = table.shards[0]
            with pytest.raises(InvalidArgument):
                await admin.transfer_primary(route.shard, "nobody")
            with pytest.raises(NotFound):
                await admin.transfer_primary(999_999, route.primary)

    run_scenario(tmp_path, scenario)
