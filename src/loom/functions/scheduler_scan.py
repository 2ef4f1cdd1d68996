"""Scanning the held partitions' due indexes for candidates, and ending the calls whose
time is up: late ones expire, silent ones are reclaimed (DESIGN §8).

Rules:
- A partition is scanned when due, backing off while it is idle; while it still has
  plenty of candidates, only now and then (to see other functions' calls and new
  earlier ones).
- A scan replaces the partition's candidates; it never lists a call being claimed or
  in flight, and a scan that ends after the partition was lost changes nothing.
- One scan of the whole due index when it fits a page; else one per function, so no
  backlog hides another's calls.
- A candidate past its deadline expires instead of running.
- A claimed call is the scheduler's until the worker reports it finished; the
  worker's heartbeats keep it; if neither comes within the call's lease (on this
  scheduler's clock), the call is reclaimed: at-least-once. A reclaim the store did
  not take is tried again soon, or the call would stay RUNNING.
- Expiring and reclaiming are fenced by the partition's lease, like every write.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from loom.core.errors import LoomError
from loom.functions.queue import (
    DueCall,
    DurableQueue,
    LeaseHold,
    LeaseLost,
    StaleAttempt,
    decode_due,
)
from loom.functions.scheduler_ownership import Ownership
from loom.functions.scheduler_state import (
    RECLAIM_RETRY_S,
    SCAN_BUSY_S,
    CallBook,
    Inflight,
    PartitionView,
)

log = logging.getLogger("loom.scheduler")

SCAN_IDLE_MAX_S = 0.2
DUE_PAGE = 300
CANDIDATES_LOW = 100


class Scanner:
    """Finds the held partitions' due calls, and ends the calls whose time is up."""

    def __init__(
        self,
        *,
        book: CallBook,
        ownership: Ownership,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        bugs: frozenset[str],
    ) -> None:
        self.book = book
        self.ownership = ownership
        self.spawn = spawn
        self.bugs = bugs

    def should_scan(self, view: PartitionView, now: float) -> bool:
        """When due; while the partition still has plenty of candidates, only now and
        then (to see other functions' calls and new earlier ones)."""
        if view.scan_after > now:
            return False
        partition = view.hold.partition
        known = sum(len(s.candidates.get(partition, ())) for s in self.book.functions.values())
        return known < CANDIDATES_LOW or now - view.scanned_at >= SCAN_IDLE_MAX_S

    async def scan(self, queue: DurableQueue, view: PartitionView) -> None:
        """Refreshes the partition's candidates: one scan of its whole due index when
        that fits a page; else one per function, so no backlog hides another's calls."""
        partition = view.hold.partition
        now_ms = int(time.time() * 1000)
        prefix = b"q/%d/due/" % partition
        found: dict[tuple[str, str], list[DueCall]] = {}
        try:
            page = await queue.ks.scan(shard_key=b"q/%d" % partition, prefix=prefix, limit=DUE_PAGE)
            for item in page.items:
                app, function, stamp, call_id = item.key[len(prefix) :].decode().split("/")
                if int(stamp, 16) <= now_ms:
                    deadline_ms = decode_due(item.value).deadline_ms
                    found.setdefault((app, function), []).append(
                        DueCall(call_id, int(stamp, 16), deadline_ms)
                    )
            if page.cursor is not None:
                found = {}
                for key, state in list(self.book.functions.items()):
                    if state.config is not None:
                        found[key] = await queue.due(partition, *key, now_ms, limit=DUE_PAGE)
        except LoomError as error:
            log.debug("scan of partition %d: %s", partition, error)
            view.scan_after = time.monotonic() + SCAN_IDLE_MAX_S
            return
        if partition not in self.ownership.partitions:
            return  # lost meanwhile
        total = 0
        for key, state in self.book.functions.items():
            calls = [
                c
                for c in found.pop(key, [])
                if c.call_id not in self.book.claiming and c.call_id not in state.inflight
            ]
            state.candidates[partition] = deque(calls)
            total += len(calls)
        for key, calls in found.items():  # calls of a function no worker registered yet
            state = self.book.function(*key)
            state.candidates[partition] = deque(calls)
        self._expire_late(queue, view.hold, now_ms)
        view.idle_s = SCAN_BUSY_S if total else min(SCAN_IDLE_MAX_S, view.idle_s * 2)
        view.scanned_at = time.monotonic()
        view.scan_after = view.scanned_at + view.idle_s

    def _expire_late(self, queue: DurableQueue, hold: LeaseHold, now_ms: int) -> None:
        for state in self.book.functions.values():
            calls = state.candidates.get(hold.partition)
            if not calls:
                continue
            late = [c for c in calls if c.deadline_ms is not None and c.deadline_ms < now_ms]
            for call in late:
                calls.remove(call)
                self.spawn(self._expire(queue, hold, call.call_id, now_ms))

    async def _expire(
        self, queue: DurableQueue, hold: LeaseHold, call_id: str, now_ms: int
    ) -> None:
        with contextlib.suppress(StaleAttempt, LeaseLost, LoomError):
            await queue.expire(hold, call_id, now_ms=now_ms)
            self.book.stats["expired"] += 1

    def reclaim_silent(self, queue: DurableQueue) -> None:
        now = time.monotonic()
        for state in self.book.functions.values():
            for call_id, inflight in list(state.inflight.items()):
                lease_s = inflight.lease_ms / 1000
                if "reclaim-early" in self.bugs:
                    lease_s /= 4
                if inflight.attempt and now > inflight.seen + lease_s:
                    view = self.ownership.partitions.get(inflight.partition)
                    del state.inflight[call_id]
                    key = self.book.where.pop(call_id, None)
                    if view is not None and key is not None:
                        self.spawn(self._reclaim(queue, view.hold, key, call_id, inflight))

    async def _reclaim(
        self,
        queue: DurableQueue,
        hold: LeaseHold,
        key: tuple[str, str],
        call_id: str,
        inflight: Inflight,
    ) -> None:
        now_ms = int(time.time() * 1000)
        try:
            await queue.reclaim(hold, call_id, attempt=inflight.attempt, now_ms=now_ms)
        except (StaleAttempt, LeaseLost):
            return  # finished meanwhile, or no longer ours to reclaim
        except LoomError as error:
            # The store did not take it: try again soon, or the call stays RUNNING.
            log.info("reclaiming call %s: %s; trying again", call_id, error)
            state = self.book.functions.get(key)
            if (
                hold.partition in self.ownership.partitions
                and state
                and call_id not in state.inflight
            ):
                inflight.seen = time.monotonic() - inflight.lease_ms / 1000 + RECLAIM_RETRY_S
                state.inflight[call_id] = inflight
                self.book.where[call_id] = key
            return
        self.book.stats["reclaimed"] += 1
        log.info("reclaimed call %s after its lease ended (attempt %d)", call_id, inflight.attempt)
