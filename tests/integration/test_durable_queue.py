"""DurableQ against real processes: a submission is durable once acknowledged (it
survives SIGKILL of the primary holding it); a repeated idempotency key returns the
existing call, the same key with other arguments is refused; the due index lists a
function's queued calls in due order; transitions are fenced by the attempt number
and the scheduler's partition lease."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from loom import kv
from loom.core.errors import InvalidArgument
from loom.functions.queue import (
    KEYSPACE,
    CallState,
    DurableQueue,
    LeaseLost,
    NotStarted,
    PartitionLease,
    StaleAttempt,
    Submission,
    Succeeded,
    WasThrottled,
    call_id_for,
    partition_of,
)
from loom.runtime.localcluster import LocalCluster


def sub(function: str, args: bytes, partitions: int, **options: object) -> Submission:
    return Submission("threads", function, args, partitions=range(partitions), **options)  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_submissions_are_durable_idempotent_and_indexed(tmp_path: Path) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        async with kv.connect(cluster.manager_address, timeout_s=20) as client:
            queue = await DurableQueue.open(client, partitions=4, shards=1)
            assert (await DurableQueue.open(client, partitions=9)).partitions == 4  # adopted

            first = await queue.submit(sub("copy", b"42", 4, idempotency_key="copy:42"))
            assert first.created
            again = await queue.submit(sub("copy", b"42", 4, idempotency_key="copy:42"))
            assert not again.created
            assert again.record.call_id == first.record.call_id
            with pytest.raises(InvalidArgument, match="other arguments"):
                await queue.submit(sub("copy", b"43", 4, idempotency_key="copy:42"))

            now = int(time.time() * 1000)
            later = await queue.submit(sub("copy", b"x", 4, run_after_ms=now + 60_000))
            soon = await queue.submit(sub("copy", b"y", 4, run_after_ms=now - 1_000))
            plain = await queue.submit_many([sub("noop", b"%d" % i, 4) for i in range(50)])
            assert all(p.created for p in plain)

            # The primary holding the calls dies: every acknowledged call is still there.
            table = await client.routing()
            (route,) = [s for s in table.shards if s.keyspace == KEYSPACE]
            cluster.kill(route.primary)
            for submitted in (first, later, soon, *plain):
                record = await queue.get(submitted.record.call_id)
                assert record is not None
                assert record.state is CallState.QUEUED
                assert record.args == submitted.record.args

            due: list[str] = []
            noop_due = 0
            for partition in range(queue.partitions):
                due += [
                    c.call_id for c in await queue.due(partition, "threads", "copy", now + 1_000)
                ]
                noop_due += len(await queue.due(partition, "threads", "noop", now + 1_000))
            assert soon.record.call_id in due
            assert later.record.call_id not in due
            assert first.record.call_id in due
            assert noop_due == 50
            partition = partition_of(soon.record.call_id)
            ordered = await queue.due(partition, "threads", "copy", now + 120_000)
            times = [c.run_after_ms for c in ordered]
            assert times == sorted(times)

    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()


def test_call_ids_name_their_partition() -> None:
    assert call_id_for("a", "f", "k", [0, 1, 2]) == call_id_for("a", "f", "k", [0, 1, 2])
    assert call_id_for("a", "f", "k", [0, 1]) != call_id_for("a", "g", "k", [0, 1])
    assert call_id_for("a", "f", None, [3]) != call_id_for("a", "f", None, [3])
    assert partition_of(call_id_for("a", "f", None, [7])) == 7
    assert {partition_of(call_id_for("a", "f", str(i), [2, 5])) for i in range(40)} == {2, 5}
    for bad in ("", "x-00", "1-" + "g" * 32, "12345-" + "0" * 32):
        with pytest.raises(InvalidArgument):
            partition_of(bad)


@pytest.mark.timeout(120)
def test_transitions_are_fenced_by_attempt_and_partition_lease(tmp_path: Path) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        async with kv.connect(cluster.manager_address, timeout_s=20) as client:
            queue = await DurableQueue.open(client, partitions=1, shards=1)
            now = int(time.time() * 1000)
            call = (
                await queue.submit(sub("f", b"1", 1, attempts_max=2, run_after_ms=now))
            ).record.call_id

            s1 = await queue.acquire(0, "s1", PartitionLease())
            running = await queue.claim(s1, call, lease_ms=1_000, now_ms=now)
            assert (running.state, running.attempt, running.scheduler) == (
                CallState.RUNNING,
                1,
                "s1",
            )
            with pytest.raises(StaleAttempt):
                await queue.claim(s1, call, lease_ms=1_000, now_ms=now)
            assert call not in [c.call_id for c in await queue.due(0, "threads", "f", now + 10_000)]
            assert [c.call_id for c in await queue.running(0)] == [call]

            # s1 pauses; s2 takes the partition (its token is higher). s1's writes now
            # change nothing, even with a lease record it read before.
            with pytest.raises(LeaseLost):
                await queue.acquire(0, "s2", PartitionLease())  # not what the record says
            s2 = await queue.acquire(0, "s2", await queue.lease(0))
            assert s2.token == s1.token + 1
            with pytest.raises(LeaseLost):
                await queue.reclaim(s1, call, attempt=1, now_ms=now)
            with pytest.raises(LeaseLost):
                await queue.renew(s1)
            await queue.renew(s2)

            # s2 saw the call's lease end: reclaimed, claimed again as attempt 2.
            await queue.reclaim(s2, call, attempt=1, now_ms=now + 1_500)
            second = await queue.claim(s2, call, lease_ms=1_000, now_ms=now + 1_500)
            assert second.attempt == 2
            with pytest.raises(StaleAttempt):  # the first attempt's worker wakes up
                await queue.complete(call, attempt=1, result=b"late")
            done = await queue.complete(call, attempt=2, result=b"ok")
            assert (done.state, done.result) == (CallState.SUCCEEDED, b"ok")
            with pytest.raises(StaleAttempt):
                await queue.fail(call, attempt=2, error="x", now_ms=now, jitter=0.5)

            # Failures: back to the queue after a backoff, then dead after the last
            # attempt; a throttled attempt does not count.
            flaky = (
                await queue.submit(sub("f", b"2", 1, attempts_max=2, run_after_ms=now))
            ).record.call_id
            await queue.claim(s2, flaky, lease_ms=1_000, now_ms=now)
            retried = await queue.fail(flaky, attempt=1, error="boom", now_ms=now, jitter=1.0)
            assert retried.state is CallState.QUEUED
            assert retried.run_after_ms == now + 1_000  # backoff 1 s for the first retry
            with pytest.raises(StaleAttempt):  # not due yet
                await queue.claim(s2, flaky, lease_ms=1_000, now_ms=now)
            await queue.claim(s2, flaky, lease_ms=1_000, now_ms=now + 1_000)
            (throttled,) = await queue.finish_many(
                0, [WasThrottled(flaky, 2, 500)], now_ms=now + 1_000, jitter=lambda: 1.0
            )
            assert not isinstance(throttled, StaleAttempt)
            assert (throttled.state, throttled.attempts_used) == (CallState.QUEUED, 1)
            await queue.claim(s2, flaky, lease_ms=1_000, now_ms=now + 1_500)
            dead = await queue.fail(flaky, attempt=3, error="boom", now_ms=now, jitter=1.0)
            assert (dead.state, dead.error, dead.attempts_used) == (CallState.DEAD, "boom", 2)
            assert await queue.dead_letters() == [flaky]
            replayed = await queue.replay(flaky, now_ms=now + 2_000)
            assert (replayed.state, replayed.attempts_max) == (CallState.QUEUED, 4)

            # Many outcomes in one transaction; a stale one is refused alone.
            batch = [
                r.record.call_id
                for r in await queue.submit_many([sub("g", b"", 1) for _ in range(5)])
            ]
            claimed = await queue.claim_many(
                s2, [(c, 1_000) for c in batch], scheduler="s2", now_ms=now + 10_000
            )
            assert all(not isinstance(r, StaleAttempt) for r in claimed)
            outcomes = [Succeeded(c, 1, b"") for c in batch] + [Succeeded(flaky, 9, b"")]
            done_many = await queue.finish_many(0, outcomes, now_ms=now, jitter=lambda: 0.0)
            assert [isinstance(r, StaleAttempt) for r in done_many] == [False] * 5 + [True]

            # A call handed back unstarted uses no attempt; a lease that ends on the
            # last attempt dead-letters the call (one that kills its worker every time
            # must not run forever).
            lost = (
                await queue.submit(sub("h", b"3", 1, attempts_max=1, run_after_ms=now))
            ).record.call_id
            await queue.claim(s2, lost, lease_ms=1_000, now_ms=now)
            (back,) = await queue.finish_many(
                0, [NotStarted(lost, 1)], now_ms=now, jitter=lambda: 0.0
            )
            assert not isinstance(back, StaleAttempt)
            assert (back.state, back.attempts_used) == (CallState.QUEUED, 0)
            await queue.claim(s2, lost, lease_ms=1_000, now_ms=now)
            expired = await queue.reclaim(s2, lost, attempt=2, now_ms=now + 1_500)
            assert expired.state is CallState.DEAD and "lease expired" in (expired.error or "")
            assert lost in await queue.dead_letters()

    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()
