"""Dispatch under the functions' limits, with real kv processes and two schedulers in
this process: a rate limit and a concurrency limit hold across both schedulers; a
batched function gets its calls grouped; `Throttled` cuts the downstream's AIMD rate
and uses up no attempt; a tenant's flood does not starve another tenant."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from loom import kv
from loom.core.errors import Throttled
from loom.functions import App, Context, Retry
from loom.functions.limits import BURST_S, AimdSettings
from loom.functions.queue import CallState
from loom.functions.registry import Batch
from loom.functions.scheduler import Scheduler
from loom.functions.worker import Worker
from loom.runtime.localcluster import LocalCluster


@asynccontextmanager
async def running(
    cluster: LocalCluster, apps: list[App], *, schedulers: int = 2, aimd: AimdSettings | None = None
) -> AsyncIterator[list[Scheduler]]:
    """Schedulers and one worker per app, all in this process, until the block ends."""
    stop = asyncio.Event()
    clients = [await kv.connect(cluster.manager_address) for _ in range(schedulers)]
    started = [Scheduler(c, lease_s=1.0, aimd=aimd) for c in clients]
    tasks = [asyncio.create_task(s.run(stop)) for s in started]
    tasks += [asyncio.create_task(Worker(app, concurrency=32).run(stop)) for app in apps]
    try:
        yield started
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for client in clients:
            await client.close()
        for app in apps:
            await app.close()


def start_kv(cluster: LocalCluster) -> None:
    cluster.start_manager()
    for name in ("n1", "n2", "n3"):
        cluster.start_node(name)


def run_scenario(tmp_path: Path, scenario) -> None:  # type: ignore[no-untyped-def]
    cluster = LocalCluster(data_dir=tmp_path)
    try:
        start_kv(cluster)
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()


@pytest.mark.timeout(180)
def test_rate_and_concurrency_limits_hold_across_two_schedulers(tmp_path: Path) -> None:
    rate = 20.0
    starts: list[float] = []
    concurrent = [0, 0]  # now, most

    async def scenario(cluster: LocalCluster) -> None:
        app = App("limits", cluster=cluster.manager_address, partitions=8)

        @app.function(rate_limit_per_s=rate, timeout_s=10)
        async def limited(ctx: Context, i: int) -> int:
            starts.append(time.monotonic())
            return i

        @app.function(concurrency_max=3, timeout_s=10)
        async def narrow(ctx: Context, i: int) -> int:
            concurrent[0] += 1
            concurrent[1] = max(concurrent[1], concurrent[0])
            await asyncio.sleep(0.05)
            concurrent[0] -= 1
            return i

        async with running(cluster, [app]) as schedulers:
            # Both schedulers hold partitions before the calls arrive.
            deadline = time.monotonic() + 20
            while not all(s.partitions for s in schedulers):
                assert time.monotonic() < deadline, "the schedulers never split the partitions"
                await asyncio.sleep(0.1)
            calls = await limited.submit_many([[i] for i in range(80)])
            narrow_calls = await narrow.submit_many([[i] for i in range(30)])
            assert [await c.result(timeout_s=60) for c in calls] == list(range(80))
            assert [await c.result(timeout_s=60) for c in narrow_calls] == list(range(30))
            # Each partition is held by exactly one of them.
            held = [p for s in schedulers for p in s.partitions]
            assert sorted(held) == list(range((await app.queue()).partitions))

        assert concurrent[1] <= 3
        # Over every window, at most rate·window plus each scheduler's burst.
        burst = 2 * max(1.0, rate * BURST_S)
        starts.sort()
        for i, first in enumerate(starts):
            for j in range(i, len(starts)):
                window = starts[j] - first
                assert j - i + 1 <= rate * window + burst + 1, (i, j, window)

    run_scenario(tmp_path, scenario)


@pytest.mark.timeout(180)
def test_batched_calls_run_together_and_throttled_calls_cut_the_rate(tmp_path: Path) -> None:
    batches: list[int] = []
    throttles = [40]

    async def scenario(cluster: LocalCluster) -> None:
        app = App("batching", cluster=cluster.manager_address, partitions=4)

        @app.function(batch=Batch(size_max=10, wait_ms=100), timeout_s=10)
        async def double(ctx: Context, items: list[int]) -> list[int]:
            batches.append(len(items))
            return [2 * i for i in items]

        @app.function(downstream=("kv:tight",), retries=Retry(attempts_max=1), timeout_s=10)
        async def pushy(ctx: Context, i: int) -> int:
            if throttles[0] > 0:
                throttles[0] -= 1
                raise Throttled("over quota", retry_after_ms=50)
            return i

        settings = AimdSettings(rate_initial=200, rate_max=400, increase_per_s=5)
        async with running(cluster, [app], schedulers=1, aimd=settings) as (scheduler,):
            doubled = await double.submit_many([[i] for i in range(60)])
            assert [await c.result(timeout_s=60) for c in doubled] == [2 * i for i in range(60)]
            pushed = await pushy.submit_many([[i] for i in range(30)])
            # One attempt each, yet none dead-lettered: Throttled used up no attempt.
            assert [await c.result(timeout_s=60) for c in pushed] == list(range(30))
            records = [await c.status() for c in pushed]
            assert all(r.state is CallState.SUCCEEDED for r in records)
            assert sum(r.throttled for r in records) == 40
            controller = scheduler.downstreams["kv:tight"].aimd
            assert controller.cuts >= 1
            assert controller.current(time.monotonic()) < settings.rate_max
            assert scheduler.status()["downstreams"]["kv:tight"]["throttling"]  # type: ignore[index]

        assert sum(batches) == 60
        assert max(batches) > 1 and max(batches) <= 10

    run_scenario(tmp_path, scenario)


@pytest.mark.timeout(180)
def test_a_flooding_tenant_does_not_starve_another(tmp_path: Path) -> None:
    started: dict[str, list[float]] = {"flood": [], "quiet": []}

    async def scenario(cluster: LocalCluster) -> None:
        apps = []
        for name in ("flood", "quiet"):
            app = App(name, cluster=cluster.manager_address, partitions=4)

            @app.function(downstream=("kv:shared",), timeout_s=10, name="work")
            async def work(ctx: Context, i: int, name: str = name) -> int:
                started[name].append(time.monotonic())
                return i

            apps.append(app)
        # The shared downstream admits 60 calls/s in all: the tenants compete for it.
        settings = AimdSettings(rate_initial=60, rate_max=60, rate_min=1)
        async with running(cluster, apps, schedulers=1, aimd=settings) as (scheduler,):
            deadline = time.monotonic() + 30
            while {w.pull.app for w in scheduler.waiters} != {"flood", "quiet"}:
                assert time.monotonic() < deadline, "the workers never pulled"
                await asyncio.sleep(0.05)
            await apps[0].functions["work"].submit_many([[i] for i in range(1500)])
            await asyncio.sleep(1.0)  # the flood is under way
            quiet = await apps[1].functions["work"].submit_many([[i] for i in range(60)])
            for call in quiet:
                await call.result(timeout_s=60)
            # Times are the calls' starts, so a slow machine stretching the time to
            # notice them or to collect their results does not count against the share.
            first, last = started["quiet"][0], started["quiet"][-1]
            # The quiet tenant did not wait behind the flood's backlog ...
            assert sum(1 for t in started["flood"] if t <= last) < 1500
            # ... and while its 60 calls were being started, the flood got about as
            # many (its fair half of the downstream), not the whole downstream.
            flood_meanwhile = sum(1 for t in started["flood"] if first <= t <= last)
            assert flood_meanwhile < 2 * 60, flood_meanwhile

    run_scenario(tmp_path, scenario)


@pytest.mark.timeout(180)
def test_a_keyspace_over_its_quota_cuts_the_dispatch_rate_and_dead_letters_nothing(
    tmp_path: Path,
) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        app = App("quota", cluster=cluster.manager_address, partitions=4)
        retry = Retry(attempts_max=3, backoff_s=0.1, backoff_max_s=0.5)

        @app.function(downstream=("kv:tight",), retries=retry, timeout_s=10)
        async def write(ctx: Context, i: int) -> int:
            await ctx.kv.keyspace("tight").put(b"k%d" % i, b"v" * 100)
            return i

        async with kv.connect(cluster.manager_address) as admin:
            await admin.create_keyspace("tight", shards=1)
            await admin.set_quota("tight", writes_per_s=20)
            settings = AimdSettings(rate_initial=400, rate_max=400, increase_per_s=2)
            async with running(cluster, [app], schedulers=1, aimd=settings) as (scheduler,):
                calls = await write.submit_many([[i] for i in range(150)])
                # None dead-lettered: the quota slowed the calls down, it did not fail them.
                assert [await c.result(timeout_s=120) for c in calls] == list(range(150))
                controller = scheduler.downstreams["kv:tight"].aimd
                assert controller.cuts >= 1
                assert controller.current(time.monotonic()) < settings.rate_max

    run_scenario(tmp_path, scenario)
