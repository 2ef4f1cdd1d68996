"""A worker: takes due calls of an `App` from DurableQ and runs them (DESIGN §8).

First form (functions issue, in progress): the worker itself finds due calls by
scanning the partitions; schedulers that own partitions, global rate and concurrency
limits and back-pressure come next. What already holds:
- a call is claimed under a lease of its timeout plus slack, so no heartbeat is
  needed: a call cannot run past its timeout, and a dead worker's call is reclaimed
  once its lease ends (at-least-once);
- async functions run on the loop, sync ones in a thread pool, both under the timeout;
- every transition is conditional on the attempt it belongs to (`queue.StaleAttempt`);
- an exception fails the attempt: retried with exponential backoff and full jitter,
  then dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec

from loom.core.errors import LoomError
from loom.functions.app import App, Context, Function
from loom.functions.queue import CallRecord, DurableQueue, StaleAttempt

log = logging.getLogger("loom.worker")
POLL_S = 0.1
LEASE_SLACK_MS = 5_000
CALLS_PER_SCAN_MAX = 100


class Worker:
    def __init__(self, app: App, *, concurrency: int = 16, name: str | None = None) -> None:
        if not 1 <= concurrency <= 10_000:
            raise ValueError("concurrency must be 1..10000")
        self.app = app
        self.name = name or f"worker-{secrets.token_hex(4)}"
        self.slots = asyncio.Semaphore(concurrency)
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fn")
        self.running: set[asyncio.Task[None]] = set()
        self.rng = random.Random()
        self.completed = 0
        self.failed = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; then waits for the calls it runs."""
        queue = await self.app.queue()
        try:
            while not stop.is_set():
                found = await self._scan(queue)
                if not found:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), POLL_S)
        finally:
            if self.running:
                await asyncio.gather(*self.running, return_exceptions=True)
            self.pool.shutdown(wait=False, cancel_futures=True)

    async def _scan(self, queue: DurableQueue) -> int:
        now_ms = int(time.time() * 1000)
        found = 0
        for partition in range(queue.partitions):
            for call_id in await queue.expired_leases(partition, now_ms):
                with contextlib.suppress(StaleAttempt):
                    await queue.reclaim(call_id, now_ms=now_ms)
            for call_id in await queue.due(partition, now_ms, limit=CALLS_PER_SCAN_MAX):
                await self.slots.acquire()
                record = await self._claim(queue, call_id, now_ms)
                if record is None:
                    self.slots.release()
                    continue
                found += 1
                task = asyncio.create_task(self._run(queue, record))
                self.running.add(task)
                task.add_done_callback(self.running.discard)
        return found

    async def _claim(self, queue: DurableQueue, call_id: str, now_ms: int) -> CallRecord | None:
        record = await queue.get(call_id)
        function = self.app.functions.get(record.function) if record else None
        if record is None or function is None:
            return None  # another app's call, or gone
        if record.deadline_ms is not None and record.deadline_ms < now_ms:
            with contextlib.suppress(StaleAttempt):
                await queue.expire(call_id, now_ms=now_ms)
            return None
        lease_ms = int(function.timeout_s * 1000) + LEASE_SLACK_MS
        try:
            return await queue.claim(call_id, worker=self.name, lease_ms=lease_ms, now_ms=now_ms)
        except StaleAttempt:
            return None  # another worker took it

    async def _run(self, queue: DurableQueue, record: CallRecord) -> None:
        function = self.app.functions[record.function]
        try:
            try:
                value = await self._invoke(function, record)
                result = msgspec.msgpack.encode(value)
            except Exception as error:  # noqa: BLE001 - a function's failure is data
                await queue.fail(
                    record.call_id,
                    attempt=record.attempt,
                    error=f"{type(error).__name__}: {error}",
                    now_ms=int(time.time() * 1000),
                    jitter=self.rng.random(),
                )
                self.failed += 1
                return
            await queue.complete(record.call_id, attempt=record.attempt, result=result)
            self.completed += 1
        except StaleAttempt:
            log.info("call %s attempt %d was taken over", record.call_id, record.attempt)
        except LoomError as error:
            # The store is unreachable: the lease runs out and another attempt follows.
            log.warning("call %s attempt %d: %s", record.call_id, record.attempt, error)
        finally:
            self.slots.release()

    async def _invoke(self, function: Function, record: CallRecord) -> object:
        args, kwargs = msgspec.msgpack.decode(record.args)
        ctx = Context(
            call_id=record.call_id,
            attempt=record.attempt,
            idempotency_key=record.idempotency_key,
            kv=await self.app.client(),
        )
        async with asyncio.timeout(function.timeout_s):
            if function.is_async:
                return await function.fn(ctx, *args, **kwargs)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, lambda: function.fn(ctx, *args, **kwargs))
