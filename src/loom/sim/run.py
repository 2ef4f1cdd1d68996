"""One seeded simulation run, start to verdict, and the summary over many seeds."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from loom.core.hashing import ushard_of
from loom.core.ids import ShardId
from loom.host.requests import Consistency
from loom.kvstate.reads import read_item, state_digest
from loom.kvstate.records import decode_counter
from loom.shardmgr.moves import Step
from loom.sim.chaos import Chaos
from loom.sim.checkers.counters import check_counters
from loom.sim.checkers.linearizability import check_history
from loom.sim.checks import (
    UNCHECKED_FRACTION_MAX,
    check_bounded_reads,
    check_durability,
    check_read_your_writes,
)
from loom.sim.faults import Faults
from loom.sim.moves import MoveSchedule, Phase, check_final_ownership
from loom.sim.workload import COUNTER_KEYS, REGISTER_KEYS, USHARDS
from loom.sim.world import World, WorldConfig

WARMUP_MS = 2500.0
SETTLE_MS = 6000.0
FINAL_READ_MS = 8000.0
CONVERGE_MS = 15_000.0


@dataclass(slots=True, kw_only=True)
class SeedResult:
    seed: int
    violations: list[str] = field(default_factory=list)
    operations_checked: int = 0
    unchecked_operations: int = 0
    trace_hash: str = ""
    virtual_ms: float = 0.0
    moves_started: int = 0
    moves_done: int = 0
    mover_restarts: int = 0
    handoffs: int = 0  # planned primary hand-offs started (profile "handoffs")
    lease_releases: int = 0  # LeaseRelease messages delivered to other acceptors
    retired: int = 0  # p-shards a shrink retired
    moves_done_under_load: int = 0  # before the load ended and the faults healed


def replay_command(seed: int, faults: str, ops: int, bugs: frozenset[str]) -> str:
    bug = "".join(f" --bug {b}" for b in sorted(bugs))
    return f"PYTHONHASHSEED=0 loom sim --seeds 1 --start {seed} --faults {faults} --ops {ops}{bug}"


def run_seed(
    seed: int, *, faults: str = "all", ops: int = 300, bugs: frozenset[str] = frozenset()
) -> SeedResult:
    profile = Faults.profile(faults)
    # With moves, two more p-shards start empty and the keyspace is resharded onto them.
    spare = 2 if profile.moves else 0
    world = World(WorldConfig(seed=seed, faults=profile, ops=ops, bugs=bugs, spare_shards=spare))
    world.start()
    world.run_until(WARMUP_MS)
    chaos = Chaos(world, random.Random(world.rng.random()))
    chaos.start()
    moves = MoveSchedule(
        seed=seed,
        mover=world.mover,
        shards=world.cfg.shards,
        spare_shards=world.cfg.spare_shards,
        owner_of=world.mapping.__getitem__,
        start_move=world.start_move,
        later=lambda delay, action: world.at(world.t + delay, action),
        restart_mover=world.restart_mover,
        holdings=world.holdings,
        retire=world.retire,
    )
    if world.cfg.faults.moves:
        moves.start()
        world.drive_moves = moves.drive
    world.start_clients()
    target = ops
    world.run_until(
        world.cfg.load_ms_max,
        # With moves, the load (and the faults) go on until the shrink has retired
        # its p-shard, so the shrink's moves run under them too.
        stop=lambda: world.rec.operations() >= target and moves.phase is Phase.SINGLE,
    )
    world.load_running = False
    moves.stop()
    done_under_load = world.moves_done_before + sum(
        1 for m in world.mover.moves.values() if m.step is Step.DONE
    )
    chaos.stop_and_heal()
    world.run_until(world.t + SETTLE_MS, stop=world.clients_idle)
    world.run_until(world.t + 1500)
    result = SeedResult(seed=seed)
    result.moves_started = moves.started
    result.handoffs = chaos.handoffs
    result.lease_releases = world.lease_releases
    result.moves_done_under_load = done_under_load
    _final_reads(world, result)
    finals = _convergence(world, result)
    _verdicts(world, result, finals)
    result.trace_hash = world.trace.hexdigest()
    result.virtual_ms = world.t
    return result


def _final_reads(world: World, result: SeedResult) -> None:
    """Liveness, and the reads that let linearizability see any lost write."""
    reader = world.clients[0]
    for key in REGISTER_KEYS:
        reader._read(key, Consistency.STRONG, world.t)
        world._client_send(reader)
        world.run_until(world.t + FINAL_READ_MS, stop=world.clients_idle)
        if reader.current is not None:
            reader.current = None
            result.violations.append(f"liveness: final STRONG read of {key!r} did not complete")


def _replica_states(world: World, shard: ShardId) -> dict[str, tuple[int, bytes]] | None:
    """Each current member's (applied seq, state digest); None if one has not rejoined."""
    states: dict[str, tuple[int, bytes]] = {}
    for node_id in world.sm.shards[shard].current.config.members():
        host = world.nodes[node_id].hosts.get(shard)
        if host is None:
            return None
        states[node_id] = (int(host.replica.applied_seq), state_digest(host.state))
    return states


def _is_converged(world: World) -> bool:
    if world.mover.in_flight() or world.mover.planned:
        return False
    for shard in sorted(world.sm.shards):
        manager = world.sm.shards[shard]
        if not manager.activated or manager.change is not None:
            return False
        states = _replica_states(world, shard)
        if states is None or len(set(states.values())) != 1:
            return False
    return True


def _convergence(world: World, result: SeedResult) -> dict[bytes, int]:
    """Liveness after healing: every shard settles on one primary and equal replicas."""
    deadline = world.t + CONVERGE_MS
    while world.t < deadline and not _is_converged(world):
        world.run_until(world.t + 100)
    finals: dict[bytes, int] = {}
    for shard in sorted(world.sm.shards):
        states = _replica_states(world, shard)
        if states is None or len(set(states.values())) != 1:
            result.violations.append(f"convergence: shard {shard} replicas differ: {states}")
        primary = world.sm.shards[shard].current.primary
        host = world.nodes[primary].hosts.get(shard)
        if host is None:
            continue
        for key in COUNTER_KEYS:
            ushard = ushard_of(key, USHARDS)
            if world.mapping[ushard] == shard:
                item = read_item(host.state, ushard, key, 0)
                finals[key] = (decode_counter(item.value) or 0) if item else 0
    return finals


def _verdicts(world: World, result: SeedResult, finals: dict[bytes, int]) -> None:
    rec = world.rec
    register_ops = [op for op in rec.ops if op.kind != "increment"]
    report = check_history(register_ops, budget_per_key=200_000)
    result.violations += [f"linearizability: {v.key!r}: {v.explanation}" for v in report.violations]
    unchecked = sum(1 for op in register_ops if op.key in report.keys_unchecked)
    result.unchecked_operations = unchecked
    if register_ops and unchecked > UNCHECKED_FRACTION_MAX * len(register_ops):
        result.violations.append(f"linearizability: {unchecked} operations left unchecked")
    increments = [op for op in rec.ops if op.kind == "increment"]
    result.violations += [f"counters: {p}" for p in check_counters(increments, finals)]
    result.violations += check_bounded_reads(rec.reads, rec.acks)
    result.violations += check_read_your_writes(rec.reads)
    homes = world.ownership.homes if world.cfg.faults.moves else None
    result.violations += check_durability(rec.acks, world.applied_commands, homes)
    result.violations += world.invariant_violations
    if world.cfg.faults.moves:
        result.violations += world.ownership.violations
        result.violations += check_final_ownership(world)
        done = sum(1 for m in world.mover.moves.values() if m.step is Step.DONE)
        result.moves_done = world.moves_done_before + done
        result.mover_restarts = world.mover_restarts
        result.retired = len(world.retired)
    result.violations += rec.violations
    result.operations_checked = rec.operations() - unchecked
