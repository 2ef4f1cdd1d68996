"""Nothing is lost: 10,000 calls run to completion while a worker, a scheduler and the
kv primary holding part of the queue are each killed with SIGKILL (real processes)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from loom import kv
from loom.functions.queue import KEYSPACE, CallState, DurableQueue
from loom.runtime.localcluster import LocalCluster

from .fn_app import app, noop

HERE = Path(__file__).parent
CALLS = 10_000


async def states(queue: DurableQueue) -> Counter[CallState]:
    counts: Counter[CallState] = Counter()
    for partition in range(queue.partitions):
        async for record in queue.records(partition):
            counts[record.state] += 1
    return counts


@pytest.mark.timeout(300)
def test_ten_thousand_calls_survive_killing_a_worker_a_scheduler_and_a_kv_primary(
    tmp_path: Path,
) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        cluster.start_scheduler("s1")
        cluster.start_scheduler("s2")
        cwd = os.getcwd()
        os.chdir(HERE)  # the workers import fn_app from here
        try:
            cluster.start_worker("w1", "fn_app:app", concurrency=32)
            cluster.start_worker("w2", "fn_app:app", concurrency=32)
        finally:
            os.chdir(cwd)
        app.cluster = cluster.manager_address
        try:
            calls = []
            for start in range(0, CALLS, 500):
                calls += await noop.submit_many([[i] for i in range(start, start + 500)])
            assert len({c.call_id for c in calls}) == CALLS
            queue = await app.queue()
            async with kv.connect(cluster.manager_address) as client:
                faults = ["w1", "s1", "primary"]
                deadline = time.monotonic() + 240
                while True:
                    counts = await states(queue)
                    done = counts[CallState.SUCCEEDED]
                    if done == CALLS:
                        break
                    assert time.monotonic() < deadline, f"stuck at {counts}"
                    assert not counts[CallState.DEAD] and not counts[CallState.EXPIRED], counts
                    if faults and done >= CALLS * (4 - len(faults)) // 5:
                        fault = faults.pop(0)
                        if fault == "primary":
                            table = await client.routing()
                            fault = next(s.primary for s in table.shards if s.keyspace == KEYSPACE)
                        cluster.kill(fault)
                    await asyncio.sleep(1.0)
            assert not faults, "the run ended before every fault was injected"
            results = [await c.status() for c in calls[:: CALLS // 100]]
            assert all(r.state is CallState.SUCCEEDED for r in results)
        finally:
            await app.close()

    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()
