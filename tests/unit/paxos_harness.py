"""A deterministic harness that drives `loom.paxos.replica.Replica` objects directly.

No simulator, no storage: each node keeps a `DurableState` copy that the harness updates
from every `Ready` before it sends the Ready's messages and calls `advance` (persist →
send → apply, as the real driver does). A restart builds a fresh `Replica` from that copy
and forgets everything that was not persisted.

The network is a FIFO list of envelopes that tests may drop, hold, reorder or duplicate
explicitly. Messages addressed to a name that is not a node of the cluster (a scripted
"fake" peer) are collected in `Cluster.outside` so a test can play that peer by hand.

Time is one float (`Cluster.now`, ms); each node reads it through its own offset, so a
test can show that a rule is measured on the node's own monotonic clock.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from loom.core.ids import Ballot, Epoch, Incarnation, NodeId, Seq, ShardId
from loom.core.time import Instant
from loom.paxos.durable import DurableState
from loom.paxos.messages import Config, Entry, Envelope, Message, SnapshotChunk
from loom.paxos.params import ReplicaParams
from loom.paxos.ready import PromiseRecord, ReadDecision, Refused, ServeNow, SmEvent, SmEventKind
from loom.paxos.replica import Assignment, Replica

SHARD = ShardId(7)

# Short leases keep the scenarios short; W ≈ 1020.2 ms.
PARAMS = ReplicaParams(
    lease_ms=1000.0,
    drift_bound=0.01,
    heartbeat_interval_ms=100.0,
    probe_interval_ms=100.0,
    resend_after_ms=300.0,
    read_wait_max_ms=1000.0,
)
W = PARAMS.promise_wait_ms

EnvPred = Callable[[Envelope], bool]


def n(name: str) -> NodeId:
    return NodeId(name)


def ballot(epoch: int, node: str, incarnation: int = 1) -> Ballot:
    return Ballot(Epoch(epoch), NodeId(node), Incarnation(incarnation))


def config(epoch: int, acceptors: str, followers: str = "") -> Config:
    """`config(1, "abc", "d")`: one-letter node names."""
    return Config(Epoch(epoch), tuple(map(n, acceptors)), tuple(map(n, followers)))


def entry(b: Ballot, seq: int, value: bytes | None, *, wall_ms: int | None = None) -> Entry:
    """An entry whose value is `value` (None = a no-op), sequenced in `b`'s epoch."""
    commands = () if value is None else (value,)
    wall = seq * 10 if wall_ms is None else wall_ms
    return Entry(b, Seq(seq), wall if value is not None else 0, b.epoch, commands)


def value_of(e: Entry) -> bytes | None:
    """The command of a one-command entry, None for a no-op."""
    if not e.commands:
        return None
    assert len(e.commands) == 1
    return e.commands[0]


def durable(
    *,
    promise: Ballot | None = None,
    promise_config: Config | None = None,
    prior_config: Config | None = None,
    entries: Iterable[Entry] = (),
    commit: int = 0,
    applied: int = 0,
    truncated: int = 0,
) -> DurableState:
    state = DurableState()
    if promise is not None:
        state.promise = PromiseRecord(
            ballot=promise, config=promise_config, prior_config=prior_config
        )
    state.entries = {e.seq: e for e in entries if e.seq > truncated}
    state.commit_seq = Seq(commit)
    state.applied_seq = Seq(applied)
    state.truncated_seq = Seq(truncated)
    return state


def assignment(
    epoch: int,
    primary: str,
    cfg: Config,
    *,
    prior: Sequence[Config] = (),
    activated_epoch: int = 0,
    incarnation: int = 1,
) -> Assignment:
    return Assignment(
        epoch=Epoch(epoch),
        primary=n(primary),
        primary_incarnation=Incarnation(incarnation),
        config=cfg,
        prior_configs=tuple(prior),
        activated_epoch=Epoch(activated_epoch),
    )


@dataclass
class Node:
    name: NodeId
    incarnation: Incarnation
    offset: float
    rate: float
    params: ReplicaParams
    disk: DurableState
    replica: Replica
    up: bool = True
    # Every entry handed to apply, by slot (kept across restarts: applied state is durable).
    applied: dict[Seq, Entry] = field(default_factory=dict)
    sm_events: list[SmEvent] = field(default_factory=list)
    reads_done: list[tuple[int, ServeNow | Refused]] = field(default_factory=list)
    snapshot_needed: list[NodeId] = field(default_factory=list)
    # Persisted commit points, in order (to check they never move backwards).
    commits: list[Seq] = field(default_factory=list)

    def events(self, kind: SmEventKind) -> list[SmEvent]:
        return [e for e in self.sm_events if e.kind is kind]


class Cluster:
    def __init__(
        self,
        names: str | Sequence[str],
        *,
        params: ReplicaParams = PARAMS,
        disks: dict[str, DurableState] | None = None,
        offsets: dict[str, float] | None = None,
        rates: dict[str, float] | None = None,
        start: float = 0.0,
        snapshots: bool = False,
    ) -> None:
        self.now = start
        self.start = start
        self.params = params
        self.nodes: dict[NodeId, Node] = {}
        self.inflight: list[Envelope] = []
        self.held: list[Envelope] = []
        self.outside: list[Envelope] = []
        # Every envelope any node sent, with the global time it left.
        self.sent: list[tuple[float, Envelope]] = []
        self.blocked: set[tuple[NodeId, NodeId]] = set()
        self.drop_if: EnvPred | None = None
        self.hold_if: EnvPred | None = None
        # With `snapshots`, a node asked to send a snapshot puts a one-chunk SnapshotChunk
        # on the wire (the host's job, emulated); its content is kept here by transfer.
        self.snapshots = snapshots
        self.snapshot_contents: dict[int, dict[Seq, Entry]] = {}
        self.snapshots_installed = 0
        for name in names:
            disk = (disks or {}).get(name, DurableState())
            node_id = n(name)
            offset = (offsets or {}).get(name, 0.0)
            self.nodes[node_id] = Node(
                name=node_id,
                incarnation=Incarnation(1),
                offset=offset,
                rate=(rates or {}).get(name, 1.0),
                params=params,
                disk=copy.deepcopy(disk),
                replica=self._build(node_id, Incarnation(1), disk, Instant(offset + start)),
                # What the disk says was applied before the scenario starts.
                applied={s: e for s, e in disk.entries.items() if s <= disk.applied_seq},
            )

    # ------------------------------------------------------------------ access

    def _build(self, name: NodeId, inc: Incarnation, disk: DurableState, now: Instant) -> Replica:
        return Replica(
            shard=SHARD,
            node=name,
            incarnation=inc,
            durable=copy.deepcopy(disk),
            now=now,
            params=self.params,
        )

    def node(self, name: str) -> Node:
        return self.nodes[n(name)]

    def r(self, name: str) -> Replica:
        return self.nodes[n(name)].replica

    def clock(self, name: str) -> Instant:
        """The node's own monotonic clock: its offset plus real time at its rate."""
        node = self.nodes[n(name)]
        return Instant(node.offset + self.start + (self.now - self.start) * node.rate)

    # ------------------------------------------------------------------ driving one node

    def flush(self, name: str) -> None:
        """Executes the node's Ready (persist → send → apply → advance) until it is empty."""
        node = self.nodes[n(name)]
        for _ in range(1000):
            ready = node.replica.ready()
            if ready.is_empty():
                return
            disk = node.disk
            if ready.promise is not None:
                disk.promise = ready.promise
            for e in ready.entries:
                disk.entries[e.seq] = e
            if ready.commit_seq is not None:
                assert ready.commit_seq >= disk.commit_seq, "commit point moved backwards"
                disk.commit_seq = ready.commit_seq
                node.commits.append(ready.commit_seq)
            if ready.truncate_through is not None:
                disk.truncated_seq = Seq(max(disk.truncated_seq, ready.truncate_through))
                for seq in [s for s in disk.entries if s <= ready.truncate_through]:
                    del disk.entries[seq]
            for env in ready.messages:
                assert env.src == node.name
                self.sent.append((self.now, env))
                self.inflight.append(env)
            for e in ready.committed:
                assert e.seq == disk.applied_seq + 1, (node.name, e.seq, disk.applied_seq)
                assert e.seq <= disk.commit_seq, "applied an entry that is not committed"
                node.applied[e.seq] = e
                disk.applied_seq = e.seq
            node.sm_events.extend(ready.sm_events)
            node.reads_done.extend(ready.reads_done)
            node.snapshot_needed.extend(ready.snapshot_needed)
            if self.snapshots:
                for peer in sorted(set(ready.snapshot_needed)):
                    self._send_snapshot(node, peer)
            node.replica.advance(ready, self.clock(name))
        raise AssertionError("Ready never drained")

    def _send_snapshot(self, node: Node, peer: NodeId) -> None:
        in_flight = any(
            isinstance(env.message, SnapshotChunk) and (env.src, env.dst) == (node.name, peer)
            for env in self.inflight
        )
        if in_flight:
            return
        seq = node.disk.applied_seq
        transfer = len(self.snapshot_contents) + 1
        self.snapshot_contents[transfer] = {s: e for s, e in node.applied.items() if s <= seq}
        b = node.replica.promise.ballot
        chunk = SnapshotChunk(b, transfer, seq, b, 0, (), True)
        env = Envelope(SHARD, node.name, peer, chunk)
        self.sent.append((self.now, env))
        self.inflight.append(env)

    def _install_snapshot(self, node: Node, chunk: SnapshotChunk) -> None:
        """What the host does with a complete snapshot: state, applied, commit and
        truncation points in one atomic batch, then `snapshot_installed`."""
        seq = chunk.snapshot_seq
        if seq <= node.disk.applied_seq:
            return
        content = self.snapshot_contents[chunk.transfer]
        for s, e in node.applied.items():
            if s in content:
                assert content[s].same_value(e), ("snapshot disagrees", node.name, s)
        node.applied.update(content)
        disk = node.disk
        disk.applied_seq = seq
        disk.commit_seq = Seq(max(disk.commit_seq, seq))
        disk.truncated_seq = seq
        disk.truncated_ballot = chunk.snapshot_ballot
        for s in [s for s in disk.entries if s <= seq]:
            del disk.entries[s]
        self.snapshots_installed += 1
        node.replica.snapshot_installed(seq, chunk.snapshot_ballot, self.clock(node.name))
        self.flush(node.name)

    def flush_all(self) -> None:
        for name in self.nodes:
            if self.nodes[name].up:
                self.flush(name)

    def assign(self, a: Assignment, to: Iterable[str] | None = None) -> None:
        """Gives the assignment to every live node (or to `to`), then flushes them."""
        names = [n(x) for x in to] if to is not None else list(self.nodes)
        for name in names:
            node = self.nodes[name]
            if node.up:
                node.replica.assign(a, self.clock(name))
                self.flush(name)

    def propose(self, name: str, value: bytes, wall_ms: int = 1) -> object:
        outcome = self.r(name).propose((value,), wall_ms, self.clock(name))
        self.flush(name)
        return outcome

    def read(
        self,
        name: str,
        *,
        strong: bool,
        bound_ms: float | None = None,
        min_seq: int | None = None,
    ) -> ReadDecision:
        decision = self.r(name).read(
            strong=strong,
            now=self.clock(name),
            bound_ms=bound_ms,
            min_seq=None if min_seq is None else Seq(min_seq),
        )
        self.flush(name)
        return decision

    # ------------------------------------------------------------------ network

    def inject(self, src: str, dst: str, message: Message) -> None:
        """Puts a message from `src` (a node or a scripted peer) on the wire."""
        self.inflight.append(Envelope(SHARD, n(src), n(dst), message))

    def deliver(self, env: Envelope) -> None:
        node = self.nodes.get(env.dst)
        if node is None:
            self.outside.append(env)
            return
        if not node.up:
            return
        if isinstance(env.message, SnapshotChunk) and self.snapshots:
            self._install_snapshot(node, env.message)
            return
        node.replica.step(env, self.clock(node.name))
        self.flush(node.name)

    def pump(self, *, drop: EnvPred | None = None, max_messages: int = 200_000) -> int:
        """Delivers in-flight messages in FIFO order until none is left; returns how many."""
        delivered = 0
        while self.inflight:
            env = self.inflight.pop(0)
            if (env.src, env.dst) in self.blocked:
                continue
            if (drop is not None and drop(env)) or (self.drop_if is not None and self.drop_if(env)):
                continue
            if self.hold_if is not None and self.hold_if(env):
                self.held.append(env)
                continue
            self.deliver(env)
            delivered += 1
            assert delivered < max_messages, "message storm"
        return delivered

    def take(self, pred: EnvPred) -> list[Envelope]:
        """Removes and returns the in-flight and held messages matching `pred`."""
        taken = [e for e in self.inflight if pred(e)] + [e for e in self.held if pred(e)]
        self.inflight = [e for e in self.inflight if not pred(e)]
        self.held = [e for e in self.held if not pred(e)]
        return taken

    def release(self, envs: Iterable[Envelope]) -> None:
        """Puts messages back on the wire (after any already in flight)."""
        self.inflight.extend(envs)

    def partition(self, *groups: str) -> None:
        """Blocks every link between nodes of different groups (`partition("ab", "c")`)."""
        self.blocked.clear()
        for i, g1 in enumerate(groups):
            for j, g2 in enumerate(groups):
                if i != j:
                    for x in g1:
                        for y in g2:
                            self.blocked.add((n(x), n(y)))

    def isolate(self, name: str) -> None:
        for other in self.nodes:
            if other != n(name):
                self.blocked.add((n(name), other))
                self.blocked.add((other, n(name)))

    def heal(self) -> None:
        self.blocked.clear()

    # ------------------------------------------------------------------ time

    def tick(self, names: Iterable[str] | None = None) -> None:
        targets = [n(x) for x in names] if names is not None else list(self.nodes)
        for name in targets:
            node = self.nodes[name]
            if node.up:
                node.replica.tick(self.clock(name))
                self.flush(name)

    def run(self, ms: float, *, step: float = 10.0, drop: EnvPred | None = None) -> None:
        """Advances time by `ms`, ticking every node and delivering everything each step."""
        end = self.now + ms
        self.pump(drop=drop)
        while self.now < end:
            self.now = min(end, self.now + step)
            self.tick()
            self.pump(drop=drop)

    def run_until(
        self,
        cond: Callable[[], bool],
        *,
        max_ms: float = 10_000.0,
        step: float = 10.0,
        drop: EnvPred | None = None,
    ) -> None:
        end = self.now + max_ms
        self.pump(drop=drop)
        while not cond():
            assert self.now < end, "condition not reached in time"
            self.now = min(end, self.now + step)
            self.tick()
            self.pump(drop=drop)

    # ------------------------------------------------------------------ faults

    def crash(self, name: str) -> None:
        """The node stops; whatever it had not persisted is lost."""
        self.nodes[n(name)].up = False

    def restart(self, name: str) -> None:
        node = self.nodes[n(name)]
        node.up = True
        node.replica = self._build(node.name, node.incarnation, node.disk, self.clock(name))

    # ------------------------------------------------------------------ scenarios

    def elect(self, a: Assignment, *, max_ms: float = 10_000.0) -> None:
        """Assigns and runs until the primary reports ACTIVATED."""
        primary = self.nodes[a.primary]
        before = len(primary.events(SmEventKind.ACTIVATED))
        self.assign(a)
        self.run_until(lambda: len(primary.events(SmEventKind.ACTIVATED)) > before, max_ms=max_ms)

    def committed_values(self, name: str) -> dict[int, bytes | None]:
        node = self.nodes[n(name)]
        return {int(s): value_of(e) for s, e in sorted(node.applied.items())}

    def assert_agreement(self) -> None:
        """Every slot applied by several nodes has one value on all of them."""
        seen: dict[Seq, tuple[NodeId, Entry]] = {}
        for node in self.nodes.values():
            for seq, e in node.applied.items():
                if seq in seen:
                    other, first = seen[seq]
                    assert first.same_value(e), (seq, other, first, node.name, e)
                else:
                    seen[seq] = (node.name, e)

    def sent_of(
        self, kind: type, *, src: str | None = None, dst: str | None = None
    ) -> list[Envelope]:
        return [
            env
            for _, env in self.sent
            if isinstance(env.message, kind)
            and (src is None or env.src == n(src))
            and (dst is None or env.dst == n(dst))
        ]

    def outside_of(self, kind: type, *, dst: str | None = None) -> list[Envelope]:
        return [
            env
            for env in self.outside
            if isinstance(env.message, kind) and (dst is None or env.dst == n(dst))
        ]


def is_msg(kind: type, *, src: str | None = None, dst: str | None = None) -> EnvPred:
    def pred(env: Envelope) -> bool:
        return (
            isinstance(env.message, kind)
            and (src is None or env.src == n(src))
            and (dst is None or env.dst == n(dst))
        )

    return pred
