"""A simulated storage node: real ShardHosts over a MemoryStore that loses unsynced
writes on a crash, a drifting clock, and a disk whose fsync takes time.

Everything a flush produced leaves the node only after the fsync that covers it
completes (the driver's half of PITFALLS 4); a crash before then loses both the
unsynced writes and those messages. The `reply-before-persist` bug sends at once.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from loom.core.ids import Incarnation, NodeId, ShardId, UShard
from loom.core.time import Instant, WallMs
from loom.host.shard import HostOutput, ShardHost
from loom.paxos.params import ReplicaParams
from loom.shardmgr.core import NodeReport, ShardProgress
from loom.storage.memory import MemoryStore

WALL_EPOCH_MS = 1_700_000_000_000
FSYNC_MS_MIN = 1.0
FSYNC_MS_MAX = 20.0


@dataclass(slots=True, kw_only=True)
class Clock:
    """Local monotonic time = rate · global + offset; the rate stays within the drift bound."""

    rate: float
    offset: float
    wall_offset_ms: float

    def monotonic(self, t: float) -> Instant:
        return Instant(self.rate * t + self.offset)

    def wall(self, t: float) -> WallMs:
        return WallMs(int(WALL_EPOCH_MS + t + self.wall_offset_ms))


@dataclass(slots=True)
class SimNode:
    node: NodeId
    clock: Clock
    params: ReplicaParams
    rng: random.Random
    store: MemoryStore = field(default_factory=MemoryStore)
    incarnation: Incarnation = Incarnation(1)
    alive: bool = True
    life: int = 0
    hosts: dict[ShardId, ShardHost] = field(default_factory=dict)
    sync_done_at: float = 0.0
    # Group commit: hosts with work waiting for the disk to finish the current fsync.
    dirty: set[ShardId] = field(default_factory=set)
    flush_scheduled: bool = False
    # Aimed torn crash: "" = off, "any" = the next flush that leaves unsynced writes,
    # "promise" = the next flush that sends a Promise.
    torn_crash: str = ""
    # With moves on: the μshards each p-shard was created with (None: all, as before).
    initial: dict[ShardId, frozenset[UShard]] | None = None

    def host(self, shard: ShardId, t: float) -> ShardHost:
        host = self.hosts.get(shard)
        if host is None:
            host = ShardHost(
                shard=shard,
                node=self.node,
                incarnation=self.incarnation,
                store=self.store,
                params=self.params,
                now=self.clock.monotonic(t),
                initial=None if self.initial is None else self.initial[shard],
            )
            self.hosts[shard] = host
        return host

    def flush(
        self,
        host: ShardHost,
        t: float,
        schedule: Callable[[float, Callable[[], None]], None],
        deliver: Callable[[HostOutput], None],
    ) -> HostOutput:
        out = host.flush(self.clock.monotonic(t), self.clock.wall(t))
        if not (out.messages or out.replies or out.sm_events or out.mover_replies):
            if self.store.unsynced_batches:
                self._schedule_sync(t, schedule, None, deliver)
            return out
        if self.params.has_bug("reply-before-persist"):
            deliver(out)
            self._schedule_sync(t, schedule, None, deliver)
        else:
            self._schedule_sync(t, schedule, out, deliver)
        return out

    def _schedule_sync(
        self,
        t: float,
        schedule: Callable[[float, Callable[[], None]], None],
        out: HostOutput | None,
        deliver: Callable[[HostOutput], None],
    ) -> None:
        life = self.life
        start = max(self.sync_done_at, t)
        if self.store.unsynced_batches:
            start += self.rng.uniform(FSYNC_MS_MIN, FSYNC_MS_MAX)
        self.sync_done_at = start

        def done() -> None:
            if self.life != life:
                return  # crashed meanwhile: the writes and the messages are gone
            self.store.sync()
            if out is not None:
                deliver(out)

        schedule(start, done)

    def crash(self) -> None:
        self.alive = False
        self.life += 1
        unsynced = self.store.unsynced_batches
        # Usually everything unsynced is lost; sometimes a prefix of the WAL made it.
        kept = 0 if self.rng.random() < 0.6 else self.rng.randint(0, unsynced)
        self.store.crash(unsynced_batches_kept=kept)
        self.hosts.clear()
        self.dirty.clear()
        self.flush_scheduled = False
        self.torn_crash = ""

    def restart(self, t: float) -> None:
        assert not self.alive
        self.alive = True
        self.sync_done_at = t

    def report(self) -> NodeReport:
        shards = [
            ShardProgress.of(shard, self.hosts[shard].replica) for shard in sorted(self.hosts)
        ]
        return NodeReport(node=self.node, incarnation=self.incarnation, shards=tuple(shards))


def entry_value_digest(wall_ms: int, epoch: int, commands: tuple[bytes, ...]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(wall_ms.to_bytes(8, "big", signed=True) + epoch.to_bytes(8, "big"))
    for command in commands:
        digest.update(len(command).to_bytes(4, "big") + command)
    return digest.digest()
