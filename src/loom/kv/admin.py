"""The operator calls of a kv `Client`: keyspaces, resharding, quotas, tenants, tokens,
tiers and status, all answered by the shard manager.

Rules: an operator call goes to the shard manager (`_admin`: the routing table's, else
each seed in turn) and a refusal raises its typed error; `_admin_retrying` asks again
while the manager is `Unavailable`, until the client's timeout. A call that creates or
changes a keyspace returns only once the routing table shows it served (every p-shard
with an active primary; after a reshard, every μshard on its goal p-shard), and gives up
with `Unavailable` after `KEYSPACE_READY_TIMEOUT_S`, or `RESHARD_STALL_S` without
progress. The placement calls (primary hand-off, tier moves) are in placement.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Sequence

from loom.core.errors import InvalidArgument, LoomError, Unavailable
from loom.core.ids import ShardId
from loom.kv.arguments import _is_int, _is_number
from loom.kv.retries import _raise_failure
from loom.kv.transport import Transport
from loom.runtime.codec import (
    ClientAnswer,
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
    SetQuota,
    StatusReply,
    StatusRequest,
    TenantsReply,
    TokenInfo,
    TokenReply,
    TokensReply,
)
from loom.runtime.rpc import CallTimedOut, ConnectionLost
from loom.shardmgr.routing import Keyspace as KeyspaceInfo
from loom.shardmgr.routing import KeyspaceSpec, Quota, RoutingTable
from loom.shardmgr.shrink import goal_ranges
from loom.shardmgr.tenancy import Tenant, tenant_problem

# `reshard_keyspace` gives up waiting when no μshard arrived for this long.
RESHARD_STALL_S = 30.0
KEYSPACE_READY_TIMEOUT_S = 30.0


class ClusterAdmin(Transport):
    """The operator calls every `Client` has (its base class, over `Transport`)."""

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


def _owner(ranges: tuple[tuple[int, ShardId], ...], ushard: int) -> ShardId:
    """The p-shard of `ushard` under sorted (first μshard, p-shard) ranges."""
    return next(shard for first, shard in reversed(ranges) if first <= ushard)
