"""The shard manager as a running program: the sans-IO `ShardManagerCore` behind the RPC
server, its epochs and keyspaces in a `Metastore` (a file for one machine, etcd for HA).

Rules of this module:
- one task owns the core: reports, events, operator calls and ticks reach it through one
  bounded queue, so the core is never entered twice at once;
- an epoch is announced only after the metastore's compare-and-swap stored it (the core
  emits `PersistEpoch` first and announces from `epoch_persisted`); the metastore is
  called off the event loop;
- keyspace operations are serialized by one lock and made of single compare-and-swaps
  in an order a restarted manager can finish (`loom.runtime.catalog`);
- the manager is never on the data path: it sends assignments and the routing table;
  nodes keep the table and serve it to clients, so the data path goes on without it;
- each node has one owned sender task and a bounded queue; a lost assignment is
  re-announced, a lost routing push is re-pushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import msgspec

from loom.core.errors import InvalidArgument, LoomError, NotFound, PermissionDenied, Unavailable
from loom.core.ids import Epoch, NodeId, ShardId, UShard
from loom.core.time import Instant
from loom.paxos.replica import Assignment
from loom.runtime import tenancy_calls
from loom.runtime.catalog import Catalog, KeyspaceRecord, shard_record_key
from loom.runtime.codec import (
    AssignMessage,
    BadMessage,
    CreateKeyspace,
    CreateTenant,
    CreateToken,
    Done,
    DropKeyspace,
    DropShard,
    Failure,
    FailureKind,
    KeyspaceReply,
    ListTenants,
    ListTokens,
    ManagerEvent,
    NodeReportMessage,
    NodeStatus,
    PeerAddress,
    PrimaryMoved,
    ReshardKeyspace,
    ReshardStatus,
    RevokeToken,
    RoutingPush,
    RoutingRequest,
    SetKeyspaceTier,
    SetQuota,
    ShardStatus,
    StatusReply,
    StatusRequest,
    TransferPrimaryCall,
    decode,
    encode,
)
from loom.runtime.latency import LatencyMatrix, LinkDelays
from loom.runtime.leadership import EtcdLeadership
from loom.runtime.locality import DEFAULT_LOCALITY_PERIOD_S, LocalityDriver
from loom.runtime.outbound import Outbound
from loom.runtime.placement import Placement
from loom.runtime.resharding import Resharder
from loom.runtime.retirement import Shrinker
from loom.runtime.rpc import RpcServer
from loom.runtime.splitting import SplitDriver
from loom.runtime.tenancy import Tenancy
from loom.runtime.tls import TlsConfig, require_cluster_peer
from loom.shardmgr.autosplit import SplitParams
from loom.shardmgr.core import Announce, PersistEpoch, ShardManagerCore, ShardRecord, SmParams
from loom.shardmgr.locality import LocalityParams
from loom.shardmgr.metastore import Metastore
from loom.shardmgr.moves import MoverParams, plan_reshard
from loom.shardmgr.rebalance import BalanceParams
from loom.shardmgr.routing import (
    Keyspace,
    KeyspaceSpec,
    NodeInfo,
    NodeRoute,
    PlacementError,
    Quota,
    RoutingTable,
    ShardPlacement,
    ShardRoute,
    compact_ranges,
    place,
)

TICK_MS = 50.0
INPUTS_MAX = 10_000


class _Rng:
    """The core draws randomness only for chaos, which a real manager never enables."""

    def random(self) -> float:
        return 1.0

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        return start


_ENCODER = msgspec.msgpack.Encoder()
_RECORD = msgspec.msgpack.Decoder(ShardRecord)
T = TypeVar("T")
log = logging.getLogger("loom.sm")
ROUTING_PUSH_MS = 100.0
REBALANCE_MS = 1_000.0
RATE_MIN_S = 0.5  # between the two counts a rate is taken from
RATE_SMOOTHING = 0.5
# A node gets the table again after this long even when nothing changed (a lost push).
ROUTING_REPUSH_MS = 2_000.0
ROUTING_SETTLE_S = 2.0
ROUTING_SETTLE_POLL_S = 0.02
_FAILURE_KINDS: tuple[tuple[type[LoomError], FailureKind], ...] = (
    (InvalidArgument, "invalid"),
    (NotFound, "not_found"),
    (PermissionDenied, "permission"),
    (LoomError, "unavailable"),
)


def epoch_key(shard: int) -> str:
    return shard_record_key(shard)


def decode_record(value: bytes) -> ShardRecord:
    return _RECORD.decode(value)


def failure(error: LoomError) -> Failure:
    kind = next(k for cls, k in _FAILURE_KINDS if isinstance(error, cls))
    return Failure(kind=kind, message=str(error), retry_after_ms=error.retry_after_ms or 0)


class _Rate:
    """Commands per second of one p-shard, from its primary's cumulative counts."""

    def __init__(self) -> None:
        self.last: tuple[float, int] | None = None
        self.per_s = 0.0

    def add(self, count: int) -> None:
        now = time.monotonic()
        if self.last is not None and count >= self.last[1] and now - self.last[0] >= RATE_MIN_S:
            instant = (count - self.last[1]) / (now - self.last[0])
            self.per_s = RATE_SMOOTHING * instant + (1 - RATE_SMOOTHING) * self.per_s
        if self.last is None or now - self.last[0] >= RATE_MIN_S or count < self.last[1]:
            self.last = (now, count)


class ManagerRuntime:
    def __init__(
        self,
        *,
        metastore: Metastore,
        params: SmParams | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        leadership: EtcdLeadership | None = None,
        reshard_parallelism: int = 8,
        auth: bool = False,
        tls: TlsConfig | None = None,
        region: str = "",
        latency: LatencyMatrix | None = None,
        locality: LocalityParams | None = None,
        locality_period_s: float = DEFAULT_LOCALITY_PERIOD_S,
        balance: BalanceParams | None = None,
        split: SplitParams | None = None,
    ) -> None:
        self.tls = tls  # on the listener and to the nodes (ADR 0015)
        # This manager's region and the injected latency matrix (ADR 0013).
        self.region = region
        self.links = LinkDelays(latency, region)
        self.core = ShardManagerCore(params=params or SmParams(), rng=_Rng())
        # Rebalancing, hand-offs and tier moves (runtime/placement.py).
        self.placement = Placement(self, balance)
        # Tenants and tokens; with `auth`, every operator call needs a token (ADR 0008).
        self.tenancy = Tenancy(metastore, auth=auth)
        # The first admin token's secret, made when this manager first led with auth on
        # an empty catalog; printed once by `loom sm`, never stored.
        self.bootstrap_token: str | None = None
        self.token_made = asyncio.Event()  # set when this manager made that token
        # With several managers, this one acts only while it leads (etcd lease); it keeps
        # its node registry warm from reports meanwhile, so a takeover is quick.
        self.leadership = leadership
        self.leading = False
        self.deposed = asyncio.Event()
        self.metastore = metastore
        self.catalog = Catalog(metastore)
        self.host = host
        self.server = RpcServer(self._handle, host, port, tls=tls)
        self.inputs: asyncio.Queue[Callable[[Instant], None]] = asyncio.Queue(INPUTS_MAX)
        self.infos: dict[NodeId, NodeInfo] = {}
        self.outboxes: dict[NodeId, Outbound] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.stored_activation: dict[ShardId, Assignment] = {}
        self.keyspaces: dict[str, Keyspace] = {}
        self.shard_keyspace: dict[ShardId, str] = {}
        self.next_shard = 1
        self.admin_lock = asyncio.Lock()
        # Routing versions: (term, counter); the term orders tables across restarts.
        self.term = time.time_ns() // 1_000_000
        self.routing_counter = 0
        self.routing_content: object = None
        self.rates: dict[ShardId, _Rate] = {}
        self.stored_bytes: dict[NodeId, int] = {}
        self.shrinker = Shrinker(self)  # shrinking keyspaces (runtime/retirement.py)
        # μshard moves of `loom keyspace reshard` (runtime/resharding.py).
        self.resharder = Resharder(
            metastore=metastore,
            keyspace_of=self.keyspaces.get,
            primary_address=self._primary_address,
            install_mapping=self._install_mapping,
            params=MoverParams(moves_in_flight_max=reshard_parallelism),
            tls=tls,
            delay_for=self.links.delay_for,
            finish=self.shrinker.finish,
            is_ready=lambda shard: shard in self.core.shards and self.core.shards[shard].activated,
        )
        # Akkio placement: μshards of `mapping: akkio` keyspaces follow their accesses.
        self.locality = LocalityDriver(
            resharder=self.resharder,
            keyspaces=lambda: list(self.keyspaces.values()),
            keyspace_of_shard=self.shard_keyspace.get,
            primary_regions=self._primary_regions,
            allocate_move_ids=self.catalog.allocate_move_ids,
            lock=self.admin_lock,
            params=locality,
            period_s=locality_period_s,
        )
        # Growing hot keyspaces by themselves (runtime/splitting.py).
        self.splitting = SplitDriver(self, split or SplitParams())
        self.routing_seen: dict[NodeId, tuple[int, int]] = {}
        self.throttle_rates: dict[NodeId, _Rate] = {}

    async def start(self) -> None:
        """Serve at once; act as the manager now (one manager) or once elected."""
        await self.server.start()
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._run_core()))
        if self.leadership is None:
            await self._lead()
        else:
            self.tasks.append(loop.create_task(self._campaign(self.leadership)))

    async def _campaign(self, leadership: EtcdLeadership) -> None:
        await leadership.campaign(self.address)
        log.info("shard manager %s leads", self.address)
        await self._lead()
        await leadership.lost.wait()
        # Stop acting at once; the process exits and comes back as a standby.
        self.leading = False
        log.error("shard manager %s lost its leadership: %s", self.address, leadership.lost_reason)
        self.deposed.set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _lead(self) -> None:
        """Takes the state over from the metastore and starts deciding."""
        now = Instant(time.monotonic() * 1000)
        records, keyspaces, self.next_shard = await asyncio.to_thread(self._load)
        await asyncio.to_thread(self.tenancy.load)
        self.bootstrap_token = await asyncio.to_thread(self.tenancy.bootstrap)
        if self.bootstrap_token is not None:
            self.token_made.set()
        for shard, record in records:
            self.core.restore(shard, record, now)
            if record.activated:
                self.stored_activation[shard] = record.assignment
        self.term = time.time_ns() // 1_000_000
        self.leading = True
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._ticker()))
        self.tasks.append(loop.create_task(self._push_routing()))
        self.tasks.append(loop.create_task(self._rebalance()))
        self.tasks.append(loop.create_task(self.resharder.run()))
        self.tasks.append(loop.create_task(self.locality.run()))
        self.tasks.append(loop.create_task(self.splitting.run()))
        for keyspace_record in keyspaces:
            if keyspace_record.dropping:
                await self._finish_drop(keyspace_record.keyspace)
            else:
                await self._install(keyspace_record.keyspace)
        # After the keyspaces: resumed moves route by their mappings.
        self.resharder.restore(await asyncio.to_thread(self.resharder.load), now)
        self.shrinker.resume([r.keyspace for r in keyspaces if not r.dropping])

    @property
    def port(self) -> int:
        return self.server.port

    async def close(self) -> None:
        if self.leadership is not None:
            with contextlib.suppress(LoomError):
                await self.leadership.close()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.resharder.close()
        await self.server.close()

    # ---------------------------------------------------------------- inputs

    async def _handle(self, body: bytes) -> bytes:
        message = decode(body)
        if self.tls is not None:
            require_cluster_peer(message)
        if isinstance(message, NodeReportMessage):
            self._on_report(message)
            return b""
        if not self.leading:
            return encode(await self._standby_answer())
        try:
            match message:
                case ManagerEvent():
                    self.inputs.put_nowait(
                        lambda now: self.core.on_event(message.shard, message.event, now)
                    )
                case CreateKeyspace():
                    grant = self.tenancy.authorize(message.auth)
                    owner = self.tenancy.owner_for(grant, message.tenant)
                    keyspace = await self.create_keyspace(message.spec, tenant=owner)
                    return encode(KeyspaceReply(keyspace=keyspace))
                case DropKeyspace():
                    grant = self.tenancy.authorize(message.auth)
                    existing = self.keyspaces.get(message.name)
                    if existing is not None:
                        self.tenancy.check_reach(grant, message.name, existing.tenant)
                    await self.drop_keyspace(message.name)
                    return encode(Done())
                case ReshardKeyspace():
                    self.tenancy.authorize(message.auth, admin=True)
                    keyspace = await self.reshard_keyspace(message.name, message.shards)
                    return encode(KeyspaceReply(keyspace=keyspace))
                case TransferPrimaryCall():
                    self.tenancy.authorize(message.auth, admin=True)
                    primary, epoch = await self.placement.transfer_primary(
                        ShardId(message.shard), NodeId(message.to)
                    )
                    return encode(PrimaryMoved(shard=message.shard, primary=primary, epoch=epoch))
                case SetKeyspaceTier():
                    self.tenancy.authorize(message.auth, admin=True)
                    keyspace = await self.placement.set_tier(message.name, message.tier)
                    return encode(KeyspaceReply(keyspace=keyspace))
                case ReshardStatus():
                    self.tenancy.authorize(message.auth, admin=True)
                    return encode(self.shrinker.report(message.name))
                case SetQuota():
                    self.tenancy.authorize(message.auth, admin=True)
                    keyspace = await self.set_quota(message.name, message.quota)
                    await self.until_nodes_have_routing()
                    return encode(KeyspaceReply(keyspace=keyspace))
                case RoutingRequest():
                    self.tenancy.authorize(message.auth)
                    return encode(self.routing().for_clients())
                case StatusRequest():
                    self.tenancy.authorize(message.auth, admin=True)
                    return encode(self.status())
                case CreateTenant() | ListTenants() | CreateToken() | ListTokens() | RevokeToken():
                    answer = await tenancy_calls.answer(self.tenancy, self.admin_lock, message)
                    if isinstance(message, CreateToken | RevokeToken | CreateTenant):
                        await self.until_nodes_have_routing()
                    return encode(answer)
                case _:
                    raise BadMessage(f"the shard manager does not take {type(message).__name__}")
        except LoomError as error:
            return encode(failure(error))
        return b""

    async def _standby_answer(self) -> Failure:
        leader = None
        if self.leadership is not None:
            with contextlib.suppress(LoomError):
                leader = await self.leadership.leader()
        return Failure(
            kind="unavailable",
            message=f"shard manager {self.address} is a standby; the leader is {leader or '?'}",
            retry_after_ms=200,
        )

    def _on_report(self, message: NodeReportMessage) -> None:
        node = message.report.node
        if node != message.info.node:
            raise BadMessage("a report names two nodes")
        self.infos[node] = message.info
        self.links.set_region((message.info.host, message.info.port), message.info.region)
        self.locality.on_report(node, message.access)
        if node not in self.outboxes:
            outbound = self.outboxes[node] = Outbound(
                lambda: self._address(node), self.links.delay_for, tls=self.tls
            )
            self.tasks.append(asyncio.get_running_loop().create_task(outbound.run()))
        self.inputs.put_nowait(lambda now: self.core.on_report(message.report, now))
        if not self.leading:
            return
        self.stored_bytes[node] = message.report.stored_bytes
        self.routing_seen[node] = message.routing_version
        self.throttle_rates.setdefault(node, _Rate()).add(message.throttled)
        for progress in message.report.shards:
            shard = progress.shard
            if progress.is_primary:
                self.rates.setdefault(shard, _Rate()).add(progress.applied_commands)
                self.splitting.on_primary_report(shard, progress.stored_bytes)
            if shard not in self.core.shards and shard < self.next_shard:
                # A replica of a dropped shard (its node was away during the drop).
                self.outboxes[node].put(encode(DropShard(shard=shard)))

    def _address(self, node: NodeId) -> tuple[str, int]:
        info = self.infos[node]
        return info.host, info.port

    async def _in_core(self, apply: Callable[[Instant], T]) -> T:
        """Runs `apply` in the core's task and returns its result."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def run(now: Instant) -> None:
            try:
                result = apply(now)
            except LoomError as error:  # the caller's answer; the core task goes on
                if not future.done():
                    future.set_exception(error)
                return
            if not future.done():
                future.set_result(result)

        self.inputs.put_nowait(run)
        return await future

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_MS / 1000)
            with contextlib.suppress(asyncio.QueueFull):
                self.inputs.put_nowait(self.core.tick)

    # ---------------------------------------------------------------- keyspaces

    async def create_keyspace(self, spec: KeyspaceSpec, *, tenant: str = "") -> Keyspace:
        problem = spec.problem()
        if problem is not None:
            raise InvalidArgument(problem)
        async with self.admin_lock:
            existing = self.keyspaces.get(spec.name)
            if existing is not None:
                if existing.tenant != tenant:
                    raise PermissionDenied(
                        f"keyspace {spec.name!r} exists and belongs to another tenant"
                    )
                if existing.spec != spec:
                    raise InvalidArgument(f"keyspace {spec.name!r} exists with another spec")
                return existing
            placements = await self._in_core(lambda now: self._place(spec, now))
            ids = await asyncio.to_thread(self.catalog.allocate_shards, spec.shards)
            self.next_shard = max(self.next_shard, ids[-1] + 1)
            ranges = compact_ranges(spec.ushards, ids)
            ends = [first for first, _ in ranges[1:]] + [spec.ushards]
            keyspace = Keyspace(
                spec=spec,
                placements=tuple(
                    # Each p-shard is created owning its range (kvstate.ownership).
                    ShardPlacement(shard, p.acceptors, initial=((first, end),))
                    for shard, p, (first, _), end in zip(ids, placements, ranges, ends, strict=True)
                ),
                ranges=ranges,
                tenant=tenant,
            )
            record = await asyncio.to_thread(self.catalog.create, KeyspaceRecord(keyspace=keyspace))
            await self._install(record.keyspace)
            return record.keyspace

    def _place(self, spec: KeyspaceSpec, now: Instant) -> tuple[ShardPlacement, ...]:
        """In the core's task: acceptors for `spec.shards` new p-shards on live nodes."""
        live = [i for i in self.infos.values() if self.core.is_alive(i.node, now)]
        replicas: dict[NodeId, int] = {}
        primaries: dict[NodeId, int] = {}
        for state in self.core.shards.values():
            for member in state.current.config.members():
                replicas[member] = replicas.get(member, 0) + 1
            primaries[state.current.primary] = primaries.get(state.current.primary, 0) + 1
        placeholders = [ShardId(0)] * spec.shards
        try:
            return place(spec, placeholders, live, replicas, primaries)
        except PlacementError as error:
            # Nodes may still be starting: a retry can succeed.
            raise Unavailable(str(error), retry_after_ms=500) from None

    async def _install(self, keyspace: Keyspace) -> None:
        """Serves a stored keyspace and creates its p-shards that do not exist yet."""
        self.keyspaces[keyspace.name] = keyspace
        for placement in keyspace.placements:
            self.shard_keyspace[placement.shard] = keyspace.name

        def create_missing(now: Instant) -> None:
            for placement in keyspace.placements:
                if placement.shard not in self.core.shards:
                    self.core.create_shard(placement.shard, placement.acceptors, now)

        await self._in_core(create_missing)

    async def set_quota(self, name: str, quota: Quota) -> Keyspace:
        """Replaces a keyspace's quota; nodes get it with the next routing push."""
        problem = quota.problem()
        if problem is not None:
            raise InvalidArgument(problem)
        async with self.admin_lock:
            record = await asyncio.to_thread(self.catalog.set_quota, name, quota)
            if name in self.keyspaces:
                self.keyspaces[name] = record.keyspace
            return record.keyspace

    async def drop_keyspace(self, name: str) -> None:
        async with self.admin_lock:
            record = await asyncio.to_thread(self.catalog.mark_dropping, name)
            await self._finish_drop(record.keyspace)

    async def _finish_drop(self, keyspace: Keyspace) -> None:
        self.keyspaces.pop(keyspace.name, None)
        await self.drop_shards(keyspace.shards())
        await asyncio.to_thread(self.catalog.delete, keyspace.name)

    async def drop_shards(self, shards: tuple[ShardId, ...]) -> None:
        """Unassigns the p-shards' replicas and deletes their data on the nodes."""
        for shard in shards:
            members = await self._in_core(functools.partial(self._drop_shard, shard))
            await asyncio.to_thread(self.catalog.delete_shard_record, shard)
            self.stored_activation.pop(shard, None)
            self.shard_keyspace.pop(shard, None)
            for node in members:
                if node in self.outboxes:
                    self.outboxes[node].put(encode(DropShard(shard=shard)))

    def _drop_shard(self, shard: ShardId, _now: Instant) -> tuple[NodeId, ...]:
        return self.core.drop_shard(shard)

    # ---------------------------------------------------------------- resharding

    async def reshard_keyspace(self, name: str, shards: int) -> Keyspace:
        """Grows the keyspace to `shards` p-shards (new ones created owning nothing) and
        plans the μshard moves to the compact mapping over all of them; the moves run
        in `self.resharder`. Fewer p-shards: `self.shrinker` (runtime/retirement.py)."""
        async with self.admin_lock:
            keyspace = self.keyspaces.get(name)
            if keyspace is None:
                raise NotFound(f"no keyspace {name!r}")
            have = len(keyspace.placements)
            if shards < have or keyspace.retiring:
                return await self.shrinker.start(keyspace, shards)
            if shards > have:
                keyspace = await self._add_shards(keyspace, shards)
            goal = msgspec.structs.replace(
                keyspace, ranges=compact_ranges(keyspace.spec.ushards, keyspace.shards())
            )
            plan = plan_reshard(keyspace.mapping(), goal.mapping())
            count = max(1, self.resharder.ids_needed(name, plan))
            first = await asyncio.to_thread(self.catalog.allocate_move_ids, count)
            self.resharder.plan(name, plan, first)
            log.info("keyspace %s: resharding to %d p-shards, %d moves", name, shards, len(plan))
            return keyspace

    async def _add_shards(self, keyspace: Keyspace, shards: int) -> Keyspace:
        spec = msgspec.structs.replace(keyspace.spec, shards=shards)
        problem = spec.problem()
        if problem is not None:
            raise InvalidArgument(problem)
        extra = msgspec.structs.replace(spec, shards=shards - len(keyspace.placements))
        placements = await self._in_core(lambda now: self._place(extra, now))
        ids = await asyncio.to_thread(self.catalog.allocate_shards, extra.shards)
        self.next_shard = max(self.next_shard, ids[-1] + 1)
        grown = msgspec.structs.replace(
            keyspace,
            spec=spec,
            placements=keyspace.placements
            + tuple(
                ShardPlacement(shard, p.acceptors, initial=())
                for shard, p in zip(ids, placements, strict=True)
            ),
        )
        await asyncio.to_thread(self.catalog.replace, keyspace.name, keyspace, grown)
        await self._install(grown)
        return grown

    async def _install_mapping(self, name: str, ushard: UShard, shard: ShardId) -> None:
        """A committed move: store the next mapping version, then serve it."""
        async with self.admin_lock:
            keyspace = self.keyspaces.get(name)
            if keyspace is None:
                raise NotFound(f"no keyspace {name!r}")
            moved = keyspace.with_ushard(ushard, shard)
            await asyncio.to_thread(self.catalog.replace, name, keyspace, moved)
            self.keyspaces[name] = moved

    def _primary_address(self, shard: ShardId) -> tuple[str, int] | None:
        state = self.core.shards.get(shard)
        info = self.infos.get(state.current.primary) if state is not None else None
        return None if info is None else (info.host, info.port)

    def _primary_regions(self) -> dict[ShardId, str]:
        """The region of each activated p-shard's primary (the Akkio targets)."""
        regions = {}
        for shard, state in self.core.shards.items():
            info = self.infos.get(state.current.primary)
            if state.activated and info is not None:
                regions[shard] = info.region
        return regions

    def _initial_of(self, shard: ShardId) -> tuple[tuple[int, int], ...] | None:
        keyspace = self.keyspaces.get(self.shard_keyspace.get(shard, ""))
        placement = keyspace.placement(shard) if keyspace is not None else None
        return placement.initial if placement is not None else None

    # ---------------------------------------------------------------- placement

    async def _rebalance(self) -> None:
        """Replaces dead members and spreads replicas and primaries (one move at a time;
        `shardmgr.rebalance` decides, the core carries the move out)."""
        while True:
            await asyncio.sleep(REBALANCE_MS / 1000)
            await self._in_core(self._rebalance_once)

    def _rebalance_once(self, now: Instant) -> None:
        self.placement.rebalance_once(now)

    # ---------------------------------------------------------------- routing

    def routing(self) -> RoutingTable:
        """The current routing table; its version moves when its content changes."""
        now = Instant(time.monotonic() * 1000)
        keyspaces = tuple(self.keyspaces[name] for name in sorted(self.keyspaces))
        shards = tuple(
            ShardRoute(
                shard=shard,
                keyspace=self.shard_keyspace.get(shard, ""),
                epoch=int(state.current.epoch),
                primary=state.current.primary,
                acceptors=state.current.config.acceptors,
                followers=state.current.config.followers,
                ready=state.activated,
            )
            for shard, state in sorted(self.core.shards.items())
        )
        nodes = tuple(
            NodeRoute(info=self.infos[node], alive=self.core.is_alive(node, now))
            for node in sorted(self.infos)
        )
        tenants, tokens = self.tenancy.sorted_tenants(), self.tenancy.sorted_grants()
        content = (keyspaces, shards, nodes, tenants, tokens)
        if content != self.routing_content:
            self.routing_content = content
            self.routing_counter += 1
        version = (self.term, self.routing_counter)
        return RoutingTable(
            version=version,
            keyspaces=keyspaces,
            shards=shards,
            nodes=nodes,
            manager=f"{self.host}:{self.port}",
            manager_region=self.region,
            auth=self.tenancy.auth,
            tenants=tenants,
            tokens=tokens,
        )

    async def until_nodes_have_routing(self) -> None:
        """Until every live node reports the current routing table (or newer), at most
        ROUTING_SETTLE_S: then a new token works, a revoked one is refused and a quota
        is in force everywhere when the operator's call returns. A node that does not
        report in time (dying) gets the table with a later push."""
        version = self.routing().version
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ROUTING_SETTLE_S
        behind: list[NodeId] = []
        while loop.time() < deadline:
            now = Instant(time.monotonic() * 1000)
            behind = [
                n
                for n in sorted(self.infos)
                if self.core.is_alive(n, now) and self.routing_seen.get(n, (0, 0)) < version
            ]
            if not behind:
                return
            await asyncio.sleep(ROUTING_SETTLE_POLL_S)
        log.warning("nodes %s did not report routing table %s in time", behind, version)

    async def _push_routing(self) -> None:
        pushed: dict[NodeId, tuple[tuple[int, int], float]] = {}
        while True:
            await asyncio.sleep(ROUTING_PUSH_MS / 1000)
            table = self.routing()
            body = encode(RoutingPush(table=table))
            now = time.monotonic() * 1000
            for node, outbound in self.outboxes.items():
                version, at = pushed.get(node, ((0, 0), 0.0))
                if version != table.version or now - at >= ROUTING_REPUSH_MS:
                    outbound.put(body)
                    pushed[node] = (table.version, now)

    # ---------------------------------------------------------------- status

    def status(self) -> StatusReply:
        now = Instant(time.monotonic() * 1000)
        nodes = tuple(
            NodeStatus(
                node=node,
                address=f"{info.host}:{info.port}",
                alive=self.core.is_alive(node, now),
                incarnation=self.core.nodes[node].incarnation if node in self.core.nodes else 0,
                region=info.region,
                zone=info.zone,
                pid=info.pid,
                stored_bytes=self.stored_bytes.get(node, 0),
                throttled_per_s=(
                    round(self.throttle_rates[node].per_s, 1)
                    if node in self.throttle_rates
                    else 0.0
                ),
                tier=info.tier,
            )
            for node, info in sorted(self.infos.items())
        )
        shards = []
        for shard in sorted(self.core.shards):
            state = self.core.shards[shard]
            config = state.current.config
            progress = {}
            for member in config.members():
                report = self.core.nodes.get(member)
                seen = report.progress.get(shard) if report is not None else None
                if seen is not None:
                    progress[str(member)] = (int(seen.applied_seq), int(seen.commit_seq))
            shards.append(
                ShardStatus(
                    shard=shard,
                    keyspace=self.shard_keyspace.get(shard, ""),
                    epoch=int(state.current.epoch),
                    primary=state.current.primary,
                    activated=state.activated,
                    acceptors=config.acceptors,
                    followers=config.followers,
                    progress=progress,
                    ops_per_s=round(self.rates[shard].per_s, 1) if shard in self.rates else 0.0,
                    load_per_s=self.placement.load_of(shard),
                )
            )
        return StatusReply(nodes=nodes, shards=tuple(shards))

    # ---------------------------------------------------------------- the core

    async def _run_core(self) -> None:
        while True:
            apply = await self.inputs.get()
            apply(Instant(time.monotonic() * 1000))
            await self._drain_outputs()
            await self._persist_activations()

    async def _persist_activations(self) -> None:
        for shard in sorted(self.core.shards):
            record = self.core.record(shard)
            if record.activated and self.stored_activation.get(shard) != record.assignment:
                try:
                    await asyncio.to_thread(self._store_activation, shard, record)
                except LoomError as error:
                    log.warning("activation of p-shard %d not stored: %s", shard, error)
                    return  # tried again after the next input
                self.stored_activation[shard] = record.assignment

    async def _drain_outputs(self) -> None:
        while outputs := self.core.outputs():
            for output in outputs:
                if isinstance(output, PersistEpoch):
                    record = self.core.record(output.shard, output.assignment)
                    try:
                        stored = await asyncio.to_thread(
                            self._compare_and_swap_epoch, output, record
                        )
                    except LoomError as error:
                        # Not known to be stored: announce nothing; the core decides
                        # again from the old epoch, and the next CAS tells the truth.
                        log.warning("epoch of p-shard %d not stored: %s", output.shard, error)
                        stored = None
                    now = Instant(time.monotonic() * 1000)
                    self.core.epoch_persisted(
                        output.shard, output.assignment, stored=stored, now=now
                    )
                elif isinstance(output, Announce):
                    self._announce(output)

    def _compare_and_swap_epoch(
        self, output: PersistEpoch, record: ShardRecord
    ) -> ShardRecord | None:
        """Stores the new epoch only over the expected one; returns the record stored
        after. The CAS makes two managers unable to hand out the same epoch (PITFALLS 13)
        — provided the loser of a race goes on from the winner's whole record, not just
        its epoch number (the core compares the assignments)."""
        key = epoch_key(output.shard)
        current = self.metastore.get(key)
        stored = _RECORD.decode(current[0]) if current else None
        stored_epoch = stored.assignment.epoch if stored else Epoch(0)
        if stored_epoch != output.expected:
            log.info(
                "p-shard %d: epoch %d is already allocated (expected %d); going on from it",
                output.shard, stored_epoch, output.expected,
            )  # fmt: skip
            return stored
        revision = current[1] if current is not None else None
        result = self.metastore.compare_and_swap(key, revision, _ENCODER.encode(record))
        return _RECORD.decode(result.current[0]) if result.current is not None else None

    def _store_activation(self, shard: ShardId, record: ShardRecord) -> None:
        """Records that the stored epoch activated, unless the epoch moved on meanwhile."""
        key = epoch_key(shard)
        current = self.metastore.get(key)
        if current is None:
            return
        if _RECORD.decode(current[0]).assignment != record.assignment:
            return
        self.metastore.compare_and_swap(key, current[1], _ENCODER.encode(record))

    def _load(self) -> tuple[list[tuple[ShardId, ShardRecord]], list[KeyspaceRecord], int]:
        records = []
        for key, value, _revision in self.metastore.list("shards/"):
            shard = ShardId(int(key.split("/")[1]))
            records.append((shard, _RECORD.decode(value)))
        return records, self.catalog.keyspaces(), self.catalog.next_shard()

    def _announce(self, announce: Announce) -> None:
        members = announce.assignment.config.members()
        peers = tuple(
            PeerAddress(node=n, host=self.infos[n].host, port=self.infos[n].port)
            for n in members
            if n in self.infos
        )
        message = AssignMessage(
            shard=announce.shard,
            assignment=announce.assignment,
            peers=peers,
            initial=self._initial_of(announce.shard),
        )
        body = encode(message)
        for node in announce.to:
            outbound = self.outboxes.get(node)
            if outbound is not None:
                outbound.put(body)
