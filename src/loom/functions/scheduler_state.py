"""What a scheduler knows of the calls it dispatches (DESIGN §8): per function, its
candidates (due calls its scans found), its calls in flight and its allotment of the
function's limits; per declared downstream, its AIMD rate and bucket; per partition
it holds, the view of its lease; per waiting worker, what a dispatch pass picked.

Rules:
- No IO and no clock here: time arrives as `now` (seconds on this process's monotonic
  clock) or `now_ms` (wall-clock milliseconds, the unit of due times and deadlines).
- A call in flight is tracked in its function's `inflight` and in `where` together,
  from the pass that picks it until its claim fails, its worker reports it finished,
  its lease ends or its partition is no longer held; `claiming` holds it only while its claim is in
  flight.
- A function's allotment of its limits follows the partitions held: `reallot` after
  every change of them and of the configs.
- A worker's report (`settle`) ends or refreshes a call in flight only if it names
  the attempt tracked here; a slow call, or a worker's overload signal, cuts its
  downstreams' AIMD rates (at most once per cooldown).
- A call's lease is its timeout plus slack, or for long calls that send heartbeats a
  fixed period (`call_lease_ms`).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from loom.functions.limits import (
    Aimd,
    AimdSettings,
    Allotment,
    LatencyWatch,
    TokenBucket,
)
from loom.functions.protocol import Pull, Report, Work
from loom.functions.queue import DueCall, LeaseHold
from loom.functions.registry import FunctionConfig

SCAN_BUSY_S = 0.01
# A call's lease: its timeout plus slack, or with heartbeats for long calls, this.
LEASE_SLACK_MS = 5_000
HEARTBEAT_LEASE_MS = 30_000
USED_WINDOW_S = 2.0
# A reclaim the store did not take, or a claim of unknown outcome, is looked at again
# after this long.
RECLAIM_RETRY_S = 1.0


def call_lease_ms(config: FunctionConfig) -> int:
    return min(int(config.timeout_s * 1000), HEARTBEAT_LEASE_MS) + LEASE_SLACK_MS


@dataclass(slots=True)
class Inflight:
    partition: int
    attempt: int  # 0 while the claim is in flight
    seen: float  # monotonic time of the claim or of the last heartbeat
    lease_ms: int


@dataclass(slots=True)
class FunctionState:
    config: FunctionConfig | None  # None: running calls inherited, config not yet read
    allotment: Allotment = Allotment(rate_per_s=None, burst=0.0, concurrency=None)
    bucket: TokenBucket | None = None
    candidates: dict[int, deque[DueCall]] = field(default_factory=dict)
    inflight: dict[str, Inflight] = field(default_factory=dict)
    waiting_since: float | None = None
    dispatched: int = 0
    finished: int = 0  # reported finished by workers (any outcome)
    latency: LatencyWatch = field(default_factory=LatencyWatch)

    def candidate_count(self) -> int:
        return sum(len(c) for c in self.candidates.values())

    def room(self, now: float) -> int:
        room = math.inf
        if self.bucket is not None:
            room = min(room, self.bucket.available(now))
        if self.allotment.concurrency is not None:
            room = min(room, self.allotment.concurrency - len(self.inflight))
        return max(0, int(min(room, 1_000_000)))


@dataclass(slots=True)
class Downstream:
    aimd: Aimd
    bucket: TokenBucket
    # Calls dispatched, and an average of the rate they went out at (for the AIMD's
    # ceiling: twice what is used).
    dispatched: int = 0
    counted_at: float = 0.0
    counted: int = 0
    used_per_s: float = 0.0

    def used(self, now: float) -> float:
        if now - self.counted_at >= USED_WINDOW_S:
            rate = (self.dispatched - self.counted) / (now - self.counted_at)
            self.used_per_s = rate if self.counted_at else 0.0
            self.counted, self.counted_at = self.dispatched, now
        return self.used_per_s


@dataclass(slots=True)
class Waiter:
    pull: Pull
    future: asyncio.Future[Work]
    slots: int
    batches: list[list[tuple[int, DueCall]]] = field(default_factory=list)
    functions: list[FunctionState] = field(default_factory=list)


@dataclass(slots=True)
class PartitionView:
    hold: LeaseHold
    valid_until: float
    scan_after: float = 0.0
    scanned_at: float = 0.0
    idle_s: float = SCAN_BUSY_S


class CallBook:
    """The functions a scheduler knows, their downstreams, its calls in flight, and
    counts of what became of its calls and partitions (`stats`)."""

    def __init__(self, aimd_settings: AimdSettings) -> None:
        self.aimd_settings = aimd_settings
        self.functions: dict[tuple[str, str], FunctionState] = {}
        self.downstreams: dict[str, Downstream] = {}
        self.where: dict[str, tuple[str, str]] = {}  # call id → its function
        self.claiming: set[str] = set()
        self.stats = {"claimed": 0, "reclaimed": 0, "expired": 0, "lease_lost": 0, "forgotten": 0}

    def function(self, app: str, function: str) -> FunctionState:
        state = self.functions.get((app, function))
        if state is None:
            state = self.functions[app, function] = FunctionState(config=None)
        return state

    def forget(self, partition: int) -> None:
        """Drops the partition's candidates and calls in flight: no longer held, its
        next owner inherits its running calls (then `reallot`)."""
        for state in self.functions.values():
            state.candidates.pop(partition, None)
            for call_id, inflight in list(state.inflight.items()):
                if inflight.partition == partition:
                    del state.inflight[call_id]
                    self.where.pop(call_id, None)

    def reallot(self, owned: Iterable[int], partitions: int, now: float) -> None:
        """Each function's share of its limits follows the partitions held."""
        for state in self.functions.values():
            if state.config is None:
                continue
            allotment = Allotment.of(
                owned,
                partitions,
                rate_limit_per_s=state.config.rate_limit_per_s,
                concurrency_max=state.config.concurrency_max,
            )
            state.allotment = allotment
            if allotment.rate_per_s is None:
                state.bucket = None
            elif state.bucket is None:
                state.bucket = TokenBucket(allotment.rate_per_s, allotment.burst, 0.0, now)
            else:
                state.bucket.reshape(allotment.rate_per_s, allotment.burst, now)
            for name in state.config.downstream:
                if name not in self.downstreams:
                    aimd = Aimd(self.aimd_settings, grew_at=now)
                    self.downstreams[name] = Downstream(aimd, TokenBucket(aimd.rate, 1.0, 0.0, now))

    def settle(self, report: Report, now: float) -> None:
        """A worker's report: its finished calls are no longer in flight, its running
        ones are seen alive; slow calls and overload signals cut downstreams' rates."""
        for finished in report.finished:
            key = self.where.get(finished.call_id)
            state = self.functions.get(key) if key else None
            if state is None:
                continue
            inflight = state.inflight.get(finished.call_id)
            if inflight is not None and inflight.attempt == finished.attempt:
                del state.inflight[finished.call_id]
                del self.where[finished.call_id]
                state.finished += 1
            slow = state.latency.observe(finished.duration_ms)
            for name in state.config.downstream if slow and state.config else ():
                if (downstream := self.downstreams.get(name)) is not None:
                    downstream.aimd.overloaded(now)  # at most one cut per cooldown
        for call_id, attempt in report.running:
            key = self.where.get(call_id)
            state = self.functions.get(key) if key else None
            inflight = state.inflight.get(call_id) if state else None
            if inflight is not None and inflight.attempt == attempt:
                inflight.seen = now
        for signal in report.signals:
            downstream = self.downstreams.get(signal.downstream)
            if downstream is not None:
                downstream.aimd.overloaded(now)
                downstream.bucket.reshape(downstream.aimd.rate, 1.0, now)
