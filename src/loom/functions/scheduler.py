"""The scheduler: owns DurableQ partitions by leases in the store and dispatches their
due calls to workers, under the functions' limits (DESIGN §8).

- **Ownership.** Each scheduler takes about P / (live schedulers) partitions. A free
  partition is taken at once; a held one only after its lease record has not moved
  for a lease period on this process's monotonic clock (never by comparing wall
  clocks). Every write a scheduler makes to a partition — claim, reclaim, expire —
  checks its lease record in the same transaction, so a paused scheduler that wakes
  after losing a partition changes nothing.
- **Dispatch.** Workers long-poll with `Pull`. A pass picks calls by weighted fair
  share across tenants (criticality first within a tenant), within each function's
  allotment of its global rate and concurrency limits (`limits`), within each
  declared downstream's AIMD rate, groups batched functions' calls into batches,
  claims them in one transaction per partition and hands them to the waiting workers.
- **Time-shifting.** While the scheduler is busy (calls of normal or high criticality
  left waiting for capacity, or a downstream throttled), calls of low criticality
  wait unless their deadline is near.
- **Leases of calls.** A claimed call is the scheduler's until the worker reports it
  finished; the worker's heartbeats keep it; if neither comes within the call's lease
  (on this scheduler's clock), the call is reclaimed: at-least-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from loom import kv
from loom.core.errors import InvalidArgument, LoomError
from loom.functions import protocol, registry
from loom.functions.limits import (
    Aimd,
    AimdSettings,
    Allotment,
    FairShare,
    LatencyWatch,
    TokenBucket,
    concurrency_share,
)
from loom.functions.protocol import Ack, Pull, Report, Work
from loom.functions.queue import (
    CallRecord,
    CallState,
    Criticality,
    DueCall,
    DurableQueue,
    LeaseHold,
    LeaseLost,
    PartitionLease,
    StaleAttempt,
    decode_due,
)
from loom.functions.registry import FunctionConfig, Liveness, SchedulerMember
from loom.runtime.rpc import RpcServer

log = logging.getLogger("loom.scheduler")

LEASE_S = 4.0
# A holder stops using a partition this long before others may take it.
LEASE_MARGIN = 0.75
MEMBER_TTL_S = 3.0
MEMBER_FORGET_S = 60.0
CONFIG_REFRESH_S = 1.0
SCAN_BUSY_S = 0.01
SCAN_IDLE_MAX_S = 0.2
DUE_PAGE = 300
CANDIDATES_LOW = 100
# A call's lease: its timeout plus slack, or with heartbeats for long calls, this.
LEASE_SLACK_MS = 5_000
HEARTBEAT_LEASE_MS = 30_000
CLAIMS_IN_FLIGHT_MAX = 32
RECLAIM_RETRY_S = 1.0
ADOPT_TRIES = 30
USED_WINDOW_S = 2.0
TIME_SHIFT_SLACK_MS = 60_000
# A downstream admits this many seconds of its AIMD rate at once.
DOWNSTREAM_BURST_S = 0.25
# How long a succeeded call (its result, and its idempotency key) is remembered.
RETENTION_S = 7 * 86_400.0
RETENTION_S_MIN = 1.0
RETENTION_S_MAX = 400 * 86_400.0
RETENTION_CHECK_S = 10.0
CRITICALITY_RANK = {Criticality.HIGH: 0, Criticality.NORMAL: 1, Criticality.LOW: 2}


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


class Scheduler:
    def __init__(
        self,
        client: kv.Client,
        *,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        lease_s: float = LEASE_S,
        aimd: AimdSettings | None = None,
        retention_s: float = RETENTION_S,
        bugs: frozenset[str] = frozenset(),
        tls: kv.TlsConfig | None = None,
    ) -> None:
        # Deliberate bugs, for the simulation to prove its checks bite (loom sim
        # --functions --bug …): "reclaim-early" reclaims calls at a quarter of their lease.
        self.bugs = bugs
        if not RETENTION_S_MIN <= retention_s <= RETENTION_S_MAX:
            raise InvalidArgument(f"retention must be {RETENTION_S_MIN:g}..{RETENTION_S_MAX:g} s")
        self.retention_s = retention_s
        self.client = client
        self.name = name or f"sched-{secrets.token_hex(4)}"
        self.lease_s = lease_s
        self.aimd_settings = aimd or AimdSettings()
        self.server = RpcServer(self._handle, host, port, tls=tls)  # workers' TLS (ADR 0015)
        self.host = host
        self.queue: DurableQueue | None = None
        self.partitions: dict[int, PartitionView] = {}
        self.lease_seen = Liveness(ttl_s=lease_s)
        self.members = Liveness(ttl_s=MEMBER_TTL_S)
        self.live_members = 1
        self.functions: dict[tuple[str, str], FunctionState] = {}
        self.downstreams: dict[str, Downstream] = {}
        self.where: dict[str, tuple[str, str]] = {}  # call id → its function
        self.claiming: set[str] = set()
        self.waiters: list[Waiter] = []
        self.busy = False
        self.fair = FairShare()
        self.beats = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.claims = asyncio.Semaphore(CLAIMS_IN_FLIGHT_MAX)
        self.wake = asyncio.Event()
        self.stats = {"claimed": 0, "reclaimed": 0, "expired": 0, "lease_lost": 0, "forgotten": 0}

    @property
    def port(self) -> int:
        return self.server.port

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Opens the queue and starts listening (then `run`)."""
        queue = self.queue = await DurableQueue.open(self.client)
        await self.server.start()
        log.info(
            "scheduler %s on %s:%d, %d partitions",
            self.name, self.host, self.port, queue.partitions,
        )  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; then hands its partitions back."""
        if self.queue is None:
            await self.start()
        queue = self.queue
        assert queue is not None
        loops = [
            self._ownership_loop(),
            self._config_loop(),
            self._scan_loop(),
            self._retention_loop(),
        ]
        async with asyncio.TaskGroup() as group:
            running = [group.create_task(loop) for loop in loops]
            await stop.wait()
            for task in running:
                task.cancel()
        for waiter in self.waiters:
            if not waiter.future.done():
                waiter.future.set_result(Work(scheduler=self.name))
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.close()
        with contextlib.suppress(LoomError):
            for view in list(self.partitions.values()):
                await queue.release(view.hold)
            await registry.leave(self.client, self.name)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("scheduler task failed", exc_info=task.exception())

    # ------------------------------------------------------------------ ownership

    async def _ownership_loop(self) -> None:
        while True:
            try:
                await self._ownership_round()
            except LoomError as error:
                log.warning("ownership round: %s", error)
            self._drop_expired_holds()
            await asyncio.sleep(self.lease_s / 4)

    async def _ownership_round(self) -> None:
        assert self.queue is not None
        queue = self.queue
        self.beats += 1
        member = SchedulerMember(
            name=self.name, host=self.host, port=self.port, beat=self.beats, status=self.status()
        )
        await registry.beat(self.client, member)
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
        await asyncio.gather(*(self._renew(view) for view in list(self.partitions.values())))

        for partition, lease in enumerate(leases):
            if len(self.partitions) >= target:
                break
            if partition in self.partitions or not self._takeable(partition, lease):
                continue
            await self._acquire(partition, lease)
        extra = len(self.partitions) - target
        if extra > 0 and self.live_members > 1:
            for partition in sorted(self.partitions, reverse=True)[:extra]:
                view = self.partitions.pop(partition)
                self._forget(partition)
                with contextlib.suppress(LoomError):
                    await queue.release(view.hold)
                log.info("released partition %d (%d schedulers)", partition, self.live_members)

    def _takeable(self, partition: int, lease: PartitionLease) -> bool:
        if lease.owner is None:
            return True
        return self.lease_seen.silent_for(str(partition)) >= self.lease_s

    async def _acquire(self, partition: int, lease: PartitionLease) -> None:
        assert self.queue is not None
        sent = time.monotonic()
        try:
            hold = await self.queue.acquire(partition, self.name, lease)
            running = await self.queue.running(partition)
        except LoomError as error:
            log.info("partition %d not taken: %s", partition, error)
            return
        now = time.monotonic()
        for call in running:  # a predecessor's calls: count them, reclaim them if silent
            state = self._function(call.entry.app, call.entry.function)
            state.inflight[call.call_id] = Inflight(
                partition, call.entry.attempt, now, call.entry.lease_ms
            )
            self.where[call.call_id] = (call.entry.app, call.entry.function)
        self.partitions[partition] = PartitionView(hold, sent + self.lease_s * LEASE_MARGIN)
        self._reallot()
        log.info("took partition %d (token %d, %d running)", partition, hold.token, len(running))

    async def _renew(self, view: PartitionView) -> None:
        assert self.queue is not None
        sent = time.monotonic()
        try:
            view.hold = await self.queue.renew(view.hold)
        except LeaseLost:
            self._lose(view.hold.partition)
            return
        except LoomError:
            return  # kept until valid_until; every write is fenced anyway
        view.valid_until = sent + self.lease_s * LEASE_MARGIN

    def _drop_expired_holds(self) -> None:
        now = time.monotonic()
        for partition, view in list(self.partitions.items()):
            if now > view.valid_until:
                self._lose(partition)

    def _lose(self, partition: int) -> None:
        if self.partitions.pop(partition, None) is not None:
            self.stats["lease_lost"] += 1
            log.warning("lost partition %d", partition)
            self._forget(partition)

    def _forget(self, partition: int) -> None:
        for state in self.functions.values():
            state.candidates.pop(partition, None)
            for call_id, inflight in list(state.inflight.items()):
                if inflight.partition == partition:
                    del state.inflight[call_id]
                    self.where.pop(call_id, None)
        self._reallot()

    # -------------------------------------------------------------- configuration

    def _function(self, app: str, function: str) -> FunctionState:
        state = self.functions.get((app, function))
        if state is None:
            state = self.functions[app, function] = FunctionState(config=None)
        return state

    async def _config_loop(self) -> None:
        while True:
            try:
                configs = await registry.read_configs(self.client)
            except LoomError as error:
                log.warning("reading function configs: %s", error)
            else:
                for config in configs:
                    self._function(config.app, config.function).config = config
                self._reallot()
            await asyncio.sleep(CONFIG_REFRESH_S)

    def _reallot(self) -> None:
        """Each function's share of its limits follows the partitions held."""
        assert self.queue is not None
        now = time.monotonic()
        for state in self.functions.values():
            if state.config is None:
                continue
            allotment = Allotment.of(
                self.partitions,
                self.queue.partitions,
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

    async def _retention_loop(self) -> None:
        """Forgets succeeded calls older than the retention period, partition by
        partition (fenced by the partition lease like every scheduler write)."""
        assert self.queue is not None
        while True:
            await asyncio.sleep(min(RETENTION_CHECK_S, self.retention_s / 2))
            before_ms = int((time.time() - self.retention_s) * 1000)
            for view in list(self.partitions.values()):
                with contextlib.suppress(LoomError):
                    while forgotten := await self.queue.forget_done(view.hold, before_ms=before_ms):
                        self.stats["forgotten"] += forgotten

    # ----------------------------------------------------------------- scanning

    async def _scan_loop(self) -> None:
        while True:
            now = time.monotonic()
            due = [view for view in self.partitions.values() if self._should_scan(view, now)]
            if due:
                await asyncio.gather(*(self._scan(view) for view in due))
            self._reclaim_silent()
            self._dispatch()
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), SCAN_BUSY_S)

    def _should_scan(self, view: PartitionView, now: float) -> bool:
        """When due; while the partition still has plenty of candidates, only now and
        then (to see other functions' calls and new earlier ones)."""
        if view.scan_after > now:
            return False
        partition = view.hold.partition
        known = sum(len(s.candidates.get(partition, ())) for s in self.functions.values())
        return known < CANDIDATES_LOW or now - view.scanned_at >= SCAN_IDLE_MAX_S

    async def _scan(self, view: PartitionView) -> None:
        """Refreshes the partition's candidates: one scan of its whole due index when
        that fits a page; else one per function, so no backlog hides another's calls."""
        assert self.queue is not None
        partition = view.hold.partition
        now_ms = int(time.time() * 1000)
        prefix = b"q/%d/due/" % partition
        found: dict[tuple[str, str], list[DueCall]] = {}
        try:
            page = await self.queue.ks.scan(
                shard_key=b"q/%d" % partition, prefix=prefix, limit=DUE_PAGE
            )
            for item in page.items:
                app, function, stamp, call_id = item.key[len(prefix) :].decode().split("/")
                if int(stamp, 16) <= now_ms:
                    deadline_ms = decode_due(item.value).deadline_ms
                    found.setdefault((app, function), []).append(
                        DueCall(call_id, int(stamp, 16), deadline_ms)
                    )
            if page.cursor is not None:
                found = {}
                for key, state in list(self.functions.items()):
                    if state.config is not None:
                        found[key] = await self.queue.due(partition, *key, now_ms, limit=DUE_PAGE)
        except LoomError as error:
            log.debug("scan of partition %d: %s", partition, error)
            view.scan_after = time.monotonic() + SCAN_IDLE_MAX_S
            return
        if partition not in self.partitions:
            return  # lost meanwhile
        total = 0
        for key, state in self.functions.items():
            calls = [
                c
                for c in found.pop(key, [])
                if c.call_id not in self.claiming and c.call_id not in state.inflight
            ]
            state.candidates[partition] = deque(calls)
            total += len(calls)
        for key, calls in found.items():  # calls of a function no worker registered yet
            state = self._function(*key)
            state.candidates[partition] = deque(calls)
        self._expire_late(view.hold, now_ms)
        view.idle_s = SCAN_BUSY_S if total else min(SCAN_IDLE_MAX_S, view.idle_s * 2)
        view.scanned_at = time.monotonic()
        view.scan_after = view.scanned_at + view.idle_s

    def _expire_late(self, hold: LeaseHold, now_ms: int) -> None:
        assert self.queue is not None
        for state in self.functions.values():
            calls = state.candidates.get(hold.partition)
            if not calls:
                continue
            late = [c for c in calls if c.deadline_ms is not None and c.deadline_ms < now_ms]
            for call in late:
                calls.remove(call)
                self._spawn(self._expire(hold, call.call_id, now_ms))

    async def _expire(self, hold: LeaseHold, call_id: str, now_ms: int) -> None:
        assert self.queue is not None
        with contextlib.suppress(StaleAttempt, LeaseLost, LoomError):
            await self.queue.expire(hold, call_id, now_ms=now_ms)
            self.stats["expired"] += 1

    def _reclaim_silent(self) -> None:
        now = time.monotonic()
        for state in self.functions.values():
            for call_id, inflight in list(state.inflight.items()):
                lease_s = inflight.lease_ms / 1000
                if "reclaim-early" in self.bugs:
                    lease_s /= 4
                if inflight.attempt and now > inflight.seen + lease_s:
                    view = self.partitions.get(inflight.partition)
                    del state.inflight[call_id]
                    key = self.where.pop(call_id, None)
                    if view is not None and key is not None:
                        self._spawn(self._reclaim(view.hold, key, call_id, inflight))

    async def _reclaim(
        self, hold: LeaseHold, key: tuple[str, str], call_id: str, inflight: Inflight
    ) -> None:
        assert self.queue is not None
        now_ms = int(time.time() * 1000)
        try:
            await self.queue.reclaim(hold, call_id, attempt=inflight.attempt, now_ms=now_ms)
        except (StaleAttempt, LeaseLost):
            return  # finished meanwhile, or no longer ours to reclaim
        except LoomError as error:
            # The store did not take it: try again soon, or the call stays RUNNING.
            log.info("reclaiming call %s: %s; trying again", call_id, error)
            state = self.functions.get(key)
            if hold.partition in self.partitions and state and call_id not in state.inflight:
                inflight.seen = time.monotonic() - inflight.lease_ms / 1000 + RECLAIM_RETRY_S
                state.inflight[call_id] = inflight
                self.where[call_id] = key
            return
        self.stats["reclaimed"] += 1
        log.info("reclaimed call %s after its lease ended (attempt %d)", call_id, inflight.attempt)

    # ----------------------------------------------------------------- dispatch

    def _dispatch(self) -> None:
        """One pass: picks calls for the waiting workers (synchronously, so passes never
        pick the same call twice), then claims them in the background."""
        if not self.waiters:
            return
        now = time.monotonic()
        now_ms = int(time.time() * 1000)
        for downstream in self.downstreams.values():
            downstream.bucket.reshape(
                downstream.aimd.current(now, used=downstream.used(now)),
                max(1.0, downstream.aimd.rate * DOWNSTREAM_BURST_S),
                now,
            )
        by_tenant: dict[str, list[FunctionState]] = {}
        weights: dict[str, int] = {}
        for state in self.functions.values():
            if state.config is not None and state.candidate_count():
                by_tenant.setdefault(state.config.tenant, []).append(state)
                weights[state.config.tenant] = state.config.weight
            if state.candidate_count() and state.waiting_since is None:
                state.waiting_since = now
        throttled = any(d.aimd.throttling for d in self.downstreams.values())
        shift_low = self.busy or throttled
        for states in by_tenant.values():
            states.sort(key=lambda s: CRITICALITY_RANK[s.config.criticality])  # type: ignore[union-attr]

        def take(tenant: str, allowance: int) -> int:
            for state in by_tenant[tenant]:
                count = self._take(state, allowance, now, now_ms, shift_low)
                if count:
                    return count
            return 0

        self.fair.run(sorted(by_tenant), weights, take)
        # Busy: a call of normal or high criticality could not go out for lack of room.
        self.busy = any(
            s.candidate_count()
            and s.config is not None
            and s.config.criticality is not Criticality.LOW
            for s in self.functions.values()
        )
        chosen = [w for w in self.waiters if w.batches]
        self.waiters = [w for w in self.waiters if not w.batches and not w.future.done()]
        if chosen:
            self._spawn(self._claim_and_deliver(chosen, now_ms))

    def _take(
        self, state: FunctionState, allowance: int, now: float, now_ms: int, shift_low: bool
    ) -> int:
        config = state.config
        assert config is not None
        waiter = next(
            (
                w
                for w in self.waiters
                if w.slots > 0 and w.pull.app == config.app and config.function in w.pull.functions
            ),
            None,
        )
        if waiter is None:
            return 0
        size = 1 if config.batch is None else config.batch.size_max
        room = min(state.room(now), size, allowance if config.batch is None else size)
        for name in config.downstream:
            room = min(room, self.downstreams[name].bucket.available(now))
        if room <= 0:
            return 0
        calls: list[tuple[int, DueCall]] = []
        for partition, queue in state.candidates.items():
            cap = room - len(calls)
            if config.concurrency_max is not None:
                # A partition's slots serve only its own calls, so the partition's
                # running index is its whole use: whoever owns it next sees it exact.
                assert self.queue is not None
                share = concurrency_share(config.concurrency_max, self.queue.partitions, partition)
                used = sum(1 for i in state.inflight.values() if i.partition == partition)
                cap = min(cap, share - used)
            taken = 0
            while queue and taken < cap:
                call = queue[0]
                if (
                    shift_low
                    and config.criticality is Criticality.LOW
                    and not _urgent(call, config, now_ms)
                ):
                    break
                calls.append((partition, queue.popleft()))
                taken += 1
            if len(calls) >= room:
                break
        if not calls:
            return 0
        if config.batch is not None and len(calls) < size:
            waited_ms = (now - (state.waiting_since or now)) * 1000
            if waited_ms < config.batch.wait_ms:
                for partition, call in reversed(calls):  # not yet: let the batch fill
                    state.candidates[partition].appendleft(call)
                return 0
        count = len(calls)
        if state.bucket is not None:
            state.bucket.take(count, now)
        for name in config.downstream:
            self.downstreams[name].bucket.take(count, now)
            self.downstreams[name].dispatched += count
        lease_ms = call_lease_ms(config)
        for partition, call in calls:
            state.inflight[call.call_id] = Inflight(partition, 0, now, lease_ms)
            self.where[call.call_id] = config.key
            self.claiming.add(call.call_id)
        state.waiting_since = None if not state.candidate_count() else now
        if config.batch is None:
            waiter.batches.extend([c] for c in calls)
            waiter.slots -= count
        else:
            waiter.batches.append(calls)
            waiter.slots -= 1
        waiter.functions.extend([state] * (count if config.batch is None else 1))
        return count

    async def _claim_and_deliver(self, waiters: list[Waiter], now_ms: int) -> None:
        assert self.queue is not None
        wanted: dict[int, list[tuple[str, int]]] = {}
        for waiter in waiters:
            for batch in waiter.batches:
                for partition, call in batch:
                    key = self.where.get(call.call_id)
                    inflight = self.functions[key].inflight.get(call.call_id) if key else None
                    if inflight is not None:  # else forgotten meanwhile (partition lost)
                        wanted.setdefault(partition, []).append((call.call_id, inflight.lease_ms))
        claimed: dict[str, CallRecord] = {}

        async def claim(partition: int, calls: list[tuple[str, int]]) -> None:
            view = self.partitions.get(partition)
            if view is None:
                return
            async with self.claims:
                for start in range(0, len(calls), 100):
                    try:
                        done = await self.queue.claim_many(  # type: ignore[union-attr]
                            view.hold,
                            calls[start : start + 100],
                            scheduler=self.name,
                            now_ms=now_ms,
                        )
                    except LeaseLost:
                        self._lose(partition)
                        return
                    except LoomError as error:
                        # Perhaps applied (a lost answer): find out later, and keep
                        # whatever was claimed under watch so its lease can end.
                        log.warning("claim in partition %d: %s", partition, error)
                        self._spawn(self._adopt(view.hold, [c for c, _ in calls[start:]]))
                        return
                    claimed.update((r.call_id, r) for r in done if isinstance(r, CallRecord))

        await asyncio.gather(*(claim(p, calls) for p, calls in wanted.items()))
        now = time.monotonic()
        for waiter in waiters:
            batches = []
            for batch in waiter.batches:
                records = []
                for _, call in batch:
                    self.claiming.discard(call.call_id)
                    key = self.where.get(call.call_id)
                    owner = self.functions.get(key) if key else None
                    record = claimed.get(call.call_id)
                    if owner is None:
                        continue
                    state = owner
                    if record is None:
                        state.inflight.pop(call.call_id, None)
                        self.where.pop(call.call_id, None)
                        continue
                    inflight = state.inflight.get(call.call_id)
                    if inflight is not None:
                        inflight.attempt, inflight.seen = record.attempt, now
                    state.dispatched += 1
                    records.append(record)
                if records:
                    batches.append(tuple(records))
            self.stats["claimed"] += sum(len(b) for b in batches)
            if not waiter.future.done():
                waiter.future.set_result(Work(scheduler=self.name, batches=tuple(batches)))
            # A worker gone meanwhile: its calls are reclaimed when their leases end.

    async def _adopt(self, hold: LeaseHold, call_ids: list[str]) -> None:
        """After a claim whose outcome is unknown: each call this scheduler did claim
        (RUNNING under its name) is tracked again, so it is reclaimed when its lease
        ends; no worker got it."""
        assert self.queue is not None
        for _ in range(ADOPT_TRIES):
            await asyncio.sleep(RECLAIM_RETRY_S)
            if hold.partition not in self.partitions:
                return  # the next owner inherits the partition's running calls
            try:
                records = [await self.queue.get(call_id) for call_id in call_ids]
            except LoomError:
                continue
            now = time.monotonic()
            for record in records:
                if record is None or record.state is not CallState.RUNNING:
                    continue
                if record.scheduler != self.name or record.call_id in self.where:
                    continue
                state = self._function(record.app, record.function)
                state.inflight[record.call_id] = Inflight(
                    hold.partition, record.attempt, now, record.lease_ms
                )
                self.where[record.call_id] = (record.app, record.function)
            return

    # ------------------------------------------------------------------- serving

    async def _handle(self, body: bytes) -> bytes:
        message = protocol.decode(body)
        match message:
            case Pull():
                return protocol.encode(await self._on_pull(message))
            case Report():
                self._on_report(message)
                return protocol.encode(Ack())
            case _:
                raise InvalidArgument(f"a scheduler does not take {type(message).__name__}")

    async def _on_pull(self, pull: Pull) -> Work:
        future: asyncio.Future[Work] = asyncio.get_running_loop().create_future()
        waiter = Waiter(pull, future, pull.slots)
        self.waiters.append(waiter)
        self._dispatch()
        try:
            async with asyncio.timeout(pull.wait_ms / 1000):
                return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The worker is gone (its connection closed): a waiter left behind would
            # take calls that nobody runs, each losing an attempt to its lease.
            if not waiter.batches:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            raise
        except TimeoutError:
            if future.done():
                return future.result()
            if waiter.batches:  # picked in a pass whose claims are in flight
                return await future
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)
            return Work(scheduler=self.name)

    def _on_report(self, report: Report) -> None:
        now = time.monotonic()
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
        if report.finished:
            self.wake.set()

    # ------------------------------------------------------------------- status

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "name": self.name,
            "partitions": sorted(self.partitions),
            "functions": {
                f"{app}.{function}": {
                    "candidates": state.candidate_count(),
                    "running": len(state.inflight),
                    "dispatched": state.dispatched,
                    "finished": state.finished,
                    "rate_allotted": state.allotment.rate_per_s,
                    "concurrency_allotted": state.allotment.concurrency,
                }
                for (app, function), state in self.functions.items()
            },
            "downstreams": {
                name: {
                    "rate": round(d.aimd.current(now), 1),
                    "throttling": d.aimd.throttling,
                    "cuts": d.aimd.cuts,
                    "signals": d.aimd.signals,
                }
                for name, d in self.downstreams.items()
            },
            **self.stats,
        }


def _urgent(call: DueCall, config: FunctionConfig, now_ms: int) -> bool:
    """A low-criticality call may wait for spare capacity unless its deadline is near."""
    if call.deadline_ms is None:
        return False
    return call.deadline_ms - now_ms < TIME_SHIFT_SLACK_MS + 2 * config.timeout_s * 1000
