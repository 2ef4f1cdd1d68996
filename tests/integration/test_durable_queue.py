"""DurableQ's first brick against real processes: a submission is durable once
acknowledged (it survives SIGKILL of the primary holding it), a repeated idempotency
key returns the existing call, the same key with other arguments is refused, and the
due index lists queued calls in due order."""

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
    StaleAttempt,
    call_id_for,
    partition_of,
)
from loom.runtime.localcluster import LocalCluster


@pytest.mark.timeout(120)
def test_submissions_are_durable_idempotent_and_indexed(tmp_path: Path) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        async with kv.connect(cluster.manager_address, timeout_s=20) as client:
            queue = DurableQueue(client, partitions=4)
            await queue.ensure_keyspace(shards=1)
            await queue.ensure_keyspace(shards=1)  # idempotent

            first = await queue.submit("threads", "copy", b"42", idempotency_key="copy:42")
            assert first.created
            again = await queue.submit("threads", "copy", b"42", idempotency_key="copy:42")
            assert not again.created
            assert again.record.call_id == first.record.call_id
            with pytest.raises(InvalidArgument, match="other arguments"):
                await queue.submit("threads", "copy", b"43", idempotency_key="copy:42")

            now = int(time.time() * 1000)
            later = await queue.submit("threads", "copy", b"x", run_after_ms=now + 60_000)
            soon = await queue.submit("threads", "copy", b"y", run_after_ms=now - 1_000)
            plain = [await queue.submit("threads", "noop", b"%d" % i) for i in range(20)]

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
            for partition in range(queue.partitions):
                due += await queue.due(partition, now + 1_000)
            assert soon.record.call_id in due
            assert later.record.call_id not in due
            assert first.record.call_id in due
            partition = partition_of(soon.record.call_id, queue.partitions)
            ordered = await queue.due(partition, now + 120_000)
            times = [(await queue.get(c)).run_after_ms for c in ordered]  # type: ignore[union-attr]
            assert times == sorted(times)

    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()


def test_call_ids_follow_idempotency_keys() -> None:
    assert call_id_for("a", "f", "k") == call_id_for("a", "f", "k")
    assert call_id_for("a", "f", "k") != call_id_for("a", "g", "k")
    assert call_id_for("a", "f", None) != call_id_for("a", "f", None)
    assert 0 <= partition_of(call_id_for("a", "f", "k"), 64) < 64


@pytest.mark.timeout(120)
def test_transitions_are_fenced_by_the_attempt_number(tmp_path: Path) -> None:
    async def scenario(cluster: LocalCluster) -> None:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        async with kv.connect(cluster.manager_address, timeout_s=20) as client:
            queue = DurableQueue(client, partitions=2)
            await queue.ensure_keyspace(shards=1)
            now = int(time.time() * 1000)
            call = (
                await queue.submit("app", "f", b"1", attempts_max=2, run_after_ms=now)
            ).record.call_id

            running = await queue.claim(call, worker="w1", lease_ms=1_000, now_ms=now)
            assert (running.state, running.attempt, running.worker) == (CallState.RUNNING, 1, "w1")
            with pytest.raises(StaleAttempt):
                await queue.claim(call, worker="w2", lease_ms=1_000, now_ms=now)
            partition = partition_of(call, queue.partitions)
            assert call not in await queue.due(partition, now + 10_000)
            assert await queue.expired_leases(partition, now) == []
            assert await queue.expired_leases(partition, now + 1_000) == [call]

            # w1 pauses past its lease; the call is reclaimed and claimed again by w2.
            with pytest.raises(StaleAttempt):
                await queue.reclaim(call, now_ms=now + 500)  # the lease is still live
            await queue.reclaim(call, now_ms=now + 1_500)
            second = await queue.claim(call, worker="w2", lease_ms=1_000, now_ms=now + 1_500)
            assert second.attempt == 2
            with pytest.raises(StaleAttempt):  # w1 wakes up: its attempt is over
                await queue.complete(call, attempt=1, result=b"late")
            done = await queue.complete(call, attempt=2, result=b"ok")
            assert (done.state, done.result) == (CallState.SUCCEEDED, b"ok")
            with pytest.raises(StaleAttempt):
                await queue.fail(call, attempt=2, error="x", now_ms=now, jitter=0.5)

            # Failures: back to the queue after a backoff, then dead after the last attempt.
            flaky = (
                await queue.submit("app", "f", b"2", attempts_max=2, run_after_ms=now)
            ).record.call_id
            await queue.claim(flaky, worker="w1", lease_ms=1_000, now_ms=now)
            retried = await queue.fail(flaky, attempt=1, error="boom", now_ms=now, jitter=1.0)
            assert retried.state is CallState.QUEUED
            assert retried.run_after_ms == now + 1_000  # backoff 1 s for the first retry
            with pytest.raises(StaleAttempt):  # not due yet
                await queue.claim(flaky, worker="w1", lease_ms=1_000, now_ms=now)
            await queue.claim(flaky, worker="w1", lease_ms=1_000, now_ms=now + 1_000)
            dead = await queue.fail(flaky, attempt=2, error="boom", now_ms=now, jitter=1.0)
            assert (dead.state, dead.error) == (CallState.DEAD, "boom")
            assert flaky not in await queue.due(partition_of(flaky, 2), now + 10**9)

    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()
