"""Three ShardHosts of one p-shard in one process: the real core, no network, no faults.

Rules:
- the driver keeps the host contract (loom.host.shard): flush, then make the store
  durable (`sync`, only when the flush wrote something), then deliver what the flush
  produced. Messages go straight to the destination host's `on_message`, which marks
  that host for a flush of its own; `pump` repeats until no host has work left;
- time is real: `now` is the monotonic clock in ms, plus whatever `skip` added. The
  skip lets a freshly created acceptor promise at once, instead of the benchmark
  sleeping out `ReplicaParams.promise_wait_ms` after a (re)start;
- every loop is bounded by a count; a pump that does not settle is a bug in the
  driver or the core, so it raises instead of spinning.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from loom.core.ids import Epoch, Incarnation, NodeId, ShardId
from loom.core.time import Instant, WallMs
from loom.host.requests import ClientReply, ReadRequest, WriteRequest
from loom.host.shard import ShardHost
from loom.paxos.messages import Config
from loom.paxos.params import ReplicaParams
from loom.paxos.replica import Assignment
from loom.storage.memory import MemoryStore
from loom.storage.rocks import RocksStore

Store = MemoryStore | RocksStore

NODES = (NodeId("n1"), NodeId("n2"), NodeId("n3"))
PRIMARY = NODES[0]
SHARD = ShardId(1)
ORIGIN = "bench-client"
# Timers run at this period of real time, as the simulator's node tick does.
TICK_INTERVAL_MS = 10.0
# A settle of one request round takes ~4 flushes; this leaves room for ticks and catch-up.
FLUSHES_PER_PUMP_MAX = 10_000
ACTIVATION_PUMPS_MAX = 200
ACTIVATION_SECONDS_MAX = 10.0


class SettleError(RuntimeError):
    """The cluster kept producing work past the bound: the driver or the core loops."""


class BenchClock:
    """Monotonic milliseconds since creation, plus time skipped on purpose."""

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._skipped_ms = 0.0

    def now(self) -> Instant:
        return Instant((time.monotonic() - self._started) * 1000.0 + self._skipped_ms)

    def skip(self, ms: float) -> None:
        assert ms >= 0
        self._skipped_ms += ms

    @staticmethod
    def wall() -> WallMs:
        return WallMs(time.time_ns() // 1_000_000)


@dataclass(slots=True)
class DriverCounters:
    flushes: int = 0
    syncs: int = 0
    messages: int = 0
    ticks: int = 0


@dataclass(slots=True)
class Cluster:
    """One p-shard replicated on n1 (primary), n2, n3, each host over its own store."""

    stores: dict[NodeId, Store]
    params: ReplicaParams
    clock: BenchClock = field(default_factory=BenchClock)
    hosts: dict[NodeId, ShardHost] = field(default_factory=dict)
    replies: list[ClientReply] = field(default_factory=list)
    counters: DriverCounters = field(default_factory=DriverCounters)
    _batches_synced: dict[NodeId, int] = field(default_factory=dict)
    # Hosts given input since their last flush, in the order they got it.
    _due: deque[NodeId] = field(default_factory=deque)
    _last_tick_at: float = float("-inf")

    def __post_init__(self) -> None:
        assert sorted(self.stores) == sorted(NODES)
        now = self.clock.now()
        for node in NODES:
            self.hosts[node] = ShardHost(
                shard=SHARD,
                node=node,
                incarnation=Incarnation(1),
                store=self.stores[node],
                params=self.params,
                now=now,
            )
            self._batches_synced[node] = self.stores[node].stats.batches

    @property
    def primary(self) -> ShardHost:
        return self.hosts[PRIMARY]

    def is_serving(self) -> bool:
        lead = self.primary.replica.lead
        return lead is not None and lead.activated

    def activate(self) -> None:
        """Assign n1 as primary of epoch 1 and run until it has activated."""
        config = Config(Epoch(1), NODES, ())
        assignment = Assignment(
            epoch=Epoch(1),
            primary=PRIMARY,
            primary_incarnation=Incarnation(1),
            config=config,
        )
        now = self.clock.now()
        for node in NODES:
            self.hosts[node].assign(assignment, now)
            self._mark_due(node)
        # New acceptors wait W before their first promise (a restart may have forgotten
        # a lease grant). Nothing was granted here, so jump the clock past it.
        self.clock.skip(self.params.promise_wait_ms + 1.0)
        deadline = time.monotonic() + ACTIVATION_SECONDS_MAX
        for _ in range(ACTIVATION_PUMPS_MAX):
            self.tick_all()
            self.pump()
            if self.is_serving():
                self.replies.clear()
                return
            if time.monotonic() > deadline:
                break
            time.sleep(TICK_INTERVAL_MS / 1000.0)
        raise SettleError("the primary did not activate")

    def submit(self, request: WriteRequest | ReadRequest) -> None:
        self.primary.submit(ORIGIN, request, self.clock.now(), self.clock.wall())
        self._mark_due(PRIMARY)

    def maybe_tick(self) -> None:
        """Run the timers (heartbeats keep the lease) once per TICK_INTERVAL_MS."""
        if self.clock.now() - self._last_tick_at >= TICK_INTERVAL_MS:
            self.tick_all()

    def tick_all(self) -> None:
        now = self.clock.now()
        self._last_tick_at = now
        for node in NODES:
            self.hosts[node].tick(now)
            self._mark_due(node)
        self.counters.ticks += 1

    def pump(self) -> None:
        """Flush the hosts that got input, sync, deliver; until every host is idle."""
        for _ in range(FLUSHES_PER_PUMP_MAX):
            if not self._due:
                return
            self._flush(self._due.popleft())
        raise SettleError(f"no quiescence after {FLUSHES_PER_PUMP_MAX} flushes")

    def _mark_due(self, node: NodeId) -> None:
        if node not in self._due:
            self._due.append(node)

    def _flush(self, node: NodeId) -> None:
        host = self.hosts[node]
        store = self.stores[node]
        now = self.clock.now()
        out = host.flush(now, self.clock.wall())
        self.counters.flushes += 1
        if store.stats.batches != self._batches_synced[node]:
            store.sync()
            self._batches_synced[node] = store.stats.batches
            self.counters.syncs += 1
        # Sent only now, after the sync that covers this flush's writes (PITFALLS 4).
        for env in out.messages:
            self.hosts[env.dst].on_message(env, now)
            self.counters.messages += 1
            self._mark_due(env.dst)
        self.replies.extend(reply for _origin, reply in out.replies)

    def take_replies(self) -> list[ClientReply]:
        replies, self.replies = self.replies, []
        return replies

    def close(self) -> None:
        for node in NODES:
            self.stores[node].close()
