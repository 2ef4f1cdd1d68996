"""A worker: pulls calls of an `App` from the schedulers and runs them (DESIGN §8).

- It publishes its functions' configs (limits, batching, downstreams) to the store,
  finds the live schedulers there, and long-polls each with its free slots, several
  pulls at once, so one pull's claim in the store overlaps the next.
- While its calls are short it prefetches: it asks for more calls than it runs at
  once (`concurrency × (1 + PREFETCH)`), so it is never idle waiting for a claim; a
  fetched call waits for a running slot at most about one short call's time. Long
  calls are not prefetched (another worker may be free to run them now), nor those
  of an app with rate, concurrency or downstream limits (they must start at the
  pace they were claimed at).
- Async functions run on the loop, sync ones in a thread pool, both under the
  function's timeout. (A sync function that ignores its timeout cannot be stopped —
  Python threads cannot be killed; its late outcome is fenced out by the attempt.)
- Outcomes are recorded in the store in one transaction per partition for all calls
  that finished within a few ms, each conditional on its attempt; then the dispatching
  scheduler hears of them. Every few seconds every scheduler hears which calls are
  still running (heartbeats), so a long call keeps its lease.
- `Throttled` from loom kv (or `ctx.backpressure()`) sends the call back to the queue
  without using up an attempt and signals the function's downstreams to the
  scheduler's AIMD controllers; `NonRetryable` dead-letters at once; any other
  exception fails the attempt (retried with backoff and full jitter).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec

from loom.core.errors import LoomError, Throttled
from loom.functions import protocol, registry
from loom.functions.app import App, Context, Function
from loom.functions.errors import NonRetryable
from loom.functions.protocol import Finished, Pull, Report, Signal, Work
from loom.functions.queue import (
    CallRecord,
    DurableQueue,
    Failed,
    NotStarted,
    Outcome,
    Succeeded,
    WasThrottled,
    partition_of,
)
from loom.runtime.rpc import RpcClient

log = logging.getLogger("loom.worker")
PULL_WAIT_MS = 1_000
DISCOVER_S = 1.0
HEARTBEAT_S = 5.0
FLUSH_S = 0.003
THROTTLED_RETRY_MS_MIN = 100
RPC_TIMEOUT_S = 10.0
MEMBER_TTL_S = 5.0
THROTTLE_WATCH_S = 0.2
PULLS_PER_SCHEDULER = 2
# Calls fetched beyond `concurrency`, as a multiple of it, while calls are short.
PREFETCH = 2
PREFETCH_CALL_MS_MAX = 100.0
# A pull waits this long for more slots to free before it asks for fewer.
GATHER_S = 0.002
# A call starts at most this long after the pull that fetched it was sent, or goes back
# to the queue unstarted, without using an attempt: a worker stalled (paused, or its
# slots busy) must not start a call whose lease — the function's timeout + 5 s
# (`scheduler.LEASE_SLACK_MS`), counted from the claim, after the pull was sent — may
# end before the call does.
START_WITHIN_S = 3.0


def capacity_for(concurrency: int, call_ms: float | None, *, limited: bool) -> int:
    """How many calls the worker holds (running or waiting for a slot): prefetch only
    once calls are known to be short, and never for an app with a limited function
    (a rate, a concurrency limit, a downstream): calls claimed at the limit's pace
    must also start at it, not bunched after a wait for a slot."""
    if limited or call_ms is None or call_ms > PREFETCH_CALL_MS_MAX:
        return concurrency
    return concurrency * (1 + PREFETCH)


@dataclass(slots=True)
class Pending:
    """Outcomes recorded in the store, waiting to be reported to their scheduler."""

    finished: list[Finished] = field(default_factory=list)
    signals: list[Signal] = field(default_factory=list)


class Worker:
    def __init__(self, app: App, *, concurrency: int = 16, name: str | None = None) -> None:
        if not 1 <= concurrency <= 10_000:
            raise ValueError("concurrency must be 1..10000")
        self.app = app
        self.name = name or f"worker-{secrets.token_hex(4)}"
        self.concurrency = concurrency
        self.capacity = concurrency  # calls held: running, or fetched and waiting
        self.free = concurrency  # of the capacity, not reserved by a pull nor held
        self.freed = asyncio.Event()
        self.slots = asyncio.Semaphore(concurrency)  # calls running at once
        self.call_ms: float | None = None  # a moving average of call durations
        self.limited = any(
            f.rate_limit_per_s is not None or f.concurrency_max is not None or f.downstream
            for f in app.functions.values()
        )
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fn")
        self.running: dict[str, tuple[int, str]] = {}  # call id → (attempt, scheduler)
        self.tasks: set[asyncio.Task[None]] = set()
        self.schedulers: dict[str, RpcClient] = {}
        self.connecting: dict[str, asyncio.Lock] = {}
        self.pullers: dict[str, asyncio.Task[None]] = {}
        self.members = registry.Liveness(ttl_s=MEMBER_TTL_S)
        self.outbox: list[tuple[CallRecord, Outcome, int, list[str]]] = []
        self.outbox_ready = asyncio.Event()
        self.rng = random.Random()
        self.completed = 0
        self.failed = 0
        self.throttled = 0
        self.returned = 0  # fetched calls handed back unstarted

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; then finishes the calls it runs."""
        queue = await self.app.queue()
        await registry.publish_configs(
            await self.app.client(), [f.config() for f in self.app.functions.values()]
        )
        flusher = asyncio.create_task(self._flush_loop(queue))
        beats = asyncio.create_task(self._heartbeat_loop())
        watcher = asyncio.create_task(self._throttle_watch())
        try:
            while not stop.is_set():
                with contextlib.suppress(LoomError):
                    await self._discover(stop)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DISCOVER_S):  # not wait_for: see _scan_loop
                        await stop.wait()
        finally:
            for puller in self.pullers.values():
                puller.cancel()
            await asyncio.gather(*self.pullers.values(), return_exceptions=True)
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            self.outbox_ready.set()
            await asyncio.sleep(FLUSH_S * 2)
            for task in (flusher, beats, watcher):
                task.cancel()
            await asyncio.gather(flusher, beats, watcher, return_exceptions=True)
            await self._flush(queue)
            for client in self.schedulers.values():
                await client.close()
            self.pool.shutdown(wait=False, cancel_futures=True)

    async def _discover(self, stop: asyncio.Event) -> None:
        """Pulls from every live scheduler; a silent one's record may linger in the
        store (a killed scheduler cannot remove it), so liveness is its beat moving."""
        for member in await registry.read_members(await self.app.client()):
            self.members.observe(member.name, member.beat)
            puller = self.pullers.get(member.name)
            if not self.members.alive(member.name):
                if puller is not None:
                    puller.cancel()
                continue
            if puller is None or puller.done():
                address = (member.host, member.port)
                self.pullers[member.name] = asyncio.create_task(
                    self._pull_loop(member.name, address, stop)
                )

    async def _connection(self, scheduler: str, address: tuple[str, int]) -> RpcClient:
        """One connection per scheduler, shared by its pull streams."""
        async with self.connecting.setdefault(scheduler, asyncio.Lock()):
            client = self.schedulers.get(scheduler)
            if client is None:
                client = await RpcClient.connect(*address, tls=self.app.tls)
                self.schedulers[scheduler] = client
            return client

    async def _pull_loop(
        self, scheduler: str, address: tuple[str, int], stop: asyncio.Event
    ) -> None:
        await asyncio.gather(
            *(self._pull_stream(scheduler, address, stop) for _ in range(PULLS_PER_SCHEDULER))
        )

    async def _pull_stream(
        self, scheduler: str, address: tuple[str, int], stop: asyncio.Event
    ) -> None:
        functions = tuple(self.app.functions)
        failures = 0
        while not stop.is_set():
            slots = await self._reserve()
            sent = time.monotonic()  # the calls this pull brings are claimed after this
            client = None
            try:
                client = await self._connection(scheduler, address)
                pull = Pull(
                    worker=self.name,
                    app=self.app.name,
                    functions=functions,
                    slots=slots,
                    wait_ms=PULL_WAIT_MS,
                )
                reply = protocol.decode(
                    await client.call(
                        protocol.encode(pull), timeout_s=PULL_WAIT_MS / 1000 + RPC_TIMEOUT_S
                    )
                )
            except asyncio.CancelledError:
                self._release(slots)  # or the worker's capacity shrinks for good
                raise
            except LoomError as error:
                self._release(slots)
                if client is not None and self.schedulers.get(scheduler) is client:
                    del self.schedulers[scheduler]  # the other stream reconnects, not closes
                    await client.close()
                failures += 1
                if failures >= 5:
                    log.info("scheduler %s unreachable (%s); rediscovering", scheduler, error)
                    return
                await asyncio.sleep(min(1.0, 0.05 * 2**failures))
                continue
            failures = 0
            if not isinstance(reply, Work):
                self._release(slots)
                continue
            self._release(slots - len(reply.batches))
            for batch in reply.batches:
                self._start(list(batch), scheduler, sent)

    async def _reserve(self) -> int:
        """Waits for free capacity, then takes a fair part of it for one pull (waiting
        a moment for more to free, so pulls do not shrink to one call each)."""
        share = max(1, self.capacity // (PULLS_PER_SCHEDULER * max(1, len(self.pullers))))
        await self._until_free()
        if self.free < share:
            self.freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GATHER_S):  # not wait_for: see Scheduler._scan_loop
                    await self.freed.wait()
            await self._until_free()  # another stream may have taken it meanwhile
        slots = min(self.free, share)
        self.free -= slots
        return slots

    async def _until_free(self) -> None:
        while self.free <= 0:
            self.freed.clear()
            await self.freed.wait()

    def _release(self, slots: int) -> None:
        if slots > 0:
            self.free += slots
            self.freed.set()

    def _observe(self, duration_ms: float) -> None:
        """Averages call durations and resizes the capacity to match."""
        average = self.call_ms
        self.call_ms = duration_ms if average is None else average + 0.1 * (duration_ms - average)
        capacity = capacity_for(self.concurrency, self.call_ms, limited=self.limited)
        if capacity != self.capacity:
            self.free += capacity - self.capacity  # below zero: pulls wait until it is back
            self.capacity = capacity
            self.freed.set()

    def _start(self, batch: list[CallRecord], scheduler: str, pulled: float) -> None:
        for record in batch:
            self.running[record.call_id] = (record.attempt, scheduler)
        task = asyncio.create_task(self._run(batch, pulled))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, batch: list[CallRecord], pulled: float) -> None:
        """Runs one call (or batch) once a running slot is free. One that cannot start
        soon after the pull that fetched it was sent (`pulled`; it was claimed after
        that) goes back to the queue unstarted: its lease may be near its end."""
        function = self.app.functions.get(batch[0].function)
        ctx: Context | None = None
        try:
            async with self.slots:
                started = time.monotonic()
                if started - pulled > START_WITHIN_S:
                    outcomes: list[Outcome] = [NotStarted(r.call_id, r.attempt) for r in batch]
                    self.returned += len(batch)
                else:
                    ctx, outcomes = await self._attempt(function, batch)
                    self._observe((time.monotonic() - started) * 1000)
        finally:
            self._release(1)
        duration_ms = int((time.monotonic() - started) * 1000)
        signals = list(ctx.signals) if ctx is not None else []
        for record, outcome in zip(batch, outcomes, strict=True):
            self.outbox.append((record, outcome, duration_ms, signals))
            signals = []
        self.outbox_ready.set()

    async def _attempt(
        self, function: Function | None, batch: list[CallRecord]
    ) -> tuple[Context | None, list[Outcome]]:
        """Runs the function; its outcome for each call of the batch."""
        ctx: Context | None = None
        try:
            if function is None:
                raise NonRetryable(f"this worker's app has no function {batch[0].function!r}")
            ctx = Context(
                call_id=batch[0].call_id,
                attempt=batch[0].attempt,
                idempotency_key=batch[0].idempotency_key,
                kv=await self.app.functions_client(),
                downstream=function.downstream,
                batch=tuple(r.call_id for r in batch) if function.batch else (),
            )
            results = await self._invoke(function, ctx, batch)
        except Throttled as error:
            retry_ms = max(THROTTLED_RETRY_MS_MIN, error.retry_after_ms or 0)
            if ctx is not None:
                ctx.backpressure()
            self.throttled += len(batch)
            return ctx, [WasThrottled(r.call_id, r.attempt, retry_ms) for r in batch]
        except Exception as error:  # noqa: BLE001 - a function's failure is data
            text = f"{type(error).__name__}: {error}"[:2000]
            retryable = not isinstance(error, NonRetryable)
            self.failed += len(batch)
            return ctx, [Failed(r.call_id, r.attempt, text, retryable) for r in batch]
        self.completed += len(batch)
        return ctx, [
            Succeeded(r.call_id, r.attempt, msgspec.msgpack.encode(v))
            for r, v in zip(batch, results, strict=True)
        ]

    async def _invoke(
        self, function: Function, ctx: Context, batch: list[CallRecord]
    ) -> Sequence[object]:
        decoded = [msgspec.msgpack.decode(r.args) for r in batch]
        async with asyncio.timeout(function.timeout_s):
            if function.batch is not None:
                items = [args[0] for args, _ in decoded]
                results = await self._call(function, ctx, (items,), {})
                if results is None:
                    return [None] * len(batch)
                if not isinstance(results, list) or len(results) != len(batch):
                    raise TypeError(
                        f"batched {function.name} must return a list of {len(batch)} results"
                    )
                return results
            args, kwargs = decoded[0]
            return [await self._call(function, ctx, args, kwargs)]

    async def _call(
        self, function: Function, ctx: Context, args: Sequence[object], kwargs: dict[str, object]
    ) -> object:
        if function.is_async:
            return await function.fn(ctx, *args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: function.fn(ctx, *args, **kwargs))

    # ---------------------------------------------------------------- outcomes

    async def _flush_loop(self, queue: DurableQueue) -> None:
        while True:
            await self.outbox_ready.wait()
            await asyncio.sleep(FLUSH_S)  # let the outcomes of a few ms gather
            self.outbox_ready.clear()
            await self._flush(queue)

    async def _flush(self, queue: DurableQueue) -> None:
        """Records outcomes in the store (one transaction per partition), then tells
        the schedulers. An outcome the store cannot take now is left to the lease: the
        scheduler reclaims the call and it runs again (at-least-once)."""
        outbox, self.outbox = self.outbox, []
        if not outbox:
            return
        by_partition: dict[int, list[tuple[CallRecord, Outcome, int, list[str]]]] = {}
        for entry in outbox:
            by_partition.setdefault(partition_of(entry[0].call_id), []).append(entry)
        reports: dict[str, Pending] = {}

        async def record(
            partition: int, entries: list[tuple[CallRecord, Outcome, int, list[str]]]
        ) -> None:
            for start in range(0, len(entries), 100):
                chunk = entries[start : start + 100]
                recorded = True
                try:
                    await queue.finish_many(
                        partition,
                        [e[1] for e in chunk],
                        now_ms=int(time.time() * 1000),
                        jitter=self.rng.random,
                    )
                except LoomError as error:
                    # Not (known to be) recorded: the scheduler must not hear "finished",
                    # so it reclaims the calls when their leases end (at-least-once).
                    log.warning(
                        "recording %d outcomes in partition %d: %s", len(chunk), partition, error
                    )
                    recorded = False
                for call_record, _, duration_ms, signals in chunk:
                    _, scheduler = self.running.pop(call_record.call_id, (0, ""))
                    pending = reports.setdefault(scheduler, Pending())
                    if recorded:
                        pending.finished.append(
                            Finished(call_record.call_id, call_record.attempt, duration_ms)
                        )
                    pending.signals += [Signal(d, "throttled") for d in signals]

        await asyncio.gather(*(record(p, entries) for p, entries in by_partition.items()))
        await asyncio.gather(*(self._report(name, pending) for name, pending in reports.items()))

    async def _report(self, scheduler: str, pending: Pending) -> None:
        client = self.schedulers.get(scheduler)
        if client is None:
            return
        report = Report(
            worker=self.name, finished=tuple(pending.finished), signals=tuple(pending.signals)
        )
        with contextlib.suppress(LoomError):
            await client.call(protocol.encode(report), timeout_s=RPC_TIMEOUT_S)

    async def _throttle_watch(self) -> None:
        """Requests of the functions that a keyspace throttled — even ones a retry then
        got through — signal `kv:{keyspace}` to every scheduler: the platform, not
        each call, should slow down."""
        client = await self.app.functions_client()
        declared = {d for f in self.app.functions.values() for d in f.downstream}
        seen = collections.Counter(client.throttled_requests)
        while True:
            await asyncio.sleep(THROTTLE_WATCH_S)
            now = collections.Counter(client.throttled_requests)
            signals = tuple(
                Signal(f"kv:{keyspace}", "throttled")
                for keyspace in (now - seen)
                if f"kv:{keyspace}" in declared
            )
            seen = now
            if signals:
                report = protocol.encode(Report(worker=self.name, signals=signals))
                for scheduler in list(self.schedulers.values()):
                    with contextlib.suppress(LoomError):
                        await scheduler.call(report, timeout_s=RPC_TIMEOUT_S)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            running = tuple((call_id, attempt) for call_id, (attempt, _) in self.running.items())
            if not running:
                continue
            report = protocol.encode(Report(worker=self.name, running=running))
            for client in list(self.schedulers.values()):
                with contextlib.suppress(LoomError):
                    await client.call(report, timeout_s=RPC_TIMEOUT_S)
