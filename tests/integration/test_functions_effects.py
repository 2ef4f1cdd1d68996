"""Effects, exactly once, over at-least-once calls (real kv processes, scheduler and
worker in this process): `ctx.once` commits an effect with its marker so a retried
call changes nothing; sagas skip their logged steps on retry (forward recovery) or
compensate the done steps in reverse (backward recovery); a succeeded call is
forgotten after the retention period, and its idempotency key with it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from loom import kv
from loom.functions import App, CallFailed, CallState, Context, Recovery, Retry
from loom.functions.scheduler import Scheduler
from loom.functions.worker import Worker
from loom.runtime.localcluster import LocalCluster


@pytest.mark.timeout(180)
def test_once_sagas_and_retention(tmp_path: Path) -> None:
    runs: dict[str, int] = {}
    undone: list[str] = []

    async def scenario(cluster: LocalCluster) -> None:
        app = App("effects", cluster=cluster.manager_address, partitions=4)
        quick = Retry(attempts_max=4, backoff_s=0.05, backoff_max_s=0.1)

        @app.function(retries=quick, timeout_s=10)
        async def follow(ctx: Context, user: int) -> int:
            async def effect(tx: kv.Transaction) -> int:
                item = await tx.get(b"followers")
                count = int(item.value) + 1 if item else 1
                await tx.put(b"followers", b"%d" % count)
                return count

            count = await ctx.once("graph", b"celebrity", "follow", effect)
            if ctx.attempt == 1:
                raise RuntimeError("crash after the effect")  # the call is retried
            return count

        forward = app.saga("forward", retries=quick)

        @forward.step()
        async def reserve(ctx: Context, n: int) -> int:
            runs["reserve"] = runs.get("reserve", 0) + 1
            return n + 1

        @forward.step()
        async def charge(ctx: Context, n: int) -> int:
            runs["charge"] = runs.get("charge", 0) + 1
            if runs["charge"] < 3:
                raise RuntimeError("card declined, for now")
            return n * 10

        backward = app.saga("backward", recovery=Recovery.BACKWARD, retries=quick)

        async def undo_a(ctx: Context, n: int) -> None:
            undone.append("a")

        async def undo_b(ctx: Context, n: int) -> None:
            undone.append("b")

        @backward.step(compensate=undo_a)
        async def step_a(ctx: Context, n: int) -> int:
            return n

        @backward.step(compensate=undo_b)
        async def step_b(ctx: Context, n: int) -> int:
            return n

        @backward.step()
        async def step_c(ctx: Context, n: int) -> int:
            raise ValueError("no stock")

        client = await kv.connect(cluster.manager_address)
        await client.create_keyspace("graph", shards=1)
        stop = asyncio.Event()
        scheduler = Scheduler(await kv.connect(cluster.manager_address), retention_s=2.0)
        tasks = [
            asyncio.create_task(scheduler.run(stop)),
            asyncio.create_task(Worker(app, concurrency=8).run(stop)),
        ]
        try:
            call = await follow.submit(7, idempotency_key="follow:7")
            assert await call.result(timeout_s=60) == 1
            assert (await call.status()).attempt == 2
            item = await client.keyspace("graph").get(b"followers", shard_key=b"celebrity")
            assert item is not None and item.value == b"1"  # the retry changed nothing

            assert await (await forward.submit(4)).result(timeout_s=60) == 50
            assert runs == {"reserve": 1, "charge": 3}  # reserve ran once, charge retried

            failed = await backward.submit(1)
            with pytest.raises(CallFailed, match="compensated"):
                await failed.result(timeout_s=60)
            assert undone == ["b", "a"]
            assert (await failed.status()).attempt == 1  # compensated: not retried

            # Retention: the succeeded call is forgotten; its key makes a new call.
            deadline = time.monotonic() + 60
            while await call.queue.get(call.call_id) is not None:
                assert time.monotonic() < deadline, "the succeeded call was never forgotten"
                await asyncio.sleep(0.5)
            again = await follow.submit(7, idempotency_key="follow:7")
            assert again.call_id == call.call_id
            assert await again.result(timeout_s=60) == 1  # the marker still holds
            assert (await failed.status()).state is CallState.DEAD  # dead letters stay
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            await scheduler.client.close()
            await client.close()
            await app.close()

    cluster = LocalCluster(data_dir=tmp_path)
    try:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()
