"""The fault schedule: partitions, crashes and restarts, shard-manager mistakes and
membership changes, each drawn from the run's seed while the load runs."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

from loom.core.ids import NodeId
from loom.paxos.replica import Assignment
from loom.sim.world import SM, World

DOWN_NODES_MAX = 2
POWER_OUTAGE_PROBABILITY = 0.15
WIPE_PROBABILITY = 0.05
SLOW_HANDOFF_PROBABILITY = 0.5


class Chaos:
    def __init__(self, world: World, rng: random.Random) -> None:
        self.world = world
        self.rng = rng
        # Wiped disks draw from their own stream, so adding them did not reshuffle the
        # other faults of every seed (seeds found for rare bugs stay meaningful).
        self.wipe_rng = random.Random(f"wipe-{world.cfg.seed}")
        # Planned hand-offs too (profile "handoffs" only).
        self.handoff_rng = random.Random(f"handoff-{world.cfg.seed}")
        self.handoffs = 0
        self.running = False

    def start(self) -> None:
        self.running = True
        faults = self.world.cfg.faults
        if faults.partitions:
            self._later(self.rng.uniform(300, 2000), self._partition)
        if faults.crashes:
            self._later(self.rng.uniform(500, 3000), self._crash)
        if faults.reconfigure:
            self._later(self.rng.uniform(2000, 6000), self._reconfigure)
        if faults.handoffs:
            self._later(self.handoff_rng.uniform(1000, 3000), self._handoff)
        if faults.sm_chaos:
            self._later(self.rng.uniform(3000, 8000), self._rogue_manager)
            self.world.sm.chaos_promote_probability = 0.01
            self.world.sm.chaos_duplicate_epoch_probability = 0.05

    def stop_and_heal(self) -> None:
        """End of the load: every fault stops, every crashed node comes back."""
        self.running = False
        world = self.world
        world.sm.chaos_promote_probability = 0.0
        world.sm.chaos_duplicate_epoch_probability = 0.0
        world.net.heal()
        world.net.healed = True
        for node_id in sorted(world.nodes):
            if not world.nodes[node_id].alive:
                world.restart_node(node_id)

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        def fire() -> None:
            if self.running:
                action()

        self.world.at(self.world.t + delay, fire)

    def _partition(self) -> None:
        world = self.world
        endpoints = [*sorted(world.nodes), SM]
        side = self.rng.sample(endpoints, self.rng.randint(1, 2))
        others = [e for e in endpoints if e not in side]
        others += [c.name for c in world.clients if self.rng.random() < 0.3]
        roll = self.rng.random()
        if roll < 0.2:
            self._gray_primary()
            return
        if roll < 0.4:
            world.net.slow_down(side, others, one_way=False)
            world.note("slow", tuple(side))
        else:
            one_way = roll < 0.6
            world.net.partition(side, others, one_way=one_way)
            world.note("partition", tuple(side), one_way)
        self._later(self.rng.uniform(200, 2000), self._heal)

    def _gray_primary(self) -> None:
        """Gray failure of a primary: its own messages go out, everything towards it
        arrives late; the manager suspects it and moves its primaries away but cannot
        tell it. Its lease must end before the successor serves (PITFALLS 1, 16)."""
        world = self.world
        shard = self.rng.choice(sorted(world.sm.shards))
        primary = world.sm.shards[shard].current.primary
        others = [e for e in [*sorted(world.nodes), SM] if e != primary]
        world.net.slow_down([primary], others, one_way=True)
        world.net.partition([SM], [primary], one_way=True)
        world.sm.demote(primary, world._sm_now())
        world.note("gray", primary)
        self._later(self.rng.uniform(2500, 4000), self._heal)

    def _heal(self) -> None:
        self.world.net.heal()
        self.world.note("heal")
        self._later(self.rng.uniform(300, 3000), self._partition)

    def _crash(self) -> None:
        world = self.world
        alive = [n for n in sorted(world.nodes) if world.nodes[n].alive]
        down = len(world.nodes) - len(alive)
        if down == 0 and self.rng.random() < POWER_OUTAGE_PROBABILITY:
            # Aimed: the power goes out the moment a node next acknowledges a write.
            world.power_outage_armed = True
            self._later(self.rng.uniform(2000, 5000), self._crash)
            return
        if down == 0 and self._all_members_whole() and self.wipe_rng.random() < WIPE_PROBABILITY:
            self._wipe_then_crash_primary()
            self._later(self.wipe_rng.uniform(2000, 5000), self._crash)
            return
        if down < DOWN_NODES_MAX and alive:
            victim = self.rng.choice(alive)
            if self.rng.random() < 0.5:
                # Torn: crash while its next fsync is still running.
                aim = "promise" if self.rng.random() < 0.5 else "any"
                world.nodes[victim].torn_crash = aim
                self._later(self.rng.uniform(800, 3500), self._crash)
                return
            world.crash_node(victim)
            # Sometimes back within the lease wait W, sometimes long after.
            downtime = self.rng.choice([self.rng.uniform(50, 900), self.rng.uniform(1000, 4000)])
            world.at(world.t + downtime, functools.partial(self._restart, victim))
        self._later(self.rng.uniform(800, 3500), self._crash)

    def _wipe_then_crash_primary(self) -> None:
        """Aimed at amnesia (PITFALLS 19). The third acceptor is cut off from the primary
        for a while, so recent writes are chosen by the primary and the victim alone;
        then the victim comes back at once on an empty disk and the primary dies. If the
        wiped node still counted as the member it was, the third acceptor and it would
        make a quorum that has never seen those writes."""
        world = self.world
        shard = self.wipe_rng.choice(sorted(world.sm.shards))
        current = world.sm.shards[shard].current
        primary = current.primary
        others = [a for a in current.config.acceptors if a != primary]
        if len(others) < 2:
            return
        victim = self.wipe_rng.choice(others)
        lagging: list[str] = [a for a in others if a != victim]
        world.net.partition(lagging, [primary], one_way=False)
        world.note("lag", tuple(lagging), primary)
        at = world.t + self.wipe_rng.uniform(300, 900)
        world.at(at, functools.partial(self._wipe, victim))
        world.at(at + self.wipe_rng.uniform(20, 200), functools.partial(self._restart, victim))
        crash_at = at + self.wipe_rng.uniform(30, 150)
        world.at(crash_at, functools.partial(self._crash_now, primary))
        world.at(crash_at + self.wipe_rng.uniform(50, 300), world.net.heal)
        downtime = self.wipe_rng.uniform(1000, 4000)
        world.at(crash_at + downtime, functools.partial(self._restart, primary))

    def _wipe(self, node_id: NodeId) -> None:
        if self.running and self.world.nodes[node_id].alive:
            self.world.wipe_node(node_id)

    def _all_members_whole(self) -> bool:
        """No shard is still replacing a wiped member: wiping a second one meanwhile
        would lose a majority's disks, which no protocol survives (outside the model)."""
        world = self.world
        for state in world.sm.shards.values():
            current = state.current
            if state.change is not None or not state.activated:
                return False
            for member in current.config.members():
                if current.incarnation_of(member) != world.nodes[member].incarnation:
                    return False
        return True

    def _crash_now(self, node_id: NodeId) -> None:
        if self.running and self.world.nodes[node_id].alive:
            self.world.crash_node(node_id)

    def _restart(self, node_id: NodeId) -> None:
        if not self.world.nodes[node_id].alive:
            self.world.restart_node(node_id)

    def _rogue_manager(self) -> None:
        """Split brain in the control plane: a deposed manager that missed the last
        compare-and-swap announces the current epoch again with another primary, while
        the real primary is cut off from its peers for a while. Strict ballots must keep
        the two primaries of one epoch from both committing (PITFALLS 13)."""
        world = self.world
        shard = self.rng.choice(sorted(world.sm.shards))
        state = world.sm.shards[shard]
        current = state.current
        # A rival whose ballot is *lower* in the same epoch: only the strict promise rule
        # stops it (a higher one would be a legitimate successor).
        rivals = [
            a for a in current.config.acceptors if a < current.primary and world.nodes[a].alive
        ]
        if state.activated and rivals:
            rival = self.rng.choice(rivals)
            rogue = Assignment(
                epoch=current.epoch,
                primary=rival,
                primary_incarnation=world.nodes[rival].incarnation,
                config=current.config,
                prior_configs=(current.config,),
                activated_epoch=current.epoch,
            )
            world.note("rogue", shard, rogue.ballot)
            # The primary is cut off from its peers but not from the real manager, which
            # keeps believing in it; the rival hears only the rogue manager.
            for member in current.config.members():
                world.send_from_manager(member, (shard, rogue))
            world.net.partition([current.primary], sorted(world.nodes), one_way=False)
            world.net.partition([SM], [rival], one_way=True)
            self._later(self.rng.uniform(2000, 4000), self.world.net.heal)
        self._later(self.rng.uniform(4000, 10000), self._rogue_manager)

    def _handoff(self) -> None:
        """A planned primary hand-off (balancing or an operator): the manager hands the
        primary to a caught-up acceptor, the old primary steps down and releases its
        lease, so the successor need not wait W. Faults keep running meanwhile."""
        world = self.world
        shard = self.handoff_rng.choice(sorted(world.sm.shards))
        current = world.sm.shards[shard].current
        others = [a for a in current.config.acceptors if a != current.primary]
        if others:
            to = self.handoff_rng.choice(others)
            if world.sm.transfer_primary(shard, to, world._sm_now()):
                world.note("handoff", shard, current.primary, to)
                self.handoffs += 1
                if self.handoff_rng.random() < SLOW_HANDOFF_PROBABILITY:
                    # Aimed: the peers' answers reach the old primary late (the manager's
                    # word does not), so only its own stepping down stops it serving
                    # while its successor is already elected.
                    peers: list[str] = [n for n in sorted(world.nodes) if n != current.primary]
                    world.net.slow_down([current.primary], peers, one_way=True)
                    world.note("slow-handoff", current.primary)
                    self._later(self.handoff_rng.uniform(500, 1500), world.net.heal)
        self._later(self.handoff_rng.uniform(800, 3000), self._handoff)

    def _reconfigure(self) -> None:
        world = self.world
        shard = self.rng.choice(sorted(world.sm.shards))
        config = world.sm.shards[shard].current.config
        spare = [n for n in sorted(world.nodes) if n not in config.members()]
        if spare:
            old = self.rng.choice(sorted(config.acceptors))
            new = self.rng.choice(spare)
            world.sm.replace_member(shard, old, new)
            world.note("reconfigure", shard, old, new)
        self._later(self.rng.uniform(3000, 8000), self._reconfigure)
