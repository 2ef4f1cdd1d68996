"""The shard manager's decisions for a set of p-shards.

Protocol with its driver:
- the driver feeds `on_report` (node heartbeats with per-shard progress), `on_event`
  (activation / step-down news from primaries) and `tick(now)`;
- the core answers with `outputs()`: `PersistEpoch` first (the driver does the
  compare-and-swap in the metastore and calls `epoch_persisted`), then `Announce`
  only for epochs that are durably allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.core.ids import Epoch, Incarnation, NodeId, Seq, ShardId
from loom.core.rng import Rng
from loom.core.time import Instant
from loom.paxos.messages import Config
from loom.paxos.ready import SmEvent, SmEventKind
from loom.paxos.replica import Assignment, Replica


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardProgress:
    shard: ShardId
    last_seq: Seq
    commit_seq: Seq
    applied_seq: Seq
    is_primary: bool
    # Commands applied since the replica started (for rates in `loom status`).
    applied_commands: int = 0
    # Operations per second on this replica (commands applied + reads served), decayed
    # (`host.load`): what the rebalancer balances by (`shardmgr.rebalance`).
    load_per_s: float = 0.0
    # The p-shard's kv state in bytes, as this node last measured it (0: not yet);
    # primaries measure it for the automatic split (loom.shardmgr.autosplit).
    stored_bytes: int = 0

    @classmethod
    def of(cls, shard: ShardId, replica: Replica) -> ShardProgress:
        """What a node reports of one of its replicas."""
        return cls(
            shard=shard,
            last_seq=replica.last_seq,
            commit_seq=replica.commit_seq,
            applied_seq=replica.applied_seq,
            is_primary=replica.lead is not None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeReport:
    node: NodeId
    incarnation: Incarnation
    shards: tuple[ShardProgress, ...]
    stored_bytes: int = 0  # the node's whole store, approximately


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistEpoch:
    """Compare-and-swap the shard's record from `expected` to `assignment.epoch`."""

    shard: ShardId
    expected: Epoch
    assignment: Assignment
    chaos: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Announce:
    shard: ShardId
    assignment: Assignment
    to: tuple[NodeId, ...]


SmOutput = PersistEpoch | Announce


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardRecord:
    """What the metastore keeps of one shard, so a restarted manager goes on from it."""

    assignment: Assignment
    activated: bool
    since_activated: tuple[Config, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SmParams:
    failure_timeout_ms: float = 600.0
    # A primary not activated this long after its announcement is replaced.
    activation_timeout_ms: float = 4000.0
    announce_interval_ms: float = 500.0
    # A follower this close to the primary's commit point may become an acceptor.
    catchup_slack_entries: int = 64
    # A member silent this long is replaced by another node (`shardmgr.rebalance`).
    replace_after_ms: float = 60_000.0
    # Among acceptors with the longest log, prefer the highest commit point: it holds
    # every chosen slot up to it, so its activation cannot fail for lack of a value
    # the others truncated (without it, two less caught-up acceptors can take turns
    # failing forever while the one that could activate is never chosen). Off by
    # default only so the simulator's recorded bug seeds keep their schedules; the
    # `moves` profile turns it on. TODO(lead): turn on everywhere, re-record seeds.
    prefer_highest_commit: bool = False
    # A membership change that keeps its primary is a planned hand-off too: the primary
    # releases its lease before it runs Phase 1 again, so the change costs no lease wait
    # W. Off in the simulator's older profiles only, to keep their recorded schedules.
    handoff_on_reconfigure: bool = True


@dataclass(slots=True, kw_only=True)
class _NodeState:
    incarnation: Incarnation
    last_report_at: Instant
    progress: dict[ShardId, ShardProgress] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class _Change:
    """One membership change: `add` joins as a follower, then (`as_acceptor`) becomes an
    acceptor in place of `remove` once caught up. `rejoin`: `add` is a member whose
    disk was wiped, which must first leave the config as the member it was."""

    add: NodeId
    remove: NodeId | None = None
    as_acceptor: bool = True
    rejoin: bool = False
    removed: bool = False  # rejoin: the old member has left the config


@dataclass(slots=True, kw_only=True)
class _ShardState:
    shard: ShardId
    current: Assignment
    announced_at: Instant
    allocated_at: Instant
    activated: bool = False
    # The last activated config and every config allocated since (a new primary must
    # reach a majority of each: PITFALLS 15).
    since_activated: list[Config] = field(default_factory=list)
    activated_epoch: Epoch = Epoch(0)
    persisting: bool = False
    # Membership change in progress.
    change: _Change | None = None


class ShardManagerCore:
    def __init__(self, *, params: SmParams, rng: Rng) -> None:
        self.p = params
        self.rng = rng
        self.nodes: dict[NodeId, _NodeState] = {}
        self.shards: dict[ShardId, _ShardState] = {}
        self.out: list[SmOutput] = []
        # When `restore` last took shards back (a restarted or new leader): nodes get
        # `failure_timeout_ms` from then to report before their primaries count as dead.
        self.restored_at: Instant | None = None
        # Fault injection for the simulator: wrong but "legal-looking" decisions.
        self.chaos_promote_probability = 0.0
        self.chaos_duplicate_epoch_probability = 0.0

    # ---------------------------------------------------------------- inputs

    def create_shard(
        self,
        shard: ShardId,
        acceptors: tuple[NodeId, ...],
        now: Instant,
        followers: tuple[NodeId, ...] = (),
    ) -> None:
        assert shard not in self.shards
        config = Config(Epoch(1), acceptors, followers)
        primary = acceptors[0]
        node = self.nodes.get(primary)
        incarnation = node.incarnation if node else Incarnation(0)
        assignment = Assignment(
            epoch=Epoch(1),
            primary=primary,
            primary_incarnation=incarnation,
            config=config,
            incarnations=self._incarnations(config, ()),
        )
        state = _ShardState(
            shard=shard,
            current=assignment,
            announced_at=now,
            allocated_at=now,
            persisting=True,
            since_activated=[config],
        )
        self.shards[shard] = state
        self.out.append(PersistEpoch(shard=shard, expected=Epoch(0), assignment=assignment))

    def drop_shard(self, shard: ShardId) -> tuple[NodeId, ...]:
        """Forget a dropped p-shard; returns the members that must delete their replica."""
        state = self.shards.pop(shard, None)
        return state.current.config.members() if state is not None else ()

    def record(self, shard: ShardId, assignment: Assignment | None = None) -> ShardRecord:
        """The durable form of a shard's state (with `assignment` about to be stored)."""
        state = self.shards[shard]
        pending = assignment is not None and assignment != state.current
        return ShardRecord(
            assignment=assignment or state.current,
            activated=state.activated and not pending,
            since_activated=tuple(state.since_activated),
        )

    def restore(self, shard: ShardId, record: ShardRecord, now: Instant) -> None:
        """Takes a shard back from the metastore after a restart; the primary keeps its
        place while its node reports, and is replaced like any other otherwise."""
        self.restored_at = now
        self.shards[shard] = _ShardState(
            shard=shard,
            current=record.assignment,
            announced_at=now,
            allocated_at=now,
            activated=record.activated,
            activated_epoch=record.assignment.epoch if record.activated else Epoch(0),
            since_activated=list(record.since_activated),
        )

    def on_report(self, report: NodeReport, now: Instant) -> None:
        node = self.nodes.get(report.node)
        if node is None or node.incarnation != report.incarnation:
            node = _NodeState(incarnation=report.incarnation, last_report_at=now)
            self.nodes[report.node] = node
        node.last_report_at = now
        node.progress = {p.shard: p for p in report.shards}

    def on_event(self, shard: ShardId, event: SmEvent, now: Instant) -> None:
        state = self.shards.get(shard)
        if state is None or event.ballot != state.current.ballot:
            return
        match event.kind:
            case SmEventKind.ACTIVATED:
                if not state.activated:
                    state.activated = True
                    state.activated_epoch = state.current.epoch
                    state.since_activated = [state.current.config]
            case SmEventKind.BALLOT_STALE | SmEventKind.ACTIVATION_FAILED:
                self._failover(state, now, exclude=state.current.primary)
            case SmEventKind.STEPPED_DOWN:
                self._failover(state, now, exclude=None)

    def epoch_persisted(
        self,
        shard: ShardId,
        assignment: Assignment,
        *,
        stored: ShardRecord | None,
        now: Instant,
    ) -> None:
        """The metastore answered the compare-and-swap of `assignment`; `stored` is the
        record it holds now (None: nothing, or not known). Only an assignment stored as
        it is may be announced: when another manager won the race, its record is the
        truth for that epoch number, and announcing ours would give one epoch two
        primaries."""
        state = self.shards.get(shard)
        if state is None:
            return  # dropped meanwhile
        state.persisting = False
        if stored is None or stored.assignment != assignment:
            if stored is not None and stored.assignment.epoch >= state.current.epoch:
                self._adopt(state, stored, now)
            return
        state.current = assignment
        # The activation timeout runs from the announcement: a slow metastore (seconds
        # to store under a loaded disk) must not make the new primary look stuck.
        state.allocated_at = now
        self._announce(state, now)

    def _adopt(self, state: _ShardState, record: ShardRecord, now: Instant) -> None:
        """Goes on from a record another manager stored (it won a race to an epoch)."""
        state.current = record.assignment
        state.activated = record.activated
        state.activated_epoch = record.assignment.epoch if record.activated else Epoch(0)
        state.since_activated = list(record.since_activated)
        state.change = None
        state.allocated_at = now
        self._announce(state, now)

    def tick(self, now: Instant) -> None:
        for shard in sorted(self.shards):
            state = self.shards[shard]
            if state.persisting:
                continue
            stuck = not state.activated and now - state.allocated_at > self.p.activation_timeout_ms
            primary = state.current.primary
            dead = not self._is_alive(primary, now) or self._is_reborn(state, primary)
            if dead and primary not in self.nodes and self._just_restored(now):
                dead = False  # not heard from since our restart: give it time to report
            reborn = [m for m in state.current.config.members() if self._is_reborn(state, m)]
            rejoining = state.change is not None and state.change.rejoin
            if reborn and not rejoining and not (dead and reborn == [primary]):
                # A wiped member comes first, even before a change in progress (which may
                # be waiting for that very node): the planner can start it again later.
                was_acceptor = reborn[0] in state.current.config.acceptors
                state.change = _Change(add=reborn[0], as_acceptor=was_acceptor, rejoin=True)
            # Chaos draws only when it is on, so runs without it keep their random stream.
            chaos = self.chaos_promote_probability > 0 and (
                self.rng.random() < self.chaos_promote_probability
            )
            if dead or stuck or chaos:
                self._failover(state, now, exclude=state.current.primary)
            else:
                self._maybe_change_membership(state, now)
            if not state.persisting and now - state.announced_at >= self.p.announce_interval_ms:
                self._announce(state, now)

    def demote(self, node: NodeId, now: Instant) -> None:
        """Move every primary off `node` (an operator's drain, or a gray node suspected)."""
        for shard in sorted(self.shards):
            state = self.shards[shard]
            if state.current.primary == node and not state.persisting:
                self._failover(state, now, exclude=node)

    def transfer_primary(self, shard: ShardId, to: NodeId, now: Instant) -> bool:
        """A planned primary move to acceptor `to` (balancing, tier moves, an operator);
        False if not possible now (`transfer_problem` says why)."""
        if self.transfer_problem(shard, to, now) is not None:
            return False
        state = self.shards[shard]
        self._allocate(state, to, state.current.config, now, handoff=True)
        return True

    def transfer_problem(self, shard: ShardId, to: NodeId, now: Instant) -> str | None:
        """Why the primary of `shard` cannot be handed to `to` now, or None. A hand-off
        is graceful: the shard is settled, the old primary is alive (it releases its
        lease on stepping down) and `to` has caught up, so it activates at once."""
        state = self.shards.get(shard)
        if state is None:
            return f"no p-shard {shard}"
        config = state.current.config
        if to == state.current.primary:
            return f"{to} is already the primary of p-shard {shard}"
        if to not in config.acceptors:
            return f"{to} is not an acceptor of p-shard {shard} ({', '.join(config.acceptors)})"
        if not self._is_alive(to, now) or self._is_reborn(state, to):
            return f"{to} is not live"
        if state.persisting or not state.activated or state.change is not None:
            return f"p-shard {shard} is changing (epoch {state.current.epoch}); try again"
        if not self._is_alive(state.current.primary, now):
            return f"the primary {state.current.primary} is not live; failover handles it"
        if not self._caught_up(to, state, now):
            return f"{to} has not caught up with the primary of p-shard {shard} yet"
        return None

    def announce_all(self, now: Instant) -> None:
        for shard in sorted(self.shards):
            if not self.shards[shard].persisting:
                self._announce(self.shards[shard], now)

    def outputs(self) -> list[SmOutput]:
        out, self.out = self.out, []
        return out

    def _announce(self, state: _ShardState, now: Instant) -> None:
        members = state.current.config.members()
        self.out.append(Announce(shard=state.shard, assignment=state.current, to=members))
        state.announced_at = now

    # ---------------------------------------------------------------- decisions

    def _incarnations(
        self, config: Config, recorded: tuple[tuple[NodeId, Incarnation], ...]
    ) -> tuple[tuple[NodeId, Incarnation], ...]:
        """Each member's incarnation: as recorded when it joined, else as it reports now."""
        known = dict(recorded)
        for member in config.members():
            if member not in known and member in self.nodes:
                known[member] = self.nodes[member].incarnation
        return tuple(sorted((n, i) for n, i in known.items() if n in config.members()))

    def _is_reborn(self, state: _ShardState, node: NodeId) -> bool:
        """The node reports from another data directory than the member it was (its disk
        was wiped): it is not that member any more (PITFALLS 19)."""
        recorded = state.current.incarnation_of(node)
        reported = self.nodes.get(node)
        return recorded is not None and reported is not None and reported.incarnation != recorded

    def _just_restored(self, now: Instant) -> bool:
        restored = self.restored_at
        return restored is not None and now - restored <= self.p.failure_timeout_ms

    def is_alive(self, node: NodeId, now: Instant) -> bool:
        return self._is_alive(node, now)

    def _is_alive(self, node: NodeId, now: Instant) -> bool:
        state = self.nodes.get(node)
        return state is not None and now - state.last_report_at <= self.p.failure_timeout_ms

    def _failover(self, state: _ShardState, now: Instant, *, exclude: NodeId | None) -> None:
        if state.persisting:
            return
        config = state.current.config
        candidates = [
            n
            for n in config.acceptors
            if n != exclude and self._is_alive(n, now) and not self._is_reborn(state, n)
        ]
        if not candidates:
            return
        # Prefer the most caught-up acceptor (see SmParams.prefer_highest_commit); ties
        # broken by name for determinism.
        commit_weight = 1 if self.p.prefer_highest_commit else 0
        candidates.sort(
            key=lambda n: (
                -self._last_seq(n, state.shard),
                -commit_weight * self._commit_seq(n, state.shard),
                n,
            )
        )
        primary = candidates[0]
        self._allocate(state, primary, config, now)

    def _last_seq(self, node: NodeId, shard: ShardId) -> int:
        progress = self.nodes[node].progress.get(shard)
        return progress.last_seq if progress else 0

    def _commit_seq(self, node: NodeId, shard: ShardId) -> int:
        progress = self.nodes[node].progress.get(shard)
        return progress.commit_seq if progress else 0

    def _allocate(
        self,
        state: _ShardState,
        primary: NodeId,
        config: Config,
        now: Instant,
        *,
        handoff: bool = False,
    ) -> None:
        epoch = Epoch(state.current.epoch + 1)
        expected = state.current.epoch
        chaos = self.chaos_duplicate_epoch_probability > 0 and (
            self.rng.random() < self.chaos_duplicate_epoch_probability
        )
        if chaos:
            # Chaos: a split-brain manager reusing an epoch (the simulator skips the CAS).
            epoch = state.current.epoch
            expected = Epoch(epoch - 1)
        new_config = Config(epoch, config.acceptors, config.followers)
        assignment = Assignment(
            epoch=epoch,
            primary=primary,
            primary_incarnation=self.nodes[primary].incarnation,
            config=new_config,
            prior_configs=tuple(state.since_activated),
            activated_epoch=state.activated_epoch,
            incarnations=self._incarnations(new_config, state.current.incarnations),
            handoff=handoff,
        )
        state.since_activated.append(new_config)
        state.activated = False
        state.persisting = True
        state.allocated_at = now
        self.out.append(
            PersistEpoch(shard=state.shard, expected=expected, assignment=assignment, chaos=chaos)
        )

    # ---------------------------------------------------------------- membership

    def replace_member(self, shard: ShardId, old: NodeId, new: NodeId) -> None:
        """Plan: add `new` as follower, then swap it for `old` among the acceptors. `new`
        may be a follower already (left by a change a restarted manager forgot)."""
        state = self.shards[shard]
        if state.change is None and new not in state.current.config.acceptors:
            state.change = _Change(add=new, remove=old)

    def _maybe_change_membership(self, state: _ShardState, now: Instant) -> None:
        change = state.change
        if change is None or not state.activated:
            return
        new, old = change.add, change.remove
        config = state.current.config
        primary = state.current.primary
        if change.rejoin and not change.removed:
            if primary == new:
                return  # failover first
            # A wiped member leaves the config; it comes back below as a new follower.
            acceptors = tuple(a for a in config.acceptors if a != new)
            followers = tuple(f for f in config.followers if f != new)
            self._allocate(state, primary, Config(config.epoch, acceptors, followers), now)
            change.removed = True
            return
        handoff = self.p.handoff_on_reconfigure and self._is_alive(primary, now)
        if new not in config.members():
            followers = (*config.followers, new)
            config = Config(config.epoch, config.acceptors, followers)
            self._allocate(state, primary, config, now, handoff=handoff)
            return
        if new in config.followers and not change.as_acceptor:
            state.change = None
            return
        if new in config.followers and self._caught_up(new, state, now):
            acceptors = (*(a for a in config.acceptors if a != old), new)
            followers = tuple(f for f in config.followers if f != new)
            if primary == old:
                primary, handoff = new, False  # the old primary hears nothing: it leaves
            config = Config(config.epoch, acceptors, followers)
            self._allocate(state, primary, config, now, handoff=handoff)
            return
        if new in config.acceptors:
            state.change = None

    def _caught_up(self, node: NodeId, state: _ShardState, now: Instant) -> bool:
        if not self._is_alive(node, now):
            return False
        progress = self.nodes[node].progress.get(state.shard)
        primary = self.nodes.get(state.current.primary)
        if progress is None or primary is None:
            return False
        lead = primary.progress.get(state.shard)
        if lead is None:
            return False
        return progress.applied_seq + self.p.catchup_slack_entries >= lead.commit_seq
