"""The shard manager's placement work as a running program: the rebalancer loop's one
decision per second (`shardmgr.rebalance` decides, the core carries it out), the
operator's graceful primary hand-off and the live move of a keyspace to another tier.

Rules of this module:
- the core is entered only through the manager's core task (`_in_core`);
- a tier move is nothing but the keyspace's stored spec: the rebalancer replaces the
  members that are not on the keyspace's tier one at a time, so a restarted manager
  resumes it from the metastore with no record of its own;
- operator calls are checked first and refused with a typed error (`InvalidArgument`,
  `NotFound`, `Unavailable` with a retry hint), never half done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import msgspec

from loom.core.errors import InvalidArgument, NotFound, Unavailable
from loom.core.ids import NodeId, ShardId
from loom.core.time import Instant
from loom.shardmgr.rebalance import (
    BalanceParams,
    ReplaceMember,
    ShardView,
    TransferPrimary,
    next_move,
)
from loom.shardmgr.routing import DEFAULT_TIER, Keyspace

if TYPE_CHECKING:
    from loom.runtime.manager import ManagerRuntime

log = logging.getLogger("loom.sm")
# An operator's hand-off waits this long for the target to catch up and activate.
TRANSFER_TIMEOUT_S = 20.0
TRANSFER_POLL_S = 0.05


class Placement:
    def __init__(self, manager: ManagerRuntime, balance: BalanceParams | None = None) -> None:
        self.manager = manager
        self.balance = balance or BalanceParams()
        self.last_load_move_at: Instant | None = None
        # An operator's hand-off holds balancing moves back for a cooldown, so the
        # rebalancer does not undo it at once.
        self.operator_move_at: Instant | None = None

    # ---------------------------------------------------------------- rebalancer

    def views(self) -> list[ShardView]:
        """In the core's task: what the policy sees of every p-shard."""
        core, views = self.manager.core, []
        for shard, state in sorted(core.shards.items()):
            keyspace = self.manager.keyspaces.get(self.manager.shard_keyspace.get(shard, ""))
            load = self.load_of(shard)
            views.append(
                ShardView(
                    shard=shard,
                    config=state.current.config,
                    primary=state.current.primary,
                    tier=keyspace.spec.tier if keyspace is not None else DEFAULT_TIER,
                    settled=state.activated and state.change is None and not state.persisting,
                    load_per_s=load,
                    home=self.manager.locality.homes.get(shard, ""),
                )
            )
        return views

    def load_of(self, shard: ShardId) -> float:
        """The p-shard's load: the highest decayed ops/s its members report."""
        core, load = self.manager.core, 0.0
        state = core.shards.get(shard)
        for member in state.current.config.members() if state is not None else ():
            node = core.nodes.get(member)
            progress = node.progress.get(shard) if node is not None else None
            if progress is not None:
                load = max(load, progress.load_per_s)
        return load

    def rebalance_once(self, now: Instant) -> None:
        """In the core's task: one move, if any is due."""
        core = self.manager.core
        move = next_move(
            self.views(),
            self.manager.infos,
            {n: s.last_report_at for n, s in core.nodes.items()},
            now,
            failure_timeout_ms=core.p.failure_timeout_ms,
            replace_after_ms=core.p.replace_after_ms,
            balance=self.balance,
            last_load_move_at=self.last_load_move_at,
        )
        held = self.operator_move_at is not None and (
            now - self.operator_move_at < self.balance.cooldown_ms
        )
        if move is not None and move.balancing and held:
            return
        match move:
            case ReplaceMember():
                log.info(
                    "p-shard %d: replacing %s by %s (%s)",
                    move.shard,
                    move.old,
                    move.new,
                    move.reason,
                )
                core.replace_member(move.shard, move.old, move.new)
            case TransferPrimary():
                if not core.transfer_primary(move.shard, move.to, now):
                    return  # not caught up yet: decided again next time
                log.info(
                    "p-shard %d: primary hand-off to %s (%s)", move.shard, move.to, move.reason
                )
            case None:
                return
        if move.by_load:
            self.last_load_move_at = now

    # ---------------------------------------------------------------- operator calls

    async def transfer_primary(self, shard: ShardId, to: NodeId) -> tuple[NodeId, int]:
        """Hands the primary of `shard` to acceptor `to` once it has caught up; returns
        (primary, epoch) once it has activated."""
        core = self.manager.core
        state = core.shards.get(shard)
        if state is None:
            raise NotFound(f"no p-shard {shard}")
        if to not in state.current.config.acceptors:
            acceptors = ", ".join(state.current.config.acceptors)
            raise InvalidArgument(f"{to} is not an acceptor of p-shard {shard} ({acceptors})")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TRANSFER_TIMEOUT_S
        problem: str | None = None
        while loop.time() < deadline:
            if state.current.primary == to and state.activated and not state.persisting:
                return to, int(state.current.epoch)

            def attempt(now: Instant) -> str | None:
                if state.current.primary == to:
                    return None  # allocated: wait for its activation
                problem = core.transfer_problem(shard, to, now)
                if problem is None:
                    core.transfer_primary(shard, to, now)
                    self.operator_move_at = now
                    log.info("p-shard %d: primary hand-off to %s (operator)", shard, to)
                return problem

            problem = await self.manager._in_core(attempt)
            await asyncio.sleep(TRANSFER_POLL_S)
        raise Unavailable(
            f"p-shard {shard}: the hand-off to {to} did not complete in "
            f"{TRANSFER_TIMEOUT_S:g} s ({problem or 'not activated yet'})",
            retry_after_ms=1000,
        )

    async def set_tier(self, name: str, tier: str) -> Keyspace:
        """Stores keyspace `name` on `tier`; the rebalancer then moves its members."""
        manager = self.manager
        async with manager.admin_lock:
            keyspace = manager.keyspaces.get(name)
            if keyspace is None:
                raise NotFound(f"no keyspace {name!r}")
            spec = msgspec.structs.replace(keyspace.spec, tier=tier)
            problem = spec.problem()
            if problem is not None:
                raise InvalidArgument(problem)
            if keyspace.spec.tier == tier:
                return keyspace
            now = Instant(time.monotonic() * 1000)
            live = sorted(
                n
                for n, info in manager.infos.items()
                if info.tier == tier and manager.core.is_alive(n, now)
                if not spec.regions or info.region in spec.regions
            )
            if len(live) < spec.replication:
                raise InvalidArgument(
                    f"tier {tier!r} has {len(live)} live node(s) ({', '.join(live) or 'none'}); "
                    f"keyspace {name!r} needs {spec.replication} (its replication)"
                )
            moved = msgspec.structs.replace(keyspace, spec=spec)
            await asyncio.to_thread(manager.catalog.replace, name, keyspace, moved)
            manager.keyspaces[name] = moved
            log.info("keyspace %s: moving from tier %s to %s", name, keyspace.spec.tier, tier)
            return moved
