"""The functions API end to end on real processes: functions declared on an `App`,
calls submitted durably, a worker running async and sync functions, results returned,
failures retried with backoff and then dead-lettered, idempotent submission."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loom import kv
from loom.functions import App, CallFailed, Context, Retry
from loom.functions.queue import CallState
from loom.functions.scheduler import Scheduler
from loom.functions.worker import Worker
from loom.runtime.localcluster import LocalCluster

FLAKY_FAILURES = 1


def loom(*args: str) -> str:
    done = subprocess.run(  # our own interpreter and arguments
        [sys.executable, "-m", "loom.cli.main", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout


def make_app(address: str) -> App:
    app = App("test", cluster=address, partitions=4)
    attempts: dict[str, int] = {}

    @app.function(timeout_s=10)
    async def add(ctx: Context, a: int, b: int) -> int:
        return a + b

    @app.function(timeout_s=10)
    def shout(ctx: Context, text: str) -> str:  # sync: runs in the worker's pool
        return text.upper()

    @app.function(retries=Retry(attempts_max=3, backoff_s=0.05, backoff_max_s=0.2))
    async def flaky(ctx: Context, key: str) -> int:
        attempts[key] = attempts.get(key, 0) + 1
        if attempts[key] <= FLAKY_FAILURES:
            raise RuntimeError("not yet")
        return ctx.attempt

    @app.function(retries=Retry(attempts_max=2, backoff_s=0.05, backoff_max_s=0.1))
    async def broken(ctx: Context) -> None:
        raise ValueError("always")

    return app


@pytest.mark.timeout(120)
def test_submitted_calls_run_retry_and_dead_letter(tmp_path: Path) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        app = make_app(cluster.manager_address)
        stop = asyncio.Event()
        scheduler = Scheduler(await kv.connect(cluster.manager_address))
        scheduling = asyncio.create_task(scheduler.run(stop))
        worker = Worker(app, concurrency=8)
        running = asyncio.create_task(worker.run(stop))
        try:
            fns = app.functions
            sums = [await fns["add"].submit(i, 100) for i in range(20)]
            loud = await fns["shout"].submit("quiet")
            flaky = await fns["flaky"].submit("k1")
            broken = await fns["broken"].submit()
            same = await fns["add"].submit(1, 2, idempotency_key="once")
            again = await fns["add"].submit(1, 2, idempotency_key="once")
            assert same.call_id == again.call_id

            assert [await c.result(timeout_s=30) for c in sums] == [i + 100 for i in range(20)]
            assert await loud.result(timeout_s=30) == "QUIET"
            assert await flaky.result(timeout_s=30) == 2  # succeeded on its second attempt
            with pytest.raises(CallFailed, match="ValueError: always"):
                await broken.result(timeout_s=30)
            assert (await broken.status()).state is CallState.DEAD
            assert (await broken.status()).attempt == 2
            assert await same.result(timeout_s=30) == 3

            # The dead-letter set, from the command line: listed, replayed, dead again.
            address = cluster.manager_address
            listed = await asyncio.to_thread(
                loom, "functions", "dead-letter", "ls", "--json", "-c", address
            )
            assert [c["call_id"] for c in json.loads(listed)] == [broken.call_id]
            await asyncio.to_thread(
                loom, "functions", "dead-letter", "replay", broken.call_id, "-c", address
            )
            with pytest.raises(CallFailed):
                await broken.result(timeout_s=30)
            assert (await broken.status()).attempt == 4  # two more attempts, then dead

            # Past its deadline before it could run: expired, listed, replayable.
            now = time.time()
            late = await fns["add"].submit(2, 2, run_after=now - 2, deadline=now - 1)
            with pytest.raises(CallFailed, match="expired"):
                await late.result(timeout_s=30)
            await asyncio.to_thread(
                loom, "functions", "dead-letter", "replay", late.call_id, "-c", address
            )
            assert await late.result(timeout_s=30) == 4

            # What ran, from the command line.
            listed = json.loads(
                await asyncio.to_thread(loom, "functions", "ls", "--json", "-c", address)
            )
            rows = {row["function"]: row for row in listed["functions"]}
            assert set(rows) == {"test.add", "test.shout", "test.flaky", "test.broken"}
            assert rows["test.add"]["queued"] == 0 and rows["test.add"]["dispatched"] >= 20
            assert listed["schedulers"][0]["partitions"] == (await app.queue()).partitions
            dead = json.loads(
                await asyncio.to_thread(
                    loom, "functions", "calls", "--state", "dead", "--json", "-c", address
                )
            )
            assert [c["call_id"] for c in dead] == [broken.call_id]
            added = await asyncio.to_thread(
                loom, "functions", "calls", "--function", "test.add", "--limit", "5", "-c", address
            )
            assert added.count("succeeded") == 5
        finally:
            stop.set()
            await running
            await scheduling
            await scheduler.client.close()
            await app.close()
        assert worker.completed >= 23

    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()
