"""A member is (node, incarnation of its data directory): a node restarted on a wiped
disk is a new member, never the old one with amnesia (PITFALLS 19).

- the host: a replica with nothing on disk answers no peer until the manager names its
  incarnation, and ignores an assignment that names an earlier incarnation;
- the manager: it records each member's incarnation, treats a member reporting another
  one as gone, removes it from the config and adds it back as a new follower.
"""

from __future__ import annotations

from loom.core.ids import Ballot, Epoch, Incarnation, NodeId, Seq, ShardId
from loom.core.time import Instant, WallMs
from loom.host.shard import ShardHost
from loom.paxos.messages import Config, Envelope, Prepare
from loom.paxos.params import ReplicaParams
from loom.paxos.ready import SmEvent, SmEventKind
from loom.paxos.replica import Assignment
from loom.shardmgr.core import Announce, NodeReport, PersistEpoch, ShardManagerCore, SmParams
from loom.storage.memory import MemoryStore

SHARD = ShardId(1)
N1, N2, N3 = NodeId("n1"), NodeId("n2"), NodeId("n3")
CONFIG = Config(Epoch(2), (N1, N2, N3), ())


def fresh_host(node: NodeId = N3, incarnation: int = 2) -> ShardHost:
    return ShardHost(
        shard=SHARD,
        node=node,
        incarnation=Incarnation(incarnation),
        store=MemoryStore(),
        params=ReplicaParams(),
        now=Instant(0.0),
    )


def assignment(n3_incarnation: int) -> Assignment:
    return Assignment(
        epoch=Epoch(2),
        primary=N1,
        primary_incarnation=Incarnation(1),
        config=CONFIG,
        incarnations=(
            (N1, Incarnation(1)),
            (N2, Incarnation(1)),
            (N3, Incarnation(n3_incarnation)),
        ),
    )


def prepare(epoch: int) -> Envelope:
    ballot = Ballot(Epoch(epoch), N2, Incarnation(1))
    config = Config(Epoch(epoch), (N1, N2, N3), ())
    return Envelope(SHARD, N2, N3, Prepare(ballot=ballot, config=config, commit_seq=Seq(0)))


def test_a_fresh_replica_answers_no_peer_before_the_manager_names_it() -> None:
    host = fresh_host()
    host.on_message(prepare(3), Instant(10_000.0))
    assert host.flush(Instant(10_001.0), WallMs(0)).messages == []


def test_an_assignment_for_an_earlier_incarnation_is_ignored() -> None:
    host = fresh_host(incarnation=2)
    host.assign(assignment(n3_incarnation=1), Instant(0.0))
    assert not host.is_member
    host.on_message(prepare(3), Instant(10_000.0))
    assert host.flush(Instant(10_001.0), WallMs(0)).messages == []


def test_an_assignment_naming_this_incarnation_makes_it_a_member() -> None:
    host = fresh_host(incarnation=2)
    host.assign(assignment(n3_incarnation=2), Instant(0.0))
    assert host.is_member
    host.on_message(prepare(3), Instant(10_000.0))
    out = host.flush(Instant(10_001.0), WallMs(0))
    assert [type(e.message).__name__ for e in out.messages] == ["Promise"]


def test_with_the_amnesia_bug_a_wiped_replica_answers_as_the_old_member() -> None:
    host = ShardHost(
        shard=SHARD,
        node=N3,
        incarnation=Incarnation(2),
        store=MemoryStore(),
        params=ReplicaParams(bugs=frozenset({"amnesia"})),
        now=Instant(0.0),
    )
    host.assign(assignment(n3_incarnation=1), Instant(0.0))
    host.on_message(prepare(3), Instant(10_000.0))
    assert host.flush(Instant(10_001.0), WallMs(0)).messages


class _Rng:
    def random(self) -> float:
        return 1.0

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        return start


def report(node: NodeId, incarnation: int) -> NodeReport:
    return NodeReport(node=node, incarnation=Incarnation(incarnation), shards=())


def persist_all(core: ShardManagerCore, now: Instant) -> list[Assignment]:
    """Plays the metastore (every CAS succeeds) and returns the announced assignments."""
    announced = []
    while outputs := core.outputs():
        for output in outputs:
            if isinstance(output, PersistEpoch):
                core.epoch_persisted(
                    output.shard,
                    output.assignment,
                    stored=core.record(output.shard, output.assignment),
                    now=now,
                )
            elif isinstance(output, Announce):
                announced.append(output.assignment)
    return announced


def activate(core: ShardManagerCore, now: Instant) -> None:

    current = core.shards[SHARD].current
    core.on_event(
        SHARD, SmEvent(kind=SmEventKind.ACTIVATED, ballot=current.ballot, config=None), now
    )


def test_the_manager_replaces_a_member_that_comes_back_with_another_incarnation() -> None:
    core = ShardManagerCore(params=SmParams(), rng=_Rng())
    now = Instant(0.0)
    for node in (N1, N2, N3):
        core.on_report(report(node, 1), now)
    core.create_shard(SHARD, (N1, N2, N3), now)
    (first,) = persist_all(core, now)
    assert first.incarnation_of(N3) == Incarnation(1)
    activate(core, now)

    now = Instant(100.0)
    for node, incarnation in ((N1, 1), (N2, 1), (N3, 2)):  # n3's disk was wiped
        core.on_report(report(node, incarnation), now)
    core.tick(now)
    (removed,) = persist_all(core, now)
    assert N3 not in removed.config.members()  # the old member leaves first
    activate(core, now)

    core.tick(Instant(200.0))
    (added,) = persist_all(core, Instant(200.0))
    assert added.config.followers == (N3,)  # back as a new member, to catch up
    assert added.incarnation_of(N3) == Incarnation(2)
    assert added.epoch > removed.epoch > first.epoch
