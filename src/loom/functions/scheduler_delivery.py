"""Delivering work to workers (DESIGN §8): a `Pull` waits for work; the calls a
dispatch pass picked for it are claimed in the store and handed over.

Rules:
- A pull waits (long poll) until a pass picks calls for it or its `wait_ms` ends; a
  pull whose calls were picked waits for their claims, however long they take.
- A worker gone while it waits leaves no waiter behind: one would take calls nobody
  runs, each losing an attempt to its lease.
- Picked calls are claimed in one transaction per partition (in pages, at most
  `CLAIMS_IN_FLIGHT_MAX` partitions' claims at once), fenced by the partition's lease;
  a call not claimed is no longer in flight; a worker is sent only calls claimed.
- A claim whose outcome is unknown is found out later: what this scheduler did claim
  is watched again (`_adopt`), so its lease can end and it is reclaimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from loom.core.errors import LoomError
from loom.functions.protocol import Pull, Work
from loom.functions.queue import CallRecord, CallState, DurableQueue, LeaseHold, LeaseLost
from loom.functions.scheduler_dispatch import Dispatcher
from loom.functions.scheduler_ownership import Ownership
from loom.functions.scheduler_state import RECLAIM_RETRY_S, CallBook, Inflight, Waiter

log = logging.getLogger("loom.scheduler")

CLAIMS_IN_FLIGHT_MAX = 32
ADOPT_TRIES = 30


class Delivery:
    """Answers the workers' pulls, and claims and delivers what the passes picked."""

    def __init__(
        self,
        *,
        name: str,
        book: CallBook,
        dispatcher: Dispatcher,
        ownership: Ownership,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        dispatch: Callable[[], None],
    ) -> None:
        self.name = name
        self.book = book
        self.dispatcher = dispatcher
        self.ownership = ownership
        self.spawn = spawn
        self.dispatch = dispatch  # one pass for the waiters, its claims in the background
        self.claims = asyncio.Semaphore(CLAIMS_IN_FLIGHT_MAX)

    async def on_pull(self, pull: Pull) -> Work:
        future: asyncio.Future[Work] = asyncio.get_running_loop().create_future()
        waiter = Waiter(pull, future, pull.slots)
        self.dispatcher.waiters.append(waiter)
        self.dispatch()
        try:
            async with asyncio.timeout(pull.wait_ms / 1000):
                return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The worker is gone (its connection closed): a waiter left behind would
            # take calls that nobody runs, each losing an attempt to its lease.
            if not waiter.batches:
                with contextlib.suppress(ValueError):
                    self.dispatcher.waiters.remove(waiter)
            raise
        except TimeoutError:
            if future.done():
                return future.result()
            if waiter.batches:  # picked in a pass whose claims are in flight
                return await future
            with contextlib.suppress(ValueError):
                self.dispatcher.waiters.remove(waiter)
            return Work(scheduler=self.name)

    async def claim_and_deliver(
        self, queue: DurableQueue, waiters: list[Waiter], now_ms: int
    ) -> None:
        wanted: dict[int, list[tuple[str, int]]] = {}
        for waiter in waiters:
            for batch in waiter.batches:
                for partition, call in batch:
                    key = self.book.where.get(call.call_id)
                    inflight = self.book.functions[key].inflight.get(call.call_id) if key else None
                    if inflight is not None:  # else forgotten meanwhile (partition lost)
                        wanted.setdefault(partition, []).append((call.call_id, inflight.lease_ms))
        claimed: dict[str, CallRecord] = {}

        async def claim(partition: int, calls: list[tuple[str, int]]) -> None:
            view = self.ownership.partitions.get(partition)
            if view is None:
                return
            async with self.claims:
                for start in range(0, len(calls), 100):
                    try:
                        done = await queue.claim_many(
                            view.hold,
                            calls[start : start + 100],
                            scheduler=self.name,
                            now_ms=now_ms,
                        )
                    except LeaseLost:
                        self.ownership.lose(queue, partition)
                        return
                    except LoomError as error:
                        # Perhaps applied (a lost answer): find out later, and keep
                        # whatever was claimed under watch so its lease can end.
                        log.warning("claim in partition %d: %s", partition, error)
                        self.spawn(self._adopt(queue, view.hold, [c for c, _ in calls[start:]]))
                        return
                    claimed.update((r.call_id, r) for r in done if isinstance(r, CallRecord))

        await asyncio.gather(*(claim(p, calls) for p, calls in wanted.items()))
        now = time.monotonic()
        for waiter in waiters:
            batches = []
            for batch in waiter.batches:
                records = []
                for _, call in batch:
                    self.book.claiming.discard(call.call_id)
                    key = self.book.where.get(call.call_id)
                    owner = self.book.functions.get(key) if key else None
                    record = claimed.get(call.call_id)
                    if owner is None:
                        continue
                    state = owner
                    if record is None:
                        state.inflight.pop(call.call_id, None)
                        self.book.where.pop(call.call_id, None)
                        continue
                    inflight = state.inflight.get(call.call_id)
                    if inflight is not None:
                        inflight.attempt, inflight.seen = record.attempt, now
                    state.dispatched += 1
                    records.append(record)
                if records:
                    batches.append(tuple(records))
            self.book.stats["claimed"] += sum(len(b) for b in batches)
            if not waiter.future.done():
                waiter.future.set_result(Work(scheduler=self.name, batches=tuple(batches)))
            # A worker gone meanwhile: its calls are reclaimed when their leases end.

    async def _adopt(self, queue: DurableQueue, hold: LeaseHold, call_ids: list[str]) -> None:
        """After a claim whose outcome is unknown: each call this scheduler did claim
        (RUNNING under its name) is tracked again, so it is reclaimed when its lease
        ends; no worker got it."""
        for _ in range(ADOPT_TRIES):
            await asyncio.sleep(RECLAIM_RETRY_S)
            if hold.partition not in self.ownership.partitions:
                return  # the next owner inherits the partition's running calls
            try:
                records = [await queue.get(call_id) for call_id in call_ids]
            except LoomError:
                continue
            now = time.monotonic()
            for record in records:
                if record is None or record.state is not CallState.RUNNING:
                    continue
                if record.scheduler != self.name or record.call_id in self.book.where:
                    continue
                state = self.book.function(record.app, record.function)
                state.inflight[record.call_id] = Inflight(
                    hold.partition, record.attempt, now, record.lease_ms
                )
                self.book.where[record.call_id] = (record.app, record.function)
            return
