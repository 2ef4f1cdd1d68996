"""loom kv's asyncio client: routing, retries, typed errors (DESIGN §5).

How a request travels: key → μshard (stable hash of the shard key) → p-shard (the
keyspace's mapping in the cached routing table) → node (the primary, or the nearest
live replica for relaxed reads). Whatever goes wrong on the way is retried inside the
request's deadline: `NOT_PRIMARY` hints are followed, a failed node or an unknown
shard refreshes the routing table, overload backs off (exponential, full jitter).

A write keeps its request id (client id + sequence) across every retry, so the
replicated dedupe table applies it once however many times it is sent (PITFALLS 5);
the client's floor (every sequence below it is finished) travels with each write so
the table can forget. A write whose outcome stays unknown at its deadline raises
`OutcomeUnknown` (never re-run blindly a write that is not idempotent).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import math
import random
import secrets
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import msgspec

from loom.core.errors import (
    ConditionFailed,
    ConnectionFailed,
    InvalidArgument,
    LoomError,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    QuotaExceeded,
    Throttled,
    TransactionConflict,
    Unavailable,
)
from loom.core.hashing import ushard_of
from loom.core.ids import ClientId, NodeId, RequestId, RequestSeq, ShardId, UShard, Version
from loom.core.limits import DEFAULT_LIMITS
from loom.host.requests import (
    ClientReply,
    ClientRequest,
    Consistency,
    Durability,
    ErrorCode,
    ErrorReply,
    ReadReply,
    ReadRequest,
    ScanReply,
    ScanRequest,
    WriteReply,
    WriteRequest,
)
from loom.kv.options import QUORUM, STRONG, Page, ReadConsistency
from loom.kv.router import Address, Router
from loom.kv.transaction import Transaction
from loom.kvstate.commands import (
    Applied,
    Delete,
    Increment,
    Put,
    Result,
    WriteCommand,
    encode_command,
)
from loom.kvstate.reads import Item
from loom.runtime.codec import (
    AUTHENTICATED,
    ClientAnswer,
    ClientCall,
    CreateKeyspace,
    CreateTenant,
    CreateToken,
    Done,
    DropKeyspace,
    Failure,
    KeyspaceReply,
    ListTenants,
    ListTokens,
    NodeMessage,
    ReshardKeyspace,
    ReshardReport,
    ReshardStatus,
    RevokeToken,
    RoutingRequest,
    SetQuota,
    StatusReply,
    StatusRequest,
    TenantsReply,
    TokenInfo,
    TokenReply,
    TokensReply,
    decode,
    encode,
)
from loom.runtime.latency import LatencyMatrix, client_links
from loom.runtime.rpc import CallTimedOut, ConnectionLost, Overloaded, RpcClient, RpcLimits
from loom.runtime.tls import TlsConfig
from loom.shardmgr.routing import Keyspace as KeyspaceInfo
from loom.shardmgr.routing import KeyspaceSpec, Quota, RoutingTable
from loom.shardmgr.shrink import goal_ranges
from loom.shardmgr.tenancy import TOKEN_CHARS_MAX, Tenant, tenant_problem

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 10.0
# `reshard_keyspace` gives up waiting when no μshard arrived for this long.
RESHARD_STALL_S = 30.0
# One attempt waits at most this long before the client looks elsewhere (a paused
# primary must not hold a request for the whole deadline).
ATTEMPT_TIMEOUT_S = 1.5
BACKOFF_BASE_S = 0.01
BACKOFF_MAX_S = 0.5
ROUTING_TIMEOUT_S = 2.0
KEYSPACE_READY_TIMEOUT_S = 30.0
TTL_S_MAX = 10 * 365 * 24 * 3600
INT64 = 2**63
_CLIENT_LIMITS = RpcLimits(io_timeout_s=2.0)

Target = Literal["primary", "nearest"]


def parse_seeds(addresses: str | Sequence[str]) -> list[Address]:
    """`"host:port"`, `"h1:p1,h2:p2"` or a list of them (the manager and/or any nodes)."""
    texts = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    seeds = []
    for text in (t.strip() for t in texts):
        host, sep, port = text.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()):
            raise InvalidArgument(f"{text!r} is not HOST:PORT")
        if not 0 < int(port) < 65536:
            raise InvalidArgument(f"{text!r} is not HOST:PORT")
        seeds.append((host, int(port)))
    if not seeds:
        raise InvalidArgument("no address to connect to")
    return seeds


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_bytes(name: str, value: object, bytes_max: int) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidArgument(f"{name} must be bytes, not {type(value).__name__}")
    if len(value) > bytes_max:
        raise InvalidArgument(f"{name} of {len(value)} bytes is over the limit of {bytes_max}")
    return value


def _check_key(name: str, value: object) -> bytes:
    return _check_bytes(name, value, DEFAULT_LIMITS.key_bytes_max)


def _check_consistency(consistency: object) -> None:
    if not isinstance(consistency, ReadConsistency):
        raise InvalidArgument("consistency must be kv.STRONG, kv.bounded(ms), ...")


def _result(result: Result) -> Applied:
    """The applied result, or the typed error a rejection means."""
    if isinstance(result, Applied):
        return result
    match result.reason:
        case "condition":
            raise ConditionFailed(
                result.message + (f" (current version {result.current})" if result.current else "")
            )
        case "conflict" | "epoch" | "horizon":
            raise TransactionConflict(result.message)
        case _:
            raise InvalidArgument(result.message)


def _backoff_delay(attempt: int, retry_after_ms: int) -> float:
    """Seconds before retry `attempt`: exponential backoff with full jitter, at least the
    server's retry-after."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(attempt, 16))
    return max(retry_after_ms / 1000, random.uniform(0, ceiling))


def _raise_failure(failure: Failure) -> None:
    error: type[LoomError] = {
        "invalid": InvalidArgument,
        "not_found": NotFound,
        "permission": PermissionDenied,
    }.get(failure.kind, Unavailable)
    raise error(failure.message, retry_after_ms=failure.retry_after_ms or None)


class _RequestIds:
    """Request ids of this client and its floor: every sequence below it is finished."""

    def __init__(self) -> None:
        self.client = ClientId(secrets.token_hex(8))
        self._next = itertools.count(1)
        self._open: list[int] = []  # a heap; finished ones are dropped lazily
        self._finished: set[int] = set()

    def open(self) -> RequestId:
        seq = next(self._next)
        heapq.heappush(self._open, seq)
        return RequestId(self.client, RequestSeq(seq))

    def finish(self, request: RequestId) -> None:
        self._finished.add(request.seq)
        while self._open and self._open[0] in self._finished:
            self._finished.discard(heapq.heappop(self._open))

    def floor(self) -> RequestSeq:
        return RequestSeq(self._open[0]) if self._open else RequestSeq(0)


@dataclass(slots=True, kw_only=True)
class _Attempts:
    """What one request's attempts learned so far."""

    target: Target
    is_write: bool
    hint: NodeId | None = None
    uncertain: bool = False  # a write attempt got no definite answer
    overloaded: bool = False
    throttled: bool = False  # the last attempt was over a quota (THROTTLED)
    problem: str = "no attempt"
    retry_after_ms: int = 0


class Client:
    """A connection to a loom kv cluster. Make one with `connect()`; share it freely
    among tasks of one event loop; `close()` it (or use `async with`)."""

    def __init__(
        self,
        seeds: Sequence[Address],
        *,
        token: str | None = None,
        region: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tls: TlsConfig | None = None,
        latency: str | LatencyMatrix | None = None,
    ) -> None:
        if not math.isfinite(timeout_s) or not 0 < timeout_s <= 3600:
            raise InvalidArgument(f"timeout_s must be in (0, 3600], not {timeout_s!r}")
        if token is not None and (not isinstance(token, str) or not token):
            raise InvalidArgument("token must be a non-empty str (or None)")
        if token is not None and len(token) > TOKEN_CHARS_MAX:
            raise InvalidArgument(f"token of {len(token)} characters is over {TOKEN_CHARS_MAX}")
        # Sent with every request; checked by the nodes and the manager when the cluster
        # runs with auth (ADR 0008).
        self.token = token
        self.timeout_s = timeout_s
        self.tls = tls  # ADR 0015: TLS to every node and manager, verified by tls.ca
        # Requests a keyspace's quota throttled at least once (even if a retry then
        # succeeded), per keyspace: back-pressure for whoever drives this client.
        self.throttled_requests: collections.Counter[str] = collections.Counter()
        self.router = Router(seeds, self._fetch_routing, region=region)
        # Injected inter-region latency (ADR 0013): `latency=`, else $LOOM_LATENCY.
        self.links = client_links(latency, region)
        self.router.on_install = self.links.learn
        # The node that answered this client's last successful request.
        self.answered_by: NodeId | None = None
        self.ids = _RequestIds()
        self._tokens = itertools.count(1)
        self._connections: dict[Address, RpcClient] = {}
        self._connecting: dict[Address, asyncio.Task[RpcClient]] = {}
        # The highest version this client wrote per p-shard (READ_YOUR_WRITES).
        self._written: dict[ShardId, Version] = {}
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        for task in self._connecting.values():
            task.cancel()
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            await connection.close()

    # ---------------------------------------------------------------- operators

    async def create_keyspace(
        self,
        name: str,
        *,
        shards: int = 1,
        replication: int = 3,
        ushards: int = 4096,
        tier: str = "wildcard",
        regions: Sequence[str] = (),
        tenant: str | None = None,
        mapping: str = "compact",
    ) -> KeyspaceInfo:
        """Create a keyspace (the same spec again is a no-op) and wait until every one
        of its p-shards has an active primary. It belongs to the tenant of the client's
        token; an admin token may name another `tenant`."""
        spec = KeyspaceSpec(
            name=name,
            shards=shards,
            replication=replication,
            ushards=ushards,
            tier=tier,
            regions=tuple(regions),
            mapping=mapping,
        )
        problem = spec.problem()
        if problem is not None:
            raise InvalidArgument(problem)
        if tenant is not None and not isinstance(tenant, str):
            raise InvalidArgument("tenant must be a str")
        reply = await self._admin_retrying(CreateKeyspace(spec=spec, tenant=tenant or ""))
        if not isinstance(reply, KeyspaceReply):
            raise Unavailable(f"the shard manager answered {type(reply).__name__}")
        await self._until_ready(reply.keyspace)
        return reply.keyspace

    async def _until_ready(self, keyspace: KeyspaceInfo) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + KEYSPACE_READY_TIMEOUT_S
        while True:
            await self.router.refresh(force=True)
            routes = [self.router.shard(s) for s in keyspace.shards()]
            if all(r is not None and r.ready for r in routes):
                return
            if loop.time() > deadline:
                raise Unavailable(
                    f"keyspace {keyspace.name!r} was created but not all of its p-shards "
                    f"have an active primary after {KEYSPACE_READY_TIMEOUT_S:g} s"
                )
            await asyncio.sleep(0.05)

    async def reshard_keyspace(
        self,
        name: str,
        *,
        shards: int,
        wait: bool = True,
        progress: Callable[[int, int], None] | None = None,
        report: Callable[[ReshardReport], None] | None = None,
    ) -> KeyspaceInfo:
        """Grow or shrink keyspace `name` to `shards` p-shards by moving μshards live
        (docs/protocols/resharding.md). With `wait`, returns once every μshard is on
        the p-shard the compact mapping over the p-shards that stay gives it and a
        shrink has retired the others; `progress(done, total)` is called as μshards
        arrive, `report` at the end with the reshard's longest write pauses."""
        if shards < 1:
            raise InvalidArgument(f"shards must be at least 1, not {shards}")
        reply = await self._admin_retrying(ReshardKeyspace(name=name, shards=shards))
        if not isinstance(reply, KeyspaceReply):
            raise Unavailable(f"the shard manager answered {type(reply).__name__}")
        await self._until_ready(reply.keyspace)
        if not wait:
            return reply.keyspace
        await self._until_resharded(name, progress)
        # The mapping is final; the last sources drop their copies (and a shrink
        # retires its p-shards): done when the manager has nothing left.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESHARD_STALL_S
        status = await self.reshard_status(name)
        while status.moves_left or status.retiring:
            if loop.time() > deadline:
                raise Unavailable(
                    f"resharding {name!r}: {status.moves_left} moves left and p-shards "
                    f"{list(status.retiring)} still retiring after {RESHARD_STALL_S:g} s"
                )
            await asyncio.sleep(0.1)
            status = await self.reshard_status(name)
        if report is not None:
            report(status)
        await self.router.refresh(force=True)
        return self.router.keyspace(name)

    async def reshard_status(self, name: str) -> ReshardReport:
        """How keyspace `name`'s reshard goes: moves left, p-shards still retiring, and
        each moved μshard's longest write pause (ms) in the current or last reshard."""
        reply = await self._admin_retrying(ReshardStatus(name=name))
        if not isinstance(reply, ReshardReport):
            raise Unavailable(f"the shard manager answered {type(reply).__name__}")
        return reply

    async def _until_resharded(
        self, name: str, progress: Callable[[int, int], None] | None
    ) -> KeyspaceInfo:
        loop = asyncio.get_running_loop()
        last_placed, last_change = -1, loop.time()
        while True:
            await self.router.refresh(force=True)
            keyspace = self.router.keyspace(name)
            goal = goal_ranges(keyspace)
            placed = sum(
                1 for u in range(keyspace.spec.ushards) if keyspace.shard_of(u) == _owner(goal, u)
            )
            if progress is not None:
                progress(placed, keyspace.spec.ushards)
            if placed == keyspace.spec.ushards and not keyspace.retiring:
                return keyspace
            if placed != last_placed:
                last_placed, last_change = placed, loop.time()
            elif loop.time() - last_change > RESHARD_STALL_S:
                raise Unavailable(
                    f"resharding {name!r} made no progress for {RESHARD_STALL_S:g} s "
                    f"({placed} of {keyspace.spec.ushards} μshards placed)"
                )
            await asyncio.sleep(0.1)

    async def drop_keyspace(self, name: str) -> None:
        """Delete a keyspace and all its data."""
        reply = await self._admin(DropKeyspace(name=name))
        if not isinstance(reply, Done):
            raise Unavailable(f"the shard manager answered {type(reply).__name__}")
        await self.router.refresh(force=True)

    async def set_quota(
        self,
        name: str,
        *,
        reads_per_s: float | None = None,
        writes_per_s: float | None = None,
        bytes_max: int | None = None,
    ) -> KeyspaceInfo:
        """Set keyspace `name`'s cluster-wide quota; a limit left out (None) is
        unlimited. Returns once every live node enforces its share (at most ~2 s)."""
        for label, rate in (("reads_per_s", reads_per_s), ("writes_per_s", writes_per_s)):
            if rate is not None and not _is_number(rate):
                raise InvalidArgument(f"{label} must be a number, not {type(rate).__name__}")
        if bytes_max is not None and not _is_int(bytes_max):
            raise InvalidArgument(f"bytes_max must be an int, not {type(bytes_max).__name__}")
        quota = Quota(
            reads_per_s=None if reads_per_s is None else float(reads_per_s),
            writes_per_s=None if writes_per_s is None else float(writes_per_s),
            bytes_max=bytes_max,
        )
        problem = quota.problem()
        if problem is not None:
            raise InvalidArgument(problem)
        reply = await self._admin(SetQuota(name=name, quota=quota))
        if not isinstance(reply, KeyspaceReply):
            raise Unavailable(f"the shard manager answered {type(reply).__name__}")
        await self.router.refresh(force=True)
        return reply.keyspace

    async def create_tenant(self, name: str, *, weight: int = 1) -> Tenant:
        """Create a tenant (admin); `weight`: its share under contention."""
        problem = tenant_problem(name, weight)
        if problem is not None:
            raise InvalidArgument(problem)
        reply = await self._admin(CreateTenant(tenant=Tenant(name=name, weight=weight)))
        if not isinstance(reply, TenantsReply):
            raise Unavailable(f"the shard manager answered {type(reply).__name__}")
        return next(t for t in reply.tenants if t.name == name)

    async def tenants(self) -> list[Tenant]:
        """Every tenant (admin)."""
        reply = await self._admin(ListTenants())
        if not isinstance(reply, TenantsReply):
            raise Unavailable(f"the shard manager answered {type(reply).__name__}")
        return list(reply.tenants)

    async def create_token(self, tenant: str, *, admin: bool = False) -> TokenReply:
        """A new token for `tenant` (admin). `.secret` is shown now and never again:
        the cluster keeps only its hash."""
        if not isinstance(tenant, str) or not isinstance(admin, bool):
            raise InvalidArgument("tenant must be a str and admin a bool")
        reply = await self._admin(CreateToken(tenant=tenant, admin=admin))
        if not isinstance(reply, TokenReply):
            raise Unavailable(f"the shard manager answered {type(reply).__name__}")
        return reply

    async def tokens(self) -> list[TokenInfo]:
        """Every token's id, tenant and role (admin); never a secret."""
        reply = await self._admin(ListTokens())
        if not isinstance(reply, TokensReply):
            raise Unavailable(f"the shard manager answered {type(reply).__name__}")
        return list(reply.tokens)

    async def revoke_token(self, token_id: str) -> None:
        """Delete a token (admin); returns once every live node refuses it."""
        if not isinstance(token_id, str):
            raise InvalidArgument("token_id must be a str")
        reply = await self._admin(RevokeToken(token_id=token_id))
        if not isinstance(reply, Done):
            raise Unavailable(f"the shard manager answered {type(reply).__name__}")

    async def keyspaces(self) -> list[KeyspaceInfo]:
        await self.router.refresh(force=True)
        return list(self.router.table.keyspaces)

    async def routing(self) -> RoutingTable:
        await self.router.refresh(force=True)
        return self.router.table

    async def transfer_primary(self, shard: int, to: str) -> tuple[str, int]:
        """Hand the primary of p-shard `shard` to its acceptor `to`, gracefully (admin):
        returns (primary, epoch) once `to` serves."""
        from loom.kv import placement  # noqa: PLC0415 - the admin calls live there

        moved = await placement.transfer_primary(self, shard, to)
        return moved.primary, moved.epoch

    async def set_keyspace_tier(
        self,
        name: str,
        tier: str,
        *,
        wait: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> KeyspaceInfo:
        """Move keyspace `name` to the nodes of `tier`, live (admin). With `wait`,
        returns once every member is on the tier; `progress(on_tier, members)`."""
        from loom.kv import placement  # noqa: PLC0415 - the admin calls live there

        return await placement.set_keyspace_tier(self, name, tier, wait=wait, progress=progress)

    async def status(self) -> StatusReply:
        reply = await self._admin(StatusRequest())
        if not isinstance(reply, StatusReply):
            raise Unavailable(f"the shard manager answered {type(reply).__name__}")
        return reply

    def keyspace(self, name: str) -> Keyspace:
        """A handle on keyspace `name` (checked at its first request)."""
        return Keyspace(self, name)

    async def _admin_retrying(self, message: NodeMessage) -> NodeMessage:
        """`_admin`, again while the manager answers `Unavailable` (e.g. nodes still
        starting), until the client's timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        for attempt in itertools.count(1):
            try:
                return await self._admin(message)
            except Unavailable as error:
                if loop.time() + (error.retry_after_ms or 0) / 1000 > deadline:
                    raise
                await self._backoff(attempt, deadline, error.retry_after_ms or 0)
        raise AssertionError("unreachable")

    async def _admin(self, message: NodeMessage) -> NodeMessage:
        """An operator call to the shard manager (from the routing table, else the seeds)."""
        if self.router.manager() is None:
            with contextlib.suppress(LoomError):
                await self.router.refresh()
        manager = self.router.manager()
        candidates = [manager] if manager is not None else []
        candidates += [s for s in self.router.seeds if s != manager]
        problems = []
        for address in candidates:
            try:
                reply = await self._call(address, message, timeout_s=self.timeout_s)
            except (ConnectionLost, CallTimedOut) as error:
                problems.append(str(error))
                continue
            if isinstance(reply, Failure):
                if reply.kind == "unavailable":  # a node or a standby manager: ask on
                    problems.append(reply.message)
                    continue
                _raise_failure(reply)
            if isinstance(reply, ClientAnswer):
                continue
            return reply
        raise Unavailable("no shard manager answered: " + "; ".join(problems))

    # ---------------------------------------------------------------- plumbing

    async def _fetch_routing(self, address: Address) -> RoutingTable:
        reply = await self._call(address, RoutingRequest(), timeout_s=ROUTING_TIMEOUT_S)
        if isinstance(reply, Failure):
            _raise_failure(reply)
        if not isinstance(reply, RoutingTable):
            raise Unavailable(f"{address} answered {type(reply).__name__} to a routing request")
        return reply

    async def _connection(self, address: Address) -> RpcClient:
        connection = self._connections.get(address)
        if connection is not None:
            return connection
        task = self._connecting.get(address)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                RpcClient.connect(
                    *address,
                    limits=_CLIENT_LIMITS,
                    tls=self.tls,
                    delay=self.links.delay_for(address),
                )
            )
            self._connecting[address] = task
        try:
            connection = await asyncio.shield(task)
        finally:
            if self._connecting.get(address) is task and task.done():
                del self._connecting[address]
        if self._closed:
            await connection.close()
            raise Unavailable("the client is closed")
        self._connections.setdefault(address, connection)
        return self._connections[address]

    async def _call(
        self, address: Address, message: NodeMessage, *, timeout_s: float
    ) -> NodeMessage:
        if self._closed:
            raise Unavailable("the client is closed")
        if self.token is not None and isinstance(message, AUTHENTICATED):
            message = msgspec.structs.replace(message, auth=self.token)
        connection = await self._connection(address)
        try:
            body = await connection.call(encode(message), timeout_s=timeout_s)
        except (ConnectionLost, ConnectionFailed):
            if self._connections.get(address) is connection:
                del self._connections[address]
            await connection.close()
            raise
        return decode(body)

    async def request(
        self,
        keyspace: str,
        ushard: UShard,
        build: Callable[[int], ClientRequest],
        *,
        target: Target,
        is_write: bool,
    ) -> ClientReply:
        """Sends a request to the p-shard owning `ushard` until it gets a definite answer
        or the deadline passes. `build(token)` makes the request for one attempt."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        state = _Attempts(target=target, is_write=is_write)
        for attempt in itertools.count():
            if attempt:
                delay = _backoff_delay(attempt, state.retry_after_ms)
                if state.throttled and loop.time() + delay >= deadline:
                    break  # the retry would not fit in the deadline: the caller hears it now
                await asyncio.sleep(max(0.0, min(delay, deadline - loop.time())))
                state.retry_after_ms = 0
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            was_throttled = state.throttled
            reply = await self._attempt(keyspace, ushard, build, state, remaining)
            if state.throttled and not was_throttled:
                self.throttled_requests[keyspace] += 1
            if reply is not None:
                return reply
        message = f"gave up after {self.timeout_s:g} s: {state.problem}"
        if state.uncertain:
            raise OutcomeUnknown(message + "; the write may or may not have been applied")
        if state.throttled:
            # The caller (e.g. the functions platform's back-pressure) needs this one.
            raise Throttled(state.problem, retry_after_ms=max(1, state.retry_after_ms))
        raise (Throttled if state.overloaded else Unavailable)(message)

    async def _attempt(
        self,
        keyspace: str,
        ushard: UShard,
        build: Callable[[int], ClientRequest],
        state: _Attempts,
        remaining: float,
    ) -> ClientReply | None:
        """One try; the reply, or None after noting in `state` what to do next."""
        shard, node = await self._route(keyspace, ushard, state.target, state.hint)
        state.hint = None
        address = self.router.address(node) if node is not None else None
        if shard is None or address is None:
            state.problem = f"no route to μshard {ushard} of {keyspace!r}"
            await self._refresh_quietly()
            return None
        state.overloaded = state.throttled = False
        try:
            answer = await self._call(
                address,
                ClientCall(
                    shard=shard,
                    request=build(next(self._tokens)),
                    region=self.router.region or "",
                    ushard=ushard,
                ),
                timeout_s=min(remaining, ATTEMPT_TIMEOUT_S),
            )
        except Overloaded as error:
            state.problem, state.overloaded = str(error), True
            state.retry_after_ms = error.retry_after_ms or 0
            return None
        except (ConnectionLost, CallTimedOut) as error:
            state.uncertain |= state.is_write
            state.problem = f"node {node}: {error}"
            state.target = "primary"
            await self._refresh_quietly()
            return None
        if isinstance(answer, Failure):
            _raise_failure(answer)
        if not isinstance(answer, ClientAnswer):
            raise Unavailable(f"node {node} answered {type(answer).__name__}")
        if not isinstance(answer.reply, ErrorReply):
            self.answered_by = node
            return answer.reply
        await self._on_refusal(answer.reply, node, state)
        return None

    async def _on_refusal(self, reply: ErrorReply, node: NodeId | None, state: _Attempts) -> None:
        state.problem = f"node {node}: {reply.code.value} {reply.message}".rstrip()
        state.retry_after_ms = reply.retry_after_ms
        match reply.code:
            case ErrorCode.INVALID:
                raise InvalidArgument(reply.message or "invalid request")
            case ErrorCode.NOT_PRIMARY:
                state.hint = reply.primary_hint if reply.primary_hint != node else None
                if state.hint is None:
                    await self._refresh_quietly()
            case ErrorCode.TOO_STALE:
                state.target = "primary"
            case ErrorCode.TIMEOUT:
                state.uncertain |= state.is_write
            case ErrorCode.OVERLOADED:
                state.overloaded = True
            case ErrorCode.MOVED:
                # The μshard moved or is moving (docs/protocols/resharding.md): fetch the
                # routing table again; the retry goes where its mapping points.
                state.hint = None
                await self._refresh_quietly()
            case ErrorCode.THROTTLED:
                state.throttled = True
            case ErrorCode.PERMISSION_DENIED:
                raise PermissionDenied(reply.message or "the token does not reach this keyspace")
            case ErrorCode.QUOTA_EXCEEDED:
                raise QuotaExceeded(reply.message or "over the keyspace's stored-bytes quota")
            case ErrorCode.NOT_READY | ErrorCode.NOT_APPLIED:
                pass

    async def _route(
        self, keyspace: str, ushard: UShard, target: Target, hint: NodeId | None
    ) -> tuple[ShardId | None, NodeId | None]:
        if not self.router.has_keyspace(keyspace):
            await self.router.refresh(force=True)
        info = self.router.keyspace(keyspace)  # NotFound if it does not exist
        if not 0 <= ushard < info.spec.ushards:
            raise InvalidArgument(f"μshard {ushard} out of range for {keyspace!r}")
        shard = info.shard_of(ushard)
        if hint is not None:
            return shard, hint
        node = self.router.primary(shard) if target == "primary" else self.router.nearest(shard)
        return shard, node

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(LoomError):
            await self.router.refresh()

    async def _backoff(self, attempt: int, deadline: float, retry_after_ms: int) -> None:
        delay = _backoff_delay(attempt, retry_after_ms)
        remaining = deadline - asyncio.get_running_loop().time()
        await asyncio.sleep(max(0.0, min(delay, remaining)))

    # ---------------------------------------------------------------- writes

    async def write(
        self,
        keyspace: str,
        ushard: UShard,
        make: Callable[[RequestId, RequestSeq], WriteCommand],
        durability: Durability = QUORUM,
    ) -> Applied:
        request = self.ids.open()
        try:
            command = encode_command(make(request, self.ids.floor()))
            reply = await self.request(
                keyspace,
                ushard,
                lambda token: WriteRequest(token=token, command=command, durability=durability),
                target="primary",
                is_write=True,
            )
        finally:
            self.ids.finish(request)
        if not isinstance(reply, WriteReply):
            raise Unavailable(f"a write was answered with {type(reply).__name__}")
        applied = _result(reply.result)
        self._note_written(keyspace, ushard, applied.version)
        return applied

    def _note_written(self, keyspace: str, ushard: UShard, version: Version) -> None:
        shard = self.router.keyspace(keyspace).shard_of(ushard)
        current = self._written.get(shard)
        # A replica serves READ_YOUR_WRITES from applied seq ≥ min_version.seq: keep the
        # highest seq. Not the highest version: μshards of one p-shard can be in
        # different generations after moves (docs/protocols/resharding.md).
        if current is None or version.seq > current.seq:
            self._written[shard] = version

    def written(self, keyspace: str, ushard: UShard) -> Version | None:
        return self._written.get(self.router.keyspace(keyspace).shard_of(ushard))


class Keyspace:
    """Reads and writes of one keyspace. Every method takes an optional `shard_key`:
    keys with the same shard key share a μshard (scans and transactions need that)."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    async def _ushard(self, key: bytes, shard_key: bytes | None) -> UShard:
        if not self.client.router.has_keyspace(self.name):
            await self.client.router.refresh(force=True)
        info = self.client.router.keyspace(self.name)
        routing_key = _check_key("shard_key", shard_key) if shard_key is not None else key
        return ushard_of(routing_key, info.spec.ushards)

    async def put(
        self,
        key: bytes,
        value: bytes,
        *,
        shard_key: bytes | None = None,
        durability: Durability = QUORUM,
        if_absent: bool = False,
        if_version: Version | None = None,
        if_value: bytes | None = None,
        ttl_s: float | None = None,
    ) -> Version:
        """Store `value` under `key`; returns the write's version. Conditions are checked
        on the server: `ConditionFailed` if one does not hold (nothing written)."""
        key = _check_key("key", key)
        value = _check_bytes("value", value, DEFAULT_LIMITS.value_bytes_max)
        if if_value is not None:
            _check_bytes("if_value", if_value, DEFAULT_LIMITS.value_bytes_max)
        if if_version is not None and not isinstance(if_version, Version):
            raise InvalidArgument("if_version must be a Version returned by put/get")
        if not isinstance(durability, Durability):
            raise InvalidArgument("durability must be kv.QUORUM or kv.FAST_ACK")
        ttl_ms = None
        if ttl_s is not None:
            if not _is_number(ttl_s) or not 0 < ttl_s <= TTL_S_MAX:
                raise InvalidArgument(f"ttl_s must be in (0, {TTL_S_MAX}], not {ttl_s!r}")
            ttl_ms = max(1, math.ceil(ttl_s * 1000))
        ushard = await self._ushard(key, shard_key)

        def make(request: RequestId, floor: RequestSeq) -> Put:
            return Put(
                request=request,
                ushard=ushard,
                key=key,
                value=value,
                if_absent=if_absent,
                if_version=if_version,
                if_value=if_value,
                ttl_ms=ttl_ms,
                client_floor=floor,
            )

        applied = await self.client.write(self.name, ushard, make, durability)
        return applied.version

    async def get(
        self, key: bytes, *, shard_key: bytes | None = None, consistency: ReadConsistency = STRONG
    ) -> Item | None:
        """The key's live value, or None."""
        key = _check_key("key", key)
        reply = await self._read(await self._ushard(key, shard_key), key, consistency)
        return reply.item

    async def get_many(
        self,
        keys: Sequence[bytes],
        *,
        shard_key: bytes | None = None,
        consistency: ReadConsistency = STRONG,
    ) -> list[Item | None]:
        """Each key's live value or None, in order. One request per μshard (and per
        `Limits.read_keys_max` keys), all sent at once; the keys of one request are read
        at one point, different requests' are not (a transaction reads one snapshot)."""
        if len(keys) > DEFAULT_LIMITS.scan_items_max:
            raise InvalidArgument(f"get_many takes at most {DEFAULT_LIMITS.scan_items_max} keys")
        checked = [_check_key("key", key) for key in keys]
        by_ushard: dict[UShard, list[bytes]] = {}
        for key in dict.fromkeys(checked):
            by_ushard.setdefault(await self._ushard(key, shard_key), []).append(key)
        step = DEFAULT_LIMITS.read_keys_max
        requests = [
            (ushard, group[i : i + step])
            for ushard, group in by_ushard.items()
            for i in range(0, len(group), step)
        ]
        replies = await asyncio.gather(
            *(self._read(u, chunk[0], consistency, also=tuple(chunk[1:])) for u, chunk in requests)
        )
        found = {
            key: got.item
            for (_, chunk), reply in zip(requests, replies, strict=True)
            for key, got in zip(chunk, reply.reads(), strict=True)
        }
        return [found[key] for key in checked]

    async def _read(
        self,
        ushard: UShard,
        key: bytes,
        consistency: ReadConsistency,
        *,
        also: tuple[bytes, ...] = (),
    ) -> ReadReply:
        reply = await self._read_like(
            ushard,
            consistency,
            lambda token, min_version: ReadRequest(
                token=token,
                ushard=ushard,
                key=key,
                consistency=consistency.kind,
                bound_ms=consistency.bound_ms,
                min_version=min_version,
                also=also,
            ),
        )
        if not isinstance(reply, ReadReply):
            raise Unavailable(f"a read was answered with {type(reply).__name__}")
        if len(reply.also) != len(also):
            raise Unavailable("the node does not read several keys in one request (too old)")
        return reply

    async def _read_like(
        self,
        ushard: UShard,
        consistency: ReadConsistency,
        build: Callable[[int, Version | None], ClientRequest],
    ) -> ClientReply:
        """A read or scan: STRONG at the primary, relaxed at the nearest replica; the
        client's last write to the p-shard is the floor for READ_YOUR_WRITES."""
        _check_consistency(consistency)
        min_version = self.client.written(self.name, ushard)
        return await self.client.request(
            self.name,
            ushard,
            lambda token: build(token, min_version),
            target="primary" if consistency.kind is Consistency.STRONG else "nearest",
            is_write=False,
        )

    async def delete(
        self,
        key: bytes,
        *,
        shard_key: bytes | None = None,
        if_exists: bool = False,
        if_version: Version | None = None,
        durability: Durability = QUORUM,
    ) -> bool:
        """Delete `key`; True if a live value was deleted. `if_exists`: `ConditionFailed`
        when there is none."""
        key = _check_key("key", key)
        ushard = await self._ushard(key, shard_key)

        def make(request: RequestId, floor: RequestSeq) -> Delete:
            return Delete(
                request=request,
                ushard=ushard,
                key=key,
                if_exists=if_exists,
                if_version=if_version,
                client_floor=floor,
            )

        applied = await self.client.write(self.name, ushard, make, durability)
        return applied.existed

    async def increment(self, key: bytes, delta: int = 1, *, shard_key: bytes | None = None) -> int:
        """Add `delta` to the 64-bit counter at `key` (absent: 0); returns the new value."""
        key = _check_key("key", key)
        if not _is_int(delta) or not -INT64 <= delta < INT64:
            raise InvalidArgument("delta must be a signed 64-bit integer")
        ushard = await self._ushard(key, shard_key)

        def make(request: RequestId, floor: RequestSeq) -> Increment:
            return Increment(
                request=request, ushard=ushard, key=key, delta=delta, client_floor=floor
            )

        applied = await self.client.write(self.name, ushard, make)
        assert applied.counter is not None
        return applied.counter

    async def scan(
        self,
        *,
        shard_key: bytes,
        prefix: bytes = b"",
        limit: int = 100,
        cursor: bytes | None = None,
        consistency: ReadConsistency = STRONG,
    ) -> Page:
        """Live items of `shard_key`'s μshard whose key starts with `prefix`, in key
        order, at most `limit` per page. Other shard keys may hash to the same μshard:
        give their keys a per-entity prefix (e.g. `user:1/`) and scan with it."""
        shard_key = _check_key("shard_key", shard_key)
        prefix = _check_key("prefix", prefix)
        if cursor is not None:
            _check_key("cursor", cursor)
        if not _is_int(limit) or not 1 <= limit <= DEFAULT_LIMITS.scan_items_max:
            raise InvalidArgument(f"limit must be 1..{DEFAULT_LIMITS.scan_items_max}")
        _check_consistency(consistency)
        ushard = await self._ushard(shard_key, None)
        reply = await self._read_like(
            ushard,
            consistency,
            lambda token, min_version: ScanRequest(
                token=token,
                ushard=ushard,
                prefix=prefix,
                start_after=cursor,
                limit=limit,
                consistency=consistency.kind,
                bound_ms=consistency.bound_ms,
                min_version=min_version,
            ),
        )
        if not isinstance(reply, ScanReply):
            raise Unavailable(f"a scan was answered with {type(reply).__name__}")
        return Page(items=list(reply.items), cursor=reply.cursor)

    def transaction(self, *, shard_key: bytes) -> Transaction:
        """An optimistic, serializable transaction over the keys of one μshard:
        `async with ks.transaction(shard_key=...) as tx:` commits on a clean exit."""
        return Transaction(self, _check_key("shard_key", shard_key))

    async def run_transaction(
        self,
        fn: Callable[[Transaction], Awaitable[T]],
        *,
        shard_key: bytes,
        attempts_max: int = 10,
    ) -> T:
        """Run `fn(tx)` and commit, again on `TransactionConflict` (up to `attempts_max`
        times, with backoff). A commit whose outcome is unknown raises `OutcomeUnknown`
        and is never re-run blindly."""
        if not isinstance(attempts_max, int) or not 1 <= attempts_max <= 1000:
            raise InvalidArgument("attempts_max must be 1..1000")
        for attempt in range(1, attempts_max + 1):
            tx = self.transaction(shard_key=shard_key)
            try:
                result = await fn(tx)
                await tx.commit()
            except TransactionConflict:
                if attempt == attempts_max:
                    raise
                ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)
                await asyncio.sleep(random.uniform(0, ceiling))
                continue
            return result
        raise AssertionError("unreachable")


class _Connecting:
    """What `connect()` returns: await it, or use it with `async with`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._start().__await__()

    async def _start(self) -> Client:
        try:
            await self._client.router.refresh(force=True)
        except BaseException:
            await self._client.close()
            raise
        return self._client

    async def __aenter__(self) -> Client:
        return await self._start()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.close()


def connect(
    address: str | Sequence[str],
    *,
    token: str | None = None,
    region: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    tls: TlsConfig | None = None,
    latency: str | LatencyMatrix | None = None,
) -> _Connecting:
    """Connect to a cluster through any of its addresses (the shard manager or nodes:
    `"127.0.0.1:7300"`, `"h1:p1,h2:p2"`). `region` makes relaxed reads prefer replicas
    there and is sent with requests (Akkio placement counts accesses by region);
    `timeout_s` bounds every request, retries included. `tls`: connect with TLS
    (`kv.TlsConfig(ca=..., cert=..., key=...)`; a cluster with TLS refuses clients
    without it with `TlsRequired`). `latency` (`"a-b=40,…"`, a .json/.toml path, or
    $LOOM_LATENCY when None) injects inter-region delays."""
    client = Client(
        parse_seeds(address),
        token=token,
        region=region,
        timeout_s=timeout_s,
        tls=tls,
        latency=latency,
    )
    return _Connecting(client)


def _owner(ranges: tuple[tuple[int, ShardId], ...], ushard: int) -> ShardId:
    """The p-shard of `ushard` under sorted (first μshard, p-shard) ranges."""
    return next(shard for first, shard in reversed(ranges) if first <= ushard)
