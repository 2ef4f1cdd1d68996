"""μshard moves in the simulation: when to move what, and the ownership checker.

- `MoveSchedule` starts moves of the μshards the workload uses, while the load runs,
  drawing only from its own random stream (`moves-<seed>`): with moves off nothing
  here runs, so the schedules of the other faults stay what they were.
- `OwnershipChecker` watches every entry the first time it is applied anywhere (the
  log order of each p-shard) and keeps, per μshard, the one p-shard that may take its
  writes: the initial mapping, nobody from a Freeze on, the target from its Own on,
  the source again after an Abort of a frozen source. A write applied elsewhere, an Own
  while the source still takes writes, or a mapping installed before Own is a
  violation: every key has exactly one owner at every mapping version (DESIGN §6).
"""

from __future__ import annotations

import bisect
import enum
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from loom.core.hashing import ushard_of
from loom.core.ids import Generation, MoveId, ShardId, UShard
from loom.kvstate.commands import (
    Abort,
    Applied,
    Delete,
    Freeze,
    Increment,
    Own,
    Put,
    Result,
    TxnCommit,
    decode_command,
)
from loom.kvstate.ownership import is_owned
from loom.shardmgr.moves import Mover, Step, plan_reshard
from loom.shardmgr.routing import compact_ranges
from loom.sim.transactions import BANK_SHARD_KEY, ONCALL_SHARD_KEY
from loom.sim.workload import COUNTER_KEYS, REGISTER_KEYS, USHARDS

if TYPE_CHECKING:
    from loom.sim.world import World

MOVES_IN_FLIGHT_MAX = 2
MOVE_GAP_MS = (300.0, 2500.0)
MOVER_RESTART_PROBABILITY = 0.15


def workload_ushards() -> tuple[UShard, ...]:
    """The μshards that hold the workload's keys: moving those is what can break."""
    keys = (*REGISTER_KEYS, *COUNTER_KEYS, BANK_SHARD_KEY, ONCALL_SHARD_KEY)
    return tuple(sorted({ushard_of(key, USHARDS) for key in keys}))


class Phase(enum.Enum):
    GROW = "grow"  # the reshard onto the spare p-shards is planned next
    SHRINK = "shrink"  # once the grow's moves have started: plan the shrink
    RETIRE = "retire"  # once the mover is idle: retire the emptied p-shard
    SINGLE = "single"  # single moves of the workload's μshards


class MoveSchedule:
    """First a reshard of the keyspace from `shards` onto `shards + spare_shards`
    p-shards (every μshard u to u mod the new count, the mover's
    `moves_in_flight_max` at a time), at a random moment of the load; right after it
    (`drive`), a shrink by one p-shard as the real manager does it (loom.shardmgr.shrink:
    the moves to the compact mapping over the p-shards that stay, then — when the
    mapping gives the last p-shard nothing and its primary says it holds nothing —
    its retirement; μshards still mapped to it are planned again); now and then a
    restart of the shard manager's mover (it resumes from its stored record); then
    single moves of the workload's μshards between the p-shards that stay."""

    def __init__(
        self,
        *,
        seed: int,
        mover: Mover,
        shards: int,
        spare_shards: int,
        owner_of: Callable[[UShard], ShardId],
        start_move: Callable[[UShard, ShardId], None],
        later: Callable[[float, Callable[[], None]], None],
        restart_mover: Callable[[], Mover] | None = None,
        holdings: Callable[[ShardId], tuple[UShard, ...] | None] | None = None,
        retire: Callable[[ShardId], None] | None = None,
    ) -> None:
        self.rng = random.Random(f"moves-{seed}")
        self.mover = mover
        self.shards = shards + spare_shards
        self.phase = Phase.SINGLE if spare_shards == 0 else Phase.GROW
        self.holdings = holdings
        self.retire = retire
        self.retiring: tuple[ShardId, ...] = ()
        self.retired: list[ShardId] = []
        self.owner_of = owner_of
        self.start_move = start_move
        self.restart_mover = restart_mover
        self.later = later
        self.running = False
        self.started = 0

    def start(self) -> None:
        self.running = True
        self.later(self.rng.uniform(*MOVE_GAP_MS), self._next)

    def stop(self) -> None:
        self.running = False

    def _next(self) -> None:
        if not self.running:
            return
        if self.phase is Phase.GROW:
            self.phase = Phase.SHRINK if self.holdings is not None else Phase.SINGLE
            goal = {UShard(u): ShardId(u % self.shards) for u in range(USHARDS)}
            self._plan(goal)
            self.later(self.rng.uniform(*MOVE_GAP_MS), self._next)
            return
        if self.restart_mover is not None and self.rng.random() < MOVER_RESTART_PROBABILITY:
            # The manager restarts mid-reshard or mid-move: the mover resumes.
            self.mover = self.restart_mover()
            self.later(self.rng.uniform(*MOVE_GAP_MS), self._next)
            return
        if self.mover.planned or self.phase is not Phase.SINGLE:
            self.later(self.rng.uniform(*MOVE_GAP_MS), self._next)
            return  # the reshard first
        candidates = [u for u in workload_ushards() if not self.mover.is_moving(u)]
        if candidates and self.mover.in_flight() < MOVES_IN_FLIGHT_MAX:
            ushard = self.rng.choice(candidates)
            source = self.owner_of(ushard)
            staying = [ShardId(s) for s in range(self.shards) if s not in self.retired]
            target = self.rng.choice([s for s in staying if s != source])
            self.start_move(ushard, target)
            self.started += 1
        self.later(self.rng.uniform(*MOVE_GAP_MS), self._next)

    def drive(self) -> None:
        """At every turn of the shard manager, load or not (as the Resharder's task):
        the shrink is planned once the grow's moves have all started (μshards still
        moving then may end on the retiring p-shard: the retirement plans them again),
        and the retirement runs once the mover is idle."""
        if self.phase is Phase.SHRINK and not self.mover.planned:
            self.phase = Phase.RETIRE
            self.retiring = (ShardId(self.shards - 1),)
            self._plan(self._shrink_goal())
        elif self.phase is Phase.RETIRE and not self.mover.planned and not self.mover.in_flight():
            self._try_retire()

    def _plan(self, goal: dict[UShard, ShardId]) -> None:
        current = {UShard(u): self.owner_of(UShard(u)) for u in range(USHARDS)}
        plan = plan_reshard(current, goal)
        self.mover.plan(plan)
        self.started += len(plan)

    def _shrink_goal(self) -> dict[UShard, ShardId]:
        staying = [ShardId(s) for s in range(self.shards) if s not in self.retiring]
        ranges = compact_ranges(USHARDS, staying)
        return {UShard(u): ranges[bisect.bisect_right(ranges, u, key=lambda r: r[0]) - 1][1]
                for u in range(USHARDS)}  # fmt: skip

    def _try_retire(self) -> None:
        """As runtime/retirement.py: stranded μshards move again; otherwise each
        retiring p-shard's primary must say it holds nothing."""
        assert self.holdings is not None and self.retire is not None
        if any(self.owner_of(UShard(u)) in self.retiring for u in range(USHARDS)):
            self._plan(self._shrink_goal())
            return
        answers = [self.holdings(shard) for shard in self.retiring]
        if any(answer is None or answer for answer in answers):
            return  # no activated primary right now, or a Drop not applied yet: later
        for shard in self.retiring:
            self.retire(shard)
            self.retired.append(shard)
        self.phase = Phase.SINGLE


class OwnershipChecker:
    def __init__(self, initial: dict[UShard, ShardId]) -> None:
        # The one p-shard that may apply writes of each μshard; None while frozen.
        self.writable: dict[UShard, ShardId | None] = dict(initial)
        self.frozen_at: dict[UShard, ShardId] = {}
        self.frozen_by: dict[UShard, tuple[ShardId, MoveId]] = {}
        # Which p-shard holds each generation of each μshard (for the durability check).
        self.homes: dict[tuple[UShard, Generation], ShardId] = {
            (u, Generation(0)): s for u, s in initial.items()
        }
        self.violations: list[str] = []
        self.writes_checked = 0

    def first_applied(
        self, shard: ShardId, seq: int, commands: Sequence[bytes], results: Sequence[Result]
    ) -> None:
        for data, result in zip(commands, results, strict=True):
            if not isinstance(result, Applied):
                continue
            try:
                command = decode_command(data)
            except msgspec.DecodeError:
                continue
            match command:
                case Put() | Delete() | Increment() | TxnCommit():
                    self._write(shard, seq, command.ushard)
                case Freeze():
                    self._freeze(shard, command.ushard, command.move_id)
                case Own():
                    self._own(shard, command.ushard, command.generation)
                case Abort():
                    if self.writable.get(command.ushard) is None and (
                        self.frozen_at.get(command.ushard) == shard
                    ):
                        self.writable[command.ushard] = shard  # the source owns again
                case _:
                    pass

    def _write(self, shard: ShardId, seq: int, ushard: UShard) -> None:
        self.writes_checked += 1
        owner = self.writable.get(ushard)
        if owner != shard:
            self.violations.append(
                f"ownership: a write to μshard {ushard} applied on shard {shard} at slot "
                f"{seq} while its owner was {owner}"
            )

    def _freeze(self, shard: ShardId, ushard: UShard, move_id: MoveId) -> None:
        if self.frozen_by.get(ushard) == (shard, move_id):
            # A resent Freeze of the same move, sequenced after the first: it finds
            # the μshard frozen by that move and changes nothing (even after Own).
            return
        owner = self.writable.get(ushard)
        if owner != shard:
            self.violations.append(
                f"ownership: μshard {ushard} frozen on shard {shard}, owned by {owner}"
            )
        self.writable[ushard] = None
        self.frozen_at[ushard] = shard
        self.frozen_by[ushard] = (shard, move_id)

    def _own(self, shard: ShardId, ushard: UShard, generation: Generation) -> None:
        owner = self.writable.get(ushard)
        if owner == shard:
            return  # a retried Own
        if owner is not None:
            self.violations.append(
                f"ownership: μshard {ushard} owned by shard {shard} while shard {owner} "
                "still took its writes"
            )
        self.writable[ushard] = shard
        self.homes[(ushard, generation)] = shard

    def mapping_installed(self, ushard: UShard, shard: ShardId) -> None:
        if self.writable.get(ushard) != shard:
            self.violations.append(
                f"ownership: mapping installed μshard {ushard} → shard {shard}, but the "
                f"logs say {self.writable.get(ushard)}"
            )


def check_final_ownership(world: World) -> list[str]:
    """After convergence: every move finished, and each μshard is owned by exactly one
    p-shard (as its primary's applied state says), the one the mapping names."""
    problems = [
        f"moves: move {m.move_id} of μshard {m.ushard} ended {m.step.value}: {m.problem}"
        for m in world.mover.moves.values()
        if m.step is not Step.DONE and m.step is not Step.ABORTED
    ]
    for ushard in sorted(world.mapping):
        owners = []
        for shard in sorted(world.sm.shards):
            host = world.nodes[world.sm.shards[shard].current.primary].hosts.get(shard)
            if host is not None and is_owned(host.state, ushard, host.initial):
                owners.append(shard)
        if owners != [world.mapping[ushard]]:
            problems.append(
                f"ownership: μshard {ushard} is owned by {owners} at the end, mapped to "
                f"{world.mapping[ushard]}"
            )
    for shard in world.retired:
        held = world.holdings(shard)
        if held:
            problems.append(f"retire: retired p-shard {shard} holds μshards {list(held)[:8]}")
    return problems
