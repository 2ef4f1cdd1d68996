"""A storage node as a running program: the shard hosts of one node over RocksDB, behind
the RPC server (ADR 0005). It reports to the shard manager, takes its assignments and
keeps its routing table, which it serves to clients (so they can route with the
manager down).

Rules of this module:
- one asyncio loop moves bytes; one storage thread owns the RocksStore and every
  ShardHost, so RocksDB and fsync never block the loop (PITFALLS 11);
- inputs reach the storage thread through one bounded queue; the thread applies all
  queued inputs and flushes every host with work (one turn); a sync thread then makes
  the turn durable with one fsync for every turn finished before it started (group
  commit across shards and turns), and only then are that turn's messages and replies
  released (PITFALLS 4). The next turn runs while the last one's fsync does;
- a data directory carries an incarnation id chosen when it is created, so a node
  restarted on a wiped disk is a new member (PITFALLS 19);
- every task is owned by the node and stopped by `close()`; queues are bounded, and a
  full outbound queue to a peer drops messages (the protocol re-sends) and counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loom.core.ids import Incarnation, NodeId, ShardId
from loom.core.time import Instant, WallMs
from loom.host.fair_queue import FairQueue
from loom.host.load import LoadMeter
from loom.host.requests import (
    ClientReply,
    ClientRequest,
    ErrorCode,
    ErrorReply,
    ExportReply,
    HoldingReply,
    MoverReply,
    MoverRequest,
    ReadReply,
    ScanReply,
)
from loom.host.shard import HostOutput, ShardHost, shard_prefix
from loom.kvstate.keys import prefix_end
from loom.paxos.messages import Envelope
from loom.paxos.params import ReplicaParams
from loom.paxos.replica import Assignment
from loom.runtime.auth_gate import AuthGate
from loom.runtime.codec import (
    AssignMessage,
    BadMessage,
    ClientAnswer,
    ClientCall,
    DropShard,
    Failure,
    ManagerEvent,
    MoverAnswer,
    MoverCall,
    NodeReportMessage,
    PeerMessage,
    RoutingPush,
    RoutingRequest,
    decode,
    encode,
)
from loom.runtime.latency import LatencyMatrix, LinkDelays
from loom.runtime.locality import count_access
from loom.runtime.outbound import Outbound
from loom.runtime.quota_gate import QuotaGate
from loom.runtime.rpc import RpcServer
from loom.runtime.sizes import ShardSizes
from loom.runtime.tls import TlsConfig, require_cluster_peer
from loom.shardmgr.access import AccessCounter
from loom.shardmgr.core import NodeReport, ShardProgress
from loom.shardmgr.routing import DEFAULT_TIER, EMPTY_TABLE, NodeInfo
from loom.storage.api import WriteBatch
from loom.storage.rocks import RocksStore

log = logging.getLogger("loom.node")
TICK_MS = 10.0
# Turns whose outputs may wait for an fsync at once (then the storage thread waits).
UNSYNCED_TURNS_MAX = 64
INPUTS_MAX = 10_000
# Client requests taken into one storage turn, across tenants by weight (DESIGN §7);
# the rest wait in their tenant's queue for the next turn.
CALLS_PER_TURN_MAX = 512
CALLS_PER_TENANT_MAX = 4_096
REPORT_MS = 100.0
SIZES_EVERY_REPORTS = 10  # the led p-shards are measured about once a second
CLIENT_CALL_TIMEOUT_S = 10.0
INCARNATION_FILE = "INCARNATION"


def load_incarnation(data_dir: Path) -> Incarnation:
    """The data directory's incarnation, created once with the directory."""
    path = data_dir / INCARNATION_FILE
    if path.exists():
        return Incarnation(int(path.read_text().strip()))
    incarnation = secrets.randbelow(2**31 - 1) + 1
    path.write_text(f"{incarnation}\n")
    return Incarnation(incarnation)


@dataclass(slots=True)
class _Inputs:
    """Everything the storage thread applies in one turn."""

    messages: list[Envelope] = field(default_factory=list)
    calls: list[tuple[int, ShardId, ClientRequest | MoverRequest]] = field(default_factory=list)
    assignments: list[tuple[ShardId, Assignment, tuple[tuple[int, int], ...] | None]] = field(
        default_factory=list
    )
    drops: list[ShardId] = field(default_factory=list)
    tick: bool = False


class NodeRuntime:
    def __init__(
        self,
        *,
        node: NodeId,
        data_dir: Path,
        params: ReplicaParams,
        host: str = "127.0.0.1",
        port: int = 0,
        region: str = "",
        zone: str = "",
        tier: str = DEFAULT_TIER,
        auth: bool = False,
        tls: TlsConfig | None = None,
        latency: LatencyMatrix | None = None,
    ) -> None:
        self.node = node
        self.tls = tls  # on the listener, to peers and to the managers (ADR 0015)
        # Injected inter-region latency (off: None) and access counts (ADR 0013).
        self.links = LinkDelays(latency, region)
        self.access = AccessCounter()
        self.host = host
        self.labels = (region, zone, tier)
        self.routing = EMPTY_TABLE
        self.epochs_seen: dict[ShardId, int] = {}
        self.foreign_seen: set[ShardId] = set()
        self.data_dir = data_dir
        self.params = params
        self.server = RpcServer(self._handle, host, port, tls=tls)
        self.peers: dict[NodeId, tuple[str, int]] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"storage-{node}")
        # fsync runs in its own thread, so the next turn overlaps the last one's sync.
        self.sync_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sync-{node}")
        self.unsynced: list[list[tuple[ShardId, HostOutput]]] = []
        self.sync_wanted = asyncio.Event()
        self.sync_done = asyncio.Event()
        self.inputs: asyncio.Queue[Callable[[_Inputs], None]] = asyncio.Queue(INPUTS_MAX)
        self.calls: dict[int, asyncio.Future[ClientReply | MoverReply]] = {}
        self.call_ids = itertools.count(1)
        self.outboxes: dict[NodeId, Outbound] = {}
        self.managers: list[Outbound] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.dropped_messages = 0
        # Per-keyspace quotas, checked on the loop before a request is queued (ADR 0008).
        self.quotas = QuotaGate(node)
        # Tokens, checked before quotas; `auth`: refuse clients until the table has auth.
        self.auth = AuthGate(required=auth)
        self.routing_for_clients = EMPTY_TABLE  # the table without token hashes
        # Admitted client calls wait here, one queue per tenant, until a turn takes them.
        self.fair: FairQueue[tuple[int, ShardId, ClientRequest]] = FairQueue(
            per_tenant_max=CALLS_PER_TENANT_MAX, total_max=INPUTS_MAX
        )
        # Owned by the storage thread:
        self.sizes = ShardSizes()
        self.load = LoadMeter()
        self.reports = itertools.count(1)
        self.store: RocksStore | None = None
        self.incarnation = Incarnation(0)
        self.hosts: dict[ShardId, ShardHost] = {}
        self.orphan_replies: list[tuple[object, ClientReply]] = []
        self.orphan_mover_replies: list[tuple[object, MoverReply]] = []
        self.snapshots_installed: dict[ShardId, int] = {}

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.pool, self._open)
        await self.server.start()
        self.tasks.append(loop.create_task(self._pump()))
        self.tasks.append(loop.create_task(self._syncer()))
        self.tasks.append(loop.create_task(self._ticker()))

    def _open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.incarnation = load_incarnation(self.data_dir)
        self.store = RocksStore(str(self.data_dir / "rocksdb"))

    @property
    def port(self) -> int:
        return self.server.port

    def connect_peers(self, peers: dict[NodeId, tuple[str, int]]) -> None:
        loop = asyncio.get_running_loop()
        for peer, address in sorted(peers.items()):
            if peer == self.node:
                continue
            self.peers[peer] = address  # a restarted peer may listen elsewhere
            if peer in self.outboxes:
                continue
            outbound = self.outboxes[peer] = Outbound(
                functools.partial(self.peers.__getitem__, peer),
                self.links.delay_for,
                tls=self.tls,
            )
            self.tasks.append(loop.create_task(outbound.run()))

    def connect_manager(self, host: str, port: int) -> None:
        self.connect_managers([(host, port)])

    def connect_managers(self, addresses: list[tuple[str, int]]) -> None:
        """Report to the shard managers and take their assignments (heartbeats every
        REPORT_MS; the leader detects failures by their absence, standbys keep their
        registry warm with them)."""
        loop = asyncio.get_running_loop()
        for address in addresses:
            outbound = Outbound(
                functools.partial(lambda a: a, address), self.links.delay_for, tls=self.tls
            )
            self.managers.append(outbound)
            self.tasks.append(loop.create_task(outbound.run()))
        self.tasks.append(loop.create_task(self._reporter()))

    def _to_managers(self, body: bytes) -> None:
        for outbound in self.managers:
            outbound.put(body)

    async def _reporter(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            report = await loop.run_in_executor(self.pool, self._report)
            region, zone, tier = self.labels
            info = NodeInfo(
                node=self.node,
                host=self.host,
                port=self.port,
                region=region,
                zone=zone,
                tier=tier,
                pid=os.getpid(),
            )
            message = NodeReportMessage(
                report=report,
                info=info,
                routing_version=self.routing.version,
                throttled=self.quotas.throttled + self.quotas.refused_bytes,
                access=self.access.report_due(Instant(time.monotonic() * 1000)),
            )
            self._to_managers(encode(message))
            measured = self.quotas.measured_shards
            reports = next(self.reports)
            # Keyspaces with a bytes quota are measured at every report; the p-shards
            # this node leads, for the automatic split, every SIZES_EVERY_REPORTS.
            if measured or reports % SIZES_EVERY_REPORTS == 0:
                sizes = await loop.run_in_executor(self.pool, self._measure_sizes, measured)
                self.quotas.on_sizes({s: b for s, b in sizes.items() if s in measured})
            await asyncio.sleep(REPORT_MS / 1000)

    def _measure_sizes(self, shards: frozenset[ShardId]) -> dict[ShardId, int]:
        """In the storage thread: bytes of these local p-shards (the bytes quota) and
        of those it leads (the automatic split)."""
        assert self.store is not None
        leading = {s for s, host in self.hosts.items() if host.replica.lead is not None}
        chosen = sorted(s for s in shards | leading if s in self.hosts)
        return self.sizes.measure(self.store, chosen)

    def _report(self) -> NodeReport:
        """In the storage thread: this node's progress on each of its shards."""
        counts = {s: h.applied_commands + h.reads_served for s, h in self.hosts.items()}
        load = self.load.observe(counts, Instant(time.monotonic() * 1000))
        shards = [
            dataclasses.replace(
                ShardProgress.of(shard, host.replica),
                applied_commands=host.applied_commands,
                load_per_s=load.get(shard, 0.0),
                stored_bytes=self.sizes.bytes.get(shard, 0),
            )
            for shard, host in sorted(self.hosts.items())
        ]
        assert self.store is not None
        return NodeReport(
            node=self.node,
            incarnation=self.incarnation,
            shards=tuple(shards),
            stored_bytes=self.store.approximate_bytes(),
        )

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.close()
        for future in self.calls.values():
            future.cancel()
        self.sync_pool.shutdown(wait=True)  # no sync may run while the store closes
        await asyncio.get_running_loop().run_in_executor(self.pool, self._close_store)
        self.pool.shutdown(wait=True)

    def _close_store(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    # ---------------------------------------------------------------- inputs

    def assign(self, shard: ShardId, assignment: Assignment) -> None:
        self._enqueue(lambda i: i.assignments.append((shard, assignment, None)))

    def _enqueue(self, add: Callable[[_Inputs], None]) -> None:
        self.inputs.put_nowait(add)  # QueueFull reaches the caller: it answers Overloaded

    async def _handle(self, body: bytes) -> bytes:
        message = decode(body)
        if self.tls is not None:
            require_cluster_peer(message)
        match message:
            case PeerMessage():
                envelope = message.envelope
                self._enqueue(lambda i: i.messages.append(envelope))
            case ClientCall():
                return await self._client_call(message)
            case MoverCall():
                return await self._mover_call(message)
            case AssignMessage():
                self.connect_peers({p.node: (p.host, p.port) for p in message.peers})
                shard, assignment, initial = message.shard, message.assignment, message.initial
                self._log_assignment(shard, assignment)
                self._enqueue(lambda i: i.assignments.append((shard, assignment, initial)))
            case DropShard():
                dropped = message.shard
                self._enqueue(lambda i: i.drops.append(dropped))
            case RoutingPush():
                table = message.table
                if table.version > self.routing.version and self.auth.accepts(table):
                    self.routing = table
                    self.links.learn(table)
                    self.routing_for_clients = table.for_clients()
                    self.auth.on_routing(table)
                    self.fair.set_weights({t.name: t.weight for t in table.tenants})
                    self.quotas.on_routing(table, time.monotonic() * 1000)
            case RoutingRequest():
                if not self.auth.may_read_routing(message.auth):
                    denied = Failure(kind="permission", message="a valid token is needed")
                    return encode(denied)
                if self.routing is EMPTY_TABLE:
                    failure = Failure(
                        kind="unavailable",
                        message=f"node {self.node} has no routing table yet",
                        retry_after_ms=200,
                    )
                    return encode(failure)
                return encode(self.routing_for_clients)
            case _:
                raise BadMessage(f"a node does not take {type(message).__name__}")
        return b""

    def _log_assignment(self, shard: ShardId, assignment: Assignment) -> None:
        """Logs each new epoch once (the manager re-announces every few hundred ms)."""
        named = assignment.incarnation_of(self.node)
        if named is not None and named != self.incarnation and shard not in self.foreign_seen:
            self.foreign_seen.add(shard)
            log.warning(
                "p-shard %d names incarnation %d of node %s, but this data directory is "
                "incarnation %d (wiped?): ignored until the manager adds it as a new member",
                shard, named, self.node, self.incarnation,
            )  # fmt: skip
        if self.epochs_seen.get(shard, 0) < assignment.epoch:
            self.epochs_seen[shard] = assignment.epoch
            log.info(
                "p-shard %d epoch %d primary %s acceptors %s",
                shard, assignment.epoch, assignment.primary,
                ",".join(assignment.config.acceptors),
            )  # fmt: skip

    async def _client_call(self, call: ClientCall) -> bytes:
        refusal = self.auth.check(call.shard, call.request, call.auth)
        if refusal is None:
            refusal = self.quotas.check(call.shard, call.request, time.monotonic() * 1000)
        if refusal is not None:  # answered at once: never queued, never dropped
            return encode(ClientAnswer(reply=refusal))
        count_access(self.access, call, Instant(time.monotonic() * 1000))
        call_id = next(self.call_ids)

        def submit() -> None:
            tenant = self.auth.owner_of.get(call.shard, "")
            if not self.fair.push(tenant, (call_id, call.shard, call.request)):
                raise asyncio.QueueFull  # this tenant's queue (or all of them) is full
            if len(self.fair) == 1:
                # The pump may be waiting for inputs; if they are full, it is busy and
                # takes from the fair queue on its next turn anyway.
                with contextlib.suppress(asyncio.QueueFull):
                    self._enqueue(_wake)

        reply = await self._reply(call_id, call.request.token, submit)
        if isinstance(reply, ExportReply | HoldingReply):
            raise BadMessage("a client request was answered with a mover reply")
        return encode(ClientAnswer(reply=reply))

    async def _reply(
        self, call_id: int, token: int, submit: Callable[[], None]
    ) -> ClientReply | MoverReply:
        """Hands a call to the storage turns (`submit`, which may raise QueueFull) and
        waits for its reply; a timeout or a full queue is an error reply, never a drop."""
        future: asyncio.Future[ClientReply | MoverReply] = (
            asyncio.get_running_loop().create_future()
        )
        self.calls[call_id] = future
        try:
            submit()
            async with asyncio.timeout(CLIENT_CALL_TIMEOUT_S):
                return await future
        except TimeoutError:
            return ErrorReply(token=token, code=ErrorCode.TIMEOUT, retry_after_ms=10)
        except asyncio.QueueFull:
            return ErrorReply(token=token, code=ErrorCode.OVERLOADED, retry_after_ms=20)
        finally:
            self.calls.pop(call_id, None)

    async def _mover_call(self, call: MoverCall) -> bytes:
        """The manager's mover, answered like a client call (its own reply types)."""
        call_id = next(self.call_ids)
        reply = await self._reply(
            call_id,
            call.request.token,
            lambda: self._enqueue(lambda i: i.calls.append((call_id, call.shard, call.request))),
        )
        if isinstance(reply, ReadReply | ScanReply):
            raise BadMessage("a move command was answered with a read reply")
        return encode(MoverAnswer(reply=reply))

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_MS / 1000)
            with contextlib.suppress(asyncio.QueueFull):
                self._enqueue(_request_tick)

    # ---------------------------------------------------------------- storage thread

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while len(self.unsynced) >= UNSYNCED_TURNS_MAX:  # the disk is behind: wait
                self.sync_done.clear()
                await self.sync_done.wait()
            batch = _Inputs()
            if not self.fair:
                (await self.inputs.get())(batch)
            while not self.inputs.empty():
                self.inputs.get_nowait()(batch)
            batch.calls.extend(self.fair.pop(CALLS_PER_TURN_MAX))
            outputs = await loop.run_in_executor(self.pool, self._turn, batch)
            self.unsynced.append(outputs)
            self.sync_wanted.set()

    async def _syncer(self) -> None:
        """Group commit, pipelined: one fsync covers every turn finished before it
        started; only then do those turns' outputs leave (PITFALLS 4). Meanwhile the
        storage thread runs the next turns, whose outputs wait for the next sync."""
        loop = asyncio.get_running_loop()
        while True:
            await self.sync_wanted.wait()
            self.sync_wanted.clear()
            ready, self.unsynced = self.unsynced, []
            assert self.store is not None
            await loop.run_in_executor(self.sync_pool, self.store.sync)
            for outputs in ready:
                self._dispatch(outputs)
            self.sync_done.set()

    def _turn(self, batch: _Inputs) -> list[tuple[ShardId, HostOutput]]:
        """In the storage thread: apply every input, flush every host (unsynced: the
        outputs wait in `unsynced` for the syncer)."""
        assert self.store is not None
        now = Instant(time.monotonic() * 1000)
        wall = WallMs(int(time.time() * 1000))
        for shard in batch.drops:
            self._drop(shard)
        for shard, assignment, initial in batch.assignments:
            self._host(shard, now).assign(assignment, now, initial)
        for envelope in batch.messages:
            self._host(envelope.shard, now).on_message(envelope, now)
        for call_id, shard, request in batch.calls:
            host = self.hosts.get(shard)
            if host is None:
                self.orphan_replies.append((call_id, _not_hosted(self.node, shard, request)))
                continue
            host.submit(call_id, request, now, wall)
        if batch.tick:
            for shard in sorted(self.hosts):
                self.hosts[shard].tick(now)
        outputs = [(shard, self.hosts[shard].flush(now, wall)) for shard in sorted(self.hosts)]
        self._log_snapshot_installs()
        if self.orphan_replies:
            outputs.append((ShardId(0), HostOutput(replies=self.orphan_replies)))
            self.orphan_replies = []
        return outputs

    def _log_snapshot_installs(self) -> None:
        for shard, host in self.hosts.items():
            installed = host.snapshots.installed
            if installed > self.snapshots_installed.get(shard, 0):
                log.info(
                    "node %s installed a snapshot of p-shard %d at seq %d",
                    self.node, shard, host.applied_seq,
                )  # fmt: skip
                self.snapshots_installed[shard] = installed

    def _drop(self, shard: ShardId) -> None:
        """Deletes this node's replica of a dropped p-shard (the manager re-sends the drop
        while the replica is reported, so a crash halfway through is finished later)."""
        assert self.store is not None
        self.hosts.pop(shard, None)
        log.info("node %s drops its replica of p-shard %d", self.node, shard)
        batch = WriteBatch()
        prefix = shard_prefix(shard)
        batch.delete_range(prefix, prefix_end(prefix))
        self.store.write(batch, sync=False)

    def _host(self, shard: ShardId, now: Instant) -> ShardHost:
        host = self.hosts.get(shard)
        if host is None:
            assert self.store is not None
            host = ShardHost(
                shard=shard,
                node=self.node,
                incarnation=self.incarnation,
                store=self.store,
                params=self.params,
                now=now,
            )
            self.hosts[shard] = host
        return host

    # ---------------------------------------------------------------- outputs

    def _dispatch(self, outputs: list[tuple[ShardId, HostOutput]]) -> None:
        for shard, out in outputs:
            for envelope in out.messages:
                self._send(envelope)
            for event in out.sm_events:
                log.info("p-shard %d: %s in epoch %d", shard, event.kind.value, event.ballot.epoch)
                self._to_managers(encode(ManagerEvent(shard=shard, event=event)))
            for origin, reply in (*out.replies, *out.mover_replies):
                future = self.calls.get(origin) if isinstance(origin, int) else None
                if future is not None and not future.done():
                    future.set_result(reply)

    def _send(self, envelope: Envelope) -> None:
        if envelope.dst == self.node:
            self._enqueue(lambda i: i.messages.append(envelope))
            return
        outbound = self.outboxes.get(envelope.dst)
        if outbound is None:
            self.dropped_messages += 1
            return
        outbound.put(encode(PeerMessage(envelope=envelope)))


def _not_hosted(node: NodeId, shard: ShardId, request: ClientRequest | MoverRequest) -> ErrorReply:
    return ErrorReply(
        token=request.token,
        code=ErrorCode.NOT_PRIMARY,
        message=f"node {node} has no replica of p-shard {shard}",
        retry_after_ms=10,
    )


def _request_tick(inputs: _Inputs) -> None:
    inputs.tick = True


def _wake(_inputs: _Inputs) -> None:
    """Queued client calls wait in the fair queue; this only wakes the pump."""
