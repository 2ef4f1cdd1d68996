"""The simulated world: one seeded event loop running real cores on simulated nodes,
a simulated shard manager with its metastore, clients, and the fault schedule.

Single-threaded and deterministic: the same seed gives the same events in the same
order (PYTHONHASHSEED fixed; no set or hash order drives a decision).
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from loom.core.ids import Ballot, Epoch, Incarnation, NodeId, ShardId, UShard
from loom.core.limits import Limits
from loom.core.time import Instant
from loom.host.requests import (
    ClientReply,
    ErrorReply,
    ExportReply,
    ExportRequest,
    MoveRequest,
    ReadRequest,
    WriteReply,
    WriteRequest,
)
from loom.host.shard import HostOutput
from loom.kvstate.ownership import HELD, ownership
from loom.paxos.messages import Accept, Config, Envelope, LeaseRelease, Promise
from loom.paxos.params import ReplicaParams
from loom.paxos.ready import SmEvent
from loom.paxos.replica import Assignment
from loom.shardmgr.core import (
    Announce,
    NodeReport,
    PersistEpoch,
    ShardManagerCore,
    ShardRecord,
    SmParams,
)
from loom.shardmgr.moves import (
    ExportChunk,
    Exported,
    InstallMapping,
    Mover,
    MoverParams,
    Proposed,
    ProposeMove,
    Step,
    Unanswered,
)
from loom.sim.faults import Faults
from loom.sim.moves import OwnershipChecker
from loom.sim.network import Network
from loom.sim.node import Clock, SimNode, entry_value_digest
from loom.sim.workload import (
    ATTEMPT_TIMEOUT_MS,
    RETRY_DELAY_MS,
    USHARDS,
    Recorder,
    Routing,
    SimClient,
    shard_of,
)
from loom.storage.memory import MemoryStore

NODE_TICK_MS = 10.0
REPORT_MS = 100.0
SM_TICK_MS = 50.0
SM = "sm"
# A correlated failure may take a third node down for a moment (a rack losing power).
CORRELATED_DOWN_MAX = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class WorldConfig:
    seed: int
    faults: Faults
    ops: int = 300
    bugs: frozenset[str] = frozenset()
    nodes: int = 5
    shards: int = 2
    replication: int = 3
    clients: int = 6
    load_ms_max: float = 60_000.0
    # p-shards created owning no μshard, like those a reshard adds (moves only).
    spare_shards: int = 0


@dataclass(order=True, slots=True)
class _Event:
    at: float
    order: int
    action: Callable[[], None] = field(compare=False)


class World:
    def __init__(self, config: WorldConfig) -> None:
        self.cfg = config
        self.rng = random.Random(config.seed)
        self.t = 0.0
        self.lease_releases = 0  # LeaseRelease messages delivered (planned hand-offs)
        self.events: list[_Event] = []
        self.order = 0
        self.trace = hashlib.blake2b(digest_size=16)
        self.params = ReplicaParams(
            lease_ms=1000.0,
            heartbeat_interval_ms=50.0,
            probe_interval_ms=50.0,
            resend_after_ms=150.0,
            read_wait_max_ms=500.0,
            gc_interval_ms=500.0,
            gc_tombstone_lag_entries=20,
            dedupe_retention_ms=8000,
            # Tiny logs and chunks, so truncation and snapshot transfer happen in every run.
            limits=Limits(log_retained_entries_max=24, snapshot_chunk_items_max=4),
            bugs=config.bugs,
        )
        self.net = Network(random.Random(self.rng.random()), config.faults)
        # The keyspace's μshard → p-shard mapping and its version; moves change it.
        self.mapping = {UShard(u): shard_of(UShard(u), config.shards) for u in range(USHARDS)}
        self.mapping_version = 1
        self.mover_params = MoverParams(
            chunk_records_max=4,
            moves_in_flight_max=4,
            bugs=frozenset(b for b in config.bugs if b.startswith("move-")),
        )
        self.mover = Mover(self.mover_params)
        # What a durable manager has stored of the mover: taken before outputs leave.
        self.mover_record = self.mover.record()
        self.mover_restarts = 0
        self.moves_done_before = 0  # by movers replaced in a manager restart
        self.ownership = OwnershipChecker(self.mapping)
        self.retired: list[ShardId] = []  # p-shards a shrink retired (sim/moves.py)
        # Called at every shard manager turn before the mover's (MoveSchedule.drive).
        self.drive_moves: Callable[[], None] | None = None
        self.nodes: dict[NodeId, SimNode] = {}
        for i in range(1, config.nodes + 1):
            self._add_node(NodeId(f"n{i}"))
        self.sm = ShardManagerCore(
            params=SmParams(
                failure_timeout_ms=400.0,
                activation_timeout_ms=3000.0,
                announce_interval_ms=200.0,
                prefer_highest_commit=config.faults.moves,
                handoff_on_reconfigure=config.faults.handoffs,
            ),
            rng=random.Random(self.rng.random()),
        )
        self.metastore: dict[ShardId, ShardRecord] = {}
        self.rec = Recorder()
        self.clients = [
            SimClient(
                name=f"c{i}",
                rng=random.Random(self.rng.random()),
                shards=config.shards,
                recorder=self.rec,
                routing=Routing(self._route, self.mapping.__getitem__),
                fast_ack=True,
                skip_absent_bug="txn-skip-absent" in config.bugs,
            )
            for i in range(config.clients)
        ]
        self.load_running = True
        self.power_outage_armed = False
        self.applied_values: dict[tuple[ShardId, int], bytes] = {}
        # The commands of each slot as first applied anywhere (divergence is reported apart).
        self.applied_commands: dict[tuple[ShardId, int], tuple[bytes, ...]] = {}
        self.accepted_values: dict[tuple[ShardId, object, int], bytes] = {}
        self.invariant_violations: list[str] = []

    # ------------------------------------------------------------------ scheduling

    def at(self, when: float, action: Callable[[], None]) -> None:
        self.order += 1
        heapq.heappush(self.events, _Event(max(when, self.t), self.order, action))

    def run_until(self, deadline: float, stop: Callable[[], bool] | None = None) -> None:
        while self.events and self.events[0].at <= deadline:
            event = heapq.heappop(self.events)
            self.t = event.at
            event.action()
            if stop is not None and stop():
                return
        self.t = max(self.t, deadline)

    def note(self, *parts: object) -> None:
        self.trace.update(repr((round(self.t, 6), *parts)).encode())

    # ------------------------------------------------------------------ nodes

    def _add_node(self, node_id: NodeId) -> None:
        bound = self.params.drift_bound * self.cfg.faults.drift_fraction
        clock = Clock(
            rate=1.0 + self.rng.uniform(-bound, bound),
            offset=self.rng.uniform(0, 10_000),
            wall_offset_ms=self.rng.uniform(-50, 50),
        )
        node = SimNode(
            node=node_id, clock=clock, params=self.params, rng=random.Random(self.rng.random())
        )
        if self.cfg.faults.moves:
            # Each p-shard owns its initial μshards only; the rest must be moved in.
            node.initial = {
                ShardId(shard): frozenset(u for u, s in self.mapping.items() if s == shard)
                for shard in range(self.cfg.shards + self.cfg.spare_shards)
            }
        self.nodes[node_id] = node

    def start(self) -> None:
        for node_id in sorted(self.nodes):
            self.sm.on_report(self.nodes[node_id].report(), self._sm_now())
        names = sorted(self.nodes)
        for shard in range(self.cfg.shards + self.cfg.spare_shards):
            members = tuple(names[(shard + i) % len(names)] for i in range(self.cfg.replication))
            # One follower per shard: an asynchronous learner serving relaxed reads.
            follower = names[(shard + self.cfg.replication) % len(names)]
            self.sm.create_shard(ShardId(shard), members, self._sm_now(), followers=(follower,))
        for node_id in names:
            self._schedule_node_tick(node_id)
            self._schedule_report(node_id)
        self.at(self.t, self._sm_tick)

    def _node_now(self, node: SimNode) -> float:
        return node.clock.monotonic(self.t)

    def _schedule_node_tick(self, node_id: NodeId) -> None:
        node = self.nodes[node_id]
        life = node.life

        def tick() -> None:
            if not node.alive or node.life != life:
                return
            for shard in sorted(node.hosts):
                host = node.hosts[shard]
                host.tick(node.clock.monotonic(self.t))
                self._flush(node, shard)
            self._schedule_node_tick(node_id)

        self.at(self.t + NODE_TICK_MS / node.clock.rate, tick)

    def _schedule_report(self, node_id: NodeId) -> None:
        node = self.nodes[node_id]
        life = node.life

        def report() -> None:
            if not node.alive or node.life != life:
                return
            self._send(node_id, SM, node.report())
            self._schedule_report(node_id)

        self.at(self.t + REPORT_MS / node.clock.rate, report)

    def _flush(self, node: SimNode, shard: ShardId) -> None:
        """Group commit: while an fsync runs, work piles up and goes in the next one."""
        if shard not in node.hosts:
            return
        if node.sync_done_at <= self.t:
            self._flush_now(node, shard)
            return
        node.dirty.add(shard)
        if not node.flush_scheduled:
            node.flush_scheduled = True
            life = node.life

            def flush_dirty() -> None:
                if node.life != life or not node.alive:
                    return
                node.flush_scheduled = False
                dirty, node.dirty = sorted(node.dirty), set()
                for dirty_shard in dirty:
                    self._flush_now(node, dirty_shard)

            self.at(node.sync_done_at, flush_dirty)

    def _flush_now(self, node: SimNode, shard: ShardId) -> None:
        host = node.hosts.get(shard)
        if host is None:
            return
        node_id = node.node

        def deliver(out: HostOutput) -> None:
            for env in out.messages:
                self._send(node_id, env.dst, env)
            for origin, reply in out.replies:
                self._send(node_id, str(origin), reply)
            for origin, mover_reply in out.mover_replies:
                self._send(node_id, str(origin), mover_reply)
            for event in out.sm_events:
                self._send(node_id, SM, (shard, event))

        out = node.flush(host, self.t, self.at, deliver)
        self._observe(shard, out)
        if self.power_outage_armed and any(isinstance(r, WriteReply) for _, r in out.replies):
            self.power_outage_armed = False
            self.at(self.t + self.rng.uniform(0, 1), self._power_outage)
        if self._is_torn_crash_due(node, out):
            node.torn_crash = ""
            when = self.t + self.rng.uniform(0, max(0.0, node.sync_done_at - self.t))
            self.at(when, functools.partial(self._torn_crash, node_id, node.life))

    def _power_outage(self) -> None:
        """Every node loses power at once: unsynced writes everywhere are gone. Only what
        was persisted before it was acknowledged may survive (PITFALLS 4)."""
        self.note("power outage")
        for node_id in sorted(self.nodes):
            if self.nodes[node_id].alive:
                self.crash_node(node_id)
                downtime = self.rng.uniform(50, 2000)
                self.at(self.t + downtime, functools.partial(self._restart_if_down, node_id))

    def _is_torn_crash_due(self, node: SimNode, out: HostOutput) -> bool:
        if not node.torn_crash or not node.store.unsynced_batches:
            return False
        if node.torn_crash == "promise":
            return any(isinstance(env.message, Promise) for env in out.messages)
        return True

    def _torn_crash(self, node_id: NodeId, life: int) -> None:
        node = self.nodes[node_id]
        if node.life != life or not node.alive:
            return
        self.crash_node(node_id)
        downtime = self.rng.choice([self.rng.uniform(50, 900), self.rng.uniform(1000, 4000)])
        self.at(self.t + downtime, functools.partial(self._restart_if_down, node_id))
        if self.rng.random() < 0.5:
            # Correlated failure: a primary this node served as acceptor dies soon after,
            # before it can repair what the torn crash may have lost elsewhere.
            primaries = sorted({s.current.primary for s in self.sm.shards.values()} - {node_id})
            if primaries:
                victim = self.rng.choice(primaries)
                self.at(
                    self.t + self.rng.uniform(5, 100),
                    functools.partial(self._correlated_crash, victim),
                )

    def _correlated_crash(self, node_id: NodeId) -> None:
        down = sum(1 for node in self.nodes.values() if not node.alive)
        if self.nodes[node_id].alive and down < CORRELATED_DOWN_MAX and not self.net.healed:
            self.crash_node(node_id)
            downtime = self.rng.uniform(200, 3000)
            self.at(self.t + downtime, functools.partial(self._restart_if_down, node_id))

    def _restart_if_down(self, node_id: NodeId) -> None:
        if not self.nodes[node_id].alive:
            self.restart_node(node_id)

    def _observe(self, shard: ShardId, out: HostOutput) -> None:
        """Invariants visible at the source: one value per slot among applied entries,
        and one value per (ballot, slot) among sent Accepts."""
        for entry, results in zip(out.applied, out.applied_results, strict=True):
            digest = entry_value_digest(entry.wall_ms, entry.epoch, entry.commands)
            if self.cfg.faults.moves and (shard, entry.seq) not in self.applied_commands:
                self.ownership.first_applied(shard, entry.seq, entry.commands, results)
            self.applied_commands.setdefault((shard, entry.seq), entry.commands)
            known = self.applied_values.setdefault((shard, entry.seq), digest)
            if known != digest:
                self.invariant_violations.append(
                    f"shard {shard}: two different values applied at slot {entry.seq}"
                )
        for ballot, config in out.lease_reads:
            self._check_lease(shard, ballot, config)
        for env in out.messages:
            msg = env.message
            if isinstance(msg, Accept):
                for entry in msg.entries:
                    digest = entry_value_digest(entry.wall_ms, entry.epoch, entry.commands)
                    key = (shard, entry.ballot, int(entry.seq))
                    known = self.accepted_values.setdefault(key, digest)
                    if known != digest:
                        self.invariant_violations.append(
                            f"shard {shard}: ballot {entry.ballot} sent two values "
                            f"for slot {entry.seq}"
                        )

    def _check_lease(self, shard: ShardId, ballot: Ballot, config: Config) -> None:
        """Leases never overlap (DESIGN §3): while a primary serves a lease read, no
        majority of its acceptors has promised a higher ballot, since each of them waits
        W after its last grant, and no higher ballot is active."""
        promised_higher = 0
        for node_id in config.acceptors:
            host = self.nodes[node_id].hosts.get(shard)
            if host is not None and host.replica.promise.ballot > ballot:
                promised_higher += 1
        if promised_higher >= config.majority():
            self.invariant_violations.append(
                f"shard {shard}: a lease read under ballot {ballot} was served after a "
                f"majority of its acceptors promised a higher ballot"
            )
        for node_id in sorted(self.nodes):
            host = self.nodes[node_id].hosts.get(shard)
            lead = host.replica.lead if host is not None and self.nodes[node_id].alive else None
            if lead is not None and lead.activated and lead.ballot > ballot:
                self.invariant_violations.append(
                    f"shard {shard}: a lease read under ballot {ballot} was served while "
                    f"{lead.ballot} was active"
                )

    # ------------------------------------------------------------------ network

    def _send(self, src: str, dst: str, payload: object) -> None:
        for delay in self.net.deliveries(src, dst):
            self.at(self.t + delay, functools.partial(self._arrive, src, dst, payload))

    def _arrive(self, src: str, dst: str, payload: object) -> None:
        self.note("msg", src, dst, type(payload).__name__)
        if dst == SM:
            self._sm_receive(payload)
            return
        node = self.nodes.get(NodeId(dst))
        if node is not None:
            if node.alive:
                self._node_receive(node, src, payload)
            return
        for client in self.clients:
            if client.name == dst:
                self._client_receive(client, payload)

    def _node_receive(self, node: SimNode, src: str, payload: object) -> None:
        now = node.clock.monotonic(self.t)
        if isinstance(payload, Envelope):
            if isinstance(payload.message, LeaseRelease):
                self.lease_releases += 1
            host = node.host(payload.shard, self.t)
            host.on_message(payload, now)
            self._flush(node, payload.shard)
        elif isinstance(payload, tuple) and isinstance(payload[1], Assignment):
            shard, assignment = payload
            node.host(shard, self.t).assign(assignment, now)
            self._flush(node, shard)
        elif isinstance(payload, tuple) and isinstance(
            payload[1], WriteRequest | ReadRequest | MoveRequest | ExportRequest
        ):
            shard, request = payload
            host = node.host(shard, self.t)
            host.submit(src, request, now, node.clock.wall(self.t))
            self._flush(node, shard)

    # ------------------------------------------------------------------ shard manager

    def _sm_now(self) -> Instant:
        return Instant(self.t)  # the manager's clock; it compares only its own readings

    def _sm_receive(self, payload: object) -> None:
        if isinstance(payload, NodeReport):
            self.sm.on_report(payload, self._sm_now())
        elif isinstance(payload, tuple) and isinstance(payload[1], SmEvent):
            self.sm.on_event(payload[0], payload[1], self._sm_now())
        elif isinstance(payload, WriteReply | ExportReply | ErrorReply):
            self._mover_reply(payload)
        self._sm_outputs()

    def _sm_tick(self) -> None:
        self.sm.tick(self._sm_now())
        self._sm_outputs()
        if self.cfg.faults.moves:
            if self.drive_moves is not None:
                self.drive_moves()
            self.mover.start_planned(self.mapping.__getitem__, self._sm_now())
            self.mover.tick(self._sm_now())
            self._mover_outputs()
        self.at(self.t + SM_TICK_MS, self._sm_tick)

    # ------------------------------------------------------------------ moves

    def start_move(self, ushard: UShard, target: ShardId) -> None:
        move_id = self.mover.start(ushard, self.mapping[ushard], target, self._sm_now())
        self.note("move", move_id, ushard, target)
        self._mover_outputs()

    def _mover_reply(self, reply: WriteReply | ExportReply | ErrorReply) -> None:
        answer: Exported | Proposed | Unanswered
        match reply:
            case ExportReply():
                answer = Exported(
                    records=reply.records,
                    cursor=reply.cursor,
                    generation=reply.generation,
                    total=reply.total,
                )
            case WriteReply():
                answer = Proposed(result=reply.result)
            case ErrorReply():
                answer = Unanswered()
        self.mover.on_reply(reply.token, answer, self._sm_now())
        self._mover_outputs()

    def restart_mover(self) -> Mover:
        """The manager restarts: a new mover resumes from what was stored. Its request
        tokens start far above the old ones, so a late answer to an old request is
        ignored as stale (a real restart also loses the old connections)."""
        self.mover_restarts += 1
        self.note("mover restart", self.mover_restarts)
        self.moves_done_before += sum(1 for m in self.mover.moves.values() if m.step is Step.DONE)
        mover = Mover(self.mover_params)
        mover.next_token = self.mover_restarts * 1_000_000_000
        mover.restore(self.mover_record, self._sm_now())
        self.mover = mover
        self._mover_outputs()
        return mover

    def holdings(self, shard: ShardId) -> tuple[UShard, ...] | None:
        """What p-shard `shard`'s activated primary holds (owned, frozen or incoming), as
        the real manager asks before it retires a p-shard; None without one."""
        state = self.sm.shards.get(shard)
        host = self.nodes[state.current.primary].hosts.get(shard) if state else None
        lead = host.replica.lead if host is not None else None
        if host is None or lead is None or not lead.activated:
            return None
        return tuple(
            UShard(u)
            for u in range(USHARDS)
            if ownership(host.state, UShard(u), host.initial).state in HELD
        )

    def retire(self, shard: ShardId) -> None:
        """A shrink retires `shard`: nothing may move to it or be written on it again."""
        self.note("retire", shard)
        self.retired.append(shard)

    def _mover_outputs(self) -> None:
        for _ in range(16):  # installing a mapping produces the Drop: drain both
            outputs = self.mover.outputs()
            if not outputs:
                return
            self.mover_record = self.mover.record()  # stored before anything leaves
            for output in outputs:
                match output:
                    case ProposeMove():
                        request: MoveRequest | ExportRequest = MoveRequest(
                            token=output.token, command=output.command
                        )
                        self._to_primary(output.shard, request)
                    case ExportChunk():
                        request = ExportRequest(
                            token=output.token,
                            ushard=output.ushard,
                            move_id=output.move_id,
                            after=output.after,
                            limit=output.limit,
                        )
                        self._to_primary(output.shard, request)
                    case InstallMapping():
                        self._install_mapping(output)

    def _to_primary(self, shard: ShardId, request: MoveRequest | ExportRequest) -> None:
        primary, _members = self._route(shard)
        if primary is not None:
            self._send(SM, primary, (shard, request))

    def _install_mapping(self, output: InstallMapping) -> None:
        """A new mapping version (stored at once: the sim's metastore is in memory)."""
        self.ownership.mapping_installed(output.ushard, output.shard)
        self.mapping[output.ushard] = output.shard
        self.mapping_version += 1
        self.note("mapping", self.mapping_version, output.ushard, output.shard)
        self.mover.mapping_installed(output.move_id, self._sm_now())

    def _sm_outputs(self) -> None:
        for _ in range(16):  # persisting may produce announcements: drain both
            outputs = self.sm.outputs()
            if not outputs:
                return
            for output in outputs:
                if isinstance(output, PersistEpoch):
                    self._persist_epoch(output)
                elif isinstance(output, Announce):
                    self.note("announce", output.shard, output.assignment.ballot)
                    for node_id in output.to:
                        self._send(SM, node_id, (output.shard, output.assignment))

    def send_from_manager(self, node: NodeId, payload: object) -> None:
        self._send(SM, node, payload)

    def _persist_epoch(self, output: PersistEpoch) -> None:
        stored = self.metastore.get(output.shard)
        stored_epoch = stored.assignment.epoch if stored is not None else Epoch(0)
        if output.chaos or stored_epoch == output.expected:
            stored = self.sm.record(output.shard, output.assignment)
            self.metastore[output.shard] = stored
        self.sm.epoch_persisted(output.shard, output.assignment, stored=stored, now=self._sm_now())

    def _route(self, shard: ShardId) -> tuple[NodeId | None, tuple[NodeId, ...]]:
        state = self.sm.shards.get(shard)
        if state is None:
            return None, ()
        return state.current.primary, state.current.config.members()

    # ------------------------------------------------------------------ clients

    def start_clients(self) -> None:
        for client in self.clients:
            self.at(self.t + self.rng.uniform(0, 20), functools.partial(self._client_next, client))

    def _client_next(self, client: SimClient) -> None:
        if not self.load_running or self.rec.operations() >= self.cfg.ops:
            return
        client.start_op(self.t)
        self._client_send(client)

    def _client_send(self, client: SimClient) -> None:
        attempt = client.current
        if attempt is None:
            return
        if self.t >= attempt.deadline_ms:
            client.give_up()
            self.at(self.t + 1, lambda: self._client_next(client))
            return
        target = client.target_for(attempt)
        if target is None:
            self.at(self.t + RETRY_DELAY_MS, lambda: self._client_send(client))
            return
        attempt.target = target
        request = client.stamp(attempt, self.t)
        token = attempt.token
        self._send(client.name, target, (attempt.shard, request))

        def timeout() -> None:
            current = client.current
            if current is not None and current.token == token:
                client.routing.forget(current.shard, None)
                self._client_send(client)

        self.at(self.t + ATTEMPT_TIMEOUT_MS, timeout)

    def _client_receive(self, client: SimClient, payload: object) -> None:
        reply: ClientReply = payload  # type: ignore[assignment]
        verdict = client.on_reply(reply, self.t)
        if verdict == "done":
            self.at(self.t + client.rng.uniform(0, 10), lambda: self._client_next(client))
        elif verdict == "continue":
            self._client_send(client)
        elif verdict == "retry":
            token = reply.token

            def retry() -> None:
                current = client.current
                if current is not None and current.token == token:
                    self._client_send(client)

            self.at(self.t + RETRY_DELAY_MS, retry)

    def clients_idle(self) -> bool:
        return all(c.current is None for c in self.clients)

    # ------------------------------------------------------------------ faults

    def crash_node(self, node_id: NodeId) -> None:
        self.note("crash", node_id)
        self.nodes[node_id].crash()

    def wipe_node(self, node_id: NodeId) -> None:
        """The node dies and comes back on an empty disk: a new incarnation, with the
        same name (PITFALLS 19)."""
        self.note("wipe", node_id)
        node = self.nodes[node_id]
        node.crash()
        node.store = MemoryStore()
        node.incarnation = Incarnation(node.incarnation + 1)

    def restart_node(self, node_id: NodeId) -> None:
        self.note("restart", node_id)
        node = self.nodes[node_id]
        node.restart(self.t)
        self._schedule_node_tick(node_id)
        self._schedule_report(node_id)
