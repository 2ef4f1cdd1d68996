"""A scheduler's ownership of DurableQ partitions, by leases in the store (DESIGN §8).

Rules:
- Each scheduler takes about P / (live schedulers) partitions; live schedulers are
  those whose beats in the registry moved within `MEMBER_TTL_S` on this process's
  monotonic clock, and one silent for `MEMBER_FORGET_S` is taken out of the registry.
- A free partition is taken at once; a held one only after its lease record has not
  moved for a lease period on this process's monotonic clock (never by comparing
  wall clocks).
- A holder counts a partition valid for `LEASE_MARGIN` of a lease period from when it
  sent the acquire or renewal that succeeded, and drops it at the first round after
  that (rounds come every quarter lease period): before anyone else may take it.
- A partition taken brings its predecessor's running calls under watch (their leases
  end on this clock); one released or lost takes its candidates and calls in flight
  out of the book. Either way the functions' allotments follow (`reallot`).
- Every write a scheduler makes to a partition checks the partition's lease record
  in the same transaction, so a paused scheduler that wakes after losing a partition
  changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from loom import kv
from loom.core.errors import LoomError
from loom.functions import registry
from loom.functions.queue import DurableQueue, LeaseLost, PartitionLease
from loom.functions.registry import Liveness, SchedulerMember
from loom.functions.scheduler_state import CallBook, Inflight, PartitionView

log = logging.getLogger("loom.scheduler")

# A holder stops using a partition this long before others may take it.
LEASE_MARGIN = 0.75
MEMBER_TTL_S = 3.0
MEMBER_FORGET_S = 60.0


class Ownership:
    """The partitions one scheduler holds, and its view of the others' leases."""

    def __init__(
        self,
        *,
        client: kv.Client,
        name: str,
        lease_s: float,
        book: CallBook,
        member: Callable[[int], SchedulerMember],
    ) -> None:
        self.client = client
        self.name = name
        self.lease_s = lease_s
        self.book = book
        self.member = member  # this scheduler's registry entry at a beat
        self.partitions: dict[int, PartitionView] = {}
        self.lease_seen = Liveness(ttl_s=lease_s)
        self.members = Liveness(ttl_s=MEMBER_TTL_S)
        self.live_members = 1
        self.beats = 0

    async def loop(self, queue: DurableQueue) -> None:
        while True:
            try:
                await self._round(queue)
            except LoomError as error:
                log.warning("ownership round: %s", error)
            self._drop_expired_holds(queue)
            await asyncio.sleep(self.lease_s / 4)

    async def _round(self, queue: DurableQueue) -> None:
        self.beats += 1
        await registry.beat(self.client, self.member(self.beats))
        for other in await registry.read_members(self.client):
            self.members.observe(other.name, other.beat)
            if self.members.silent_for(other.name) > MEMBER_FORGET_S:
                await registry.leave(self.client, other.name)  # killed: never left itself
        alive = [name for name in self.members.seen if self.members.alive(name)]
        self.live_members = max(1, len(alive))
        target = math.ceil(queue.partitions / self.live_members)

        leases = await asyncio.gather(*(queue.lease(p) for p in range(queue.partitions)))
        for partition, lease in enumerate(leases):
            self.lease_seen.observe(str(partition), (lease.owner, lease.token, lease.beat))
        await asyncio.gather(*(self._renew(queue, view) for view in list(self.partitions.values())))

        for partition, lease in enumerate(leases):
            if len(self.partitions) >= target:
                break
            if partition in self.partitions or not self._takeable(partition, lease):
                continue
            await self._acquire(queue, partition, lease)
        extra = len(self.partitions) - target
        if extra > 0 and self.live_members > 1:
            for partition in sorted(self.partitions, reverse=True)[:extra]:
                view = self.partitions.pop(partition)
                self._forget(queue, partition)
                with contextlib.suppress(LoomError):
                    await queue.release(view.hold)
                log.info("released partition %d (%d schedulers)", partition, self.live_members)

    def _takeable(self, partition: int, lease: PartitionLease) -> bool:
        if lease.owner is None:
            return True
        return self.lease_seen.silent_for(str(partition)) >= self.lease_s

    async def _acquire(self, queue: DurableQueue, partition: int, lease: PartitionLease) -> None:
        sent = time.monotonic()
        try:
            hold = await queue.acquire(partition, self.name, lease)
            running = await queue.running(partition)
        except LoomError as error:
            log.info("partition %d not taken: %s", partition, error)
            return
        now = time.monotonic()
        for call in running:  # a predecessor's calls: count them, reclaim them if silent
            state = self.book.function(call.entry.app, call.entry.function)
            state.inflight[call.call_id] = Inflight(
                partition, call.entry.attempt, now, call.entry.lease_ms
            )
            self.book.where[call.call_id] = (call.entry.app, call.entry.function)
        self.partitions[partition] = PartitionView(hold, sent + self.lease_s * LEASE_MARGIN)
        self._reallot(queue)
        log.info("took partition %d (token %d, %d running)", partition, hold.token, len(running))

    async def _renew(self, queue: DurableQueue, view: PartitionView) -> None:
        sent = time.monotonic()
        try:
            view.hold = await queue.renew(view.hold)
        except LeaseLost:
            self.lose(queue, view.hold.partition)
            return
        except LoomError:
            return  # kept until valid_until; every write is fenced anyway
        view.valid_until = sent + self.lease_s * LEASE_MARGIN

    def _drop_expired_holds(self, queue: DurableQueue) -> None:
        now = time.monotonic()
        for partition, view in list(self.partitions.items()):
            if now > view.valid_until:
                self.lose(queue, partition)

    def lose(self, queue: DurableQueue, partition: int) -> None:
        """The partition's lease is gone (a write found it taken, or it ran out)."""
        if self.partitions.pop(partition, None) is not None:
            self.book.stats["lease_lost"] += 1
            log.warning("lost partition %d", partition)
            self._forget(queue, partition)

    def _forget(self, queue: DurableQueue, partition: int) -> None:
        self.book.forget(partition)
        self._reallot(queue)

    def _reallot(self, queue: DurableQueue) -> None:
        self.book.reallot(self.partitions, queue.partitions, time.monotonic())
