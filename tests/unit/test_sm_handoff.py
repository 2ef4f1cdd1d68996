"""The shard manager's side of a graceful hand-off: it hands a primary only to a live,
caught-up acceptor of a settled p-shard and marks the assignment a hand-off; membership
changes that keep their primary are hand-offs too; a restarted manager gives nodes time
to report before it counts their primaries dead."""

from __future__ import annotations

import random

from loom.core.ids import Epoch, Incarnation, NodeId, Seq, ShardId
from loom.core.time import Instant
from loom.paxos.ready import SmEvent, SmEventKind
from loom.shardmgr.core import (
    NodeReport,
    PersistEpoch,
    ShardManagerCore,
    ShardProgress,
    SmParams,
)

SHARD = ShardId(1)
NODES = (NodeId("n1"), NodeId("n2"), NodeId("n3"))


def report(core: ShardManagerCore, node: NodeId, now: float, *, applied: int) -> None:
    progress = ShardProgress(
        shard=SHARD,
        last_seq=Seq(applied),
        commit_seq=Seq(applied),
        applied_seq=Seq(applied),
        is_primary=node == core.shards[SHARD].current.primary if SHARD in core.shards else False,
    )
    core.on_report(
        NodeReport(node=node, incarnation=Incarnation(1), shards=(progress,)), Instant(now)
    )


def settle(core: ShardManagerCore, now: float) -> PersistEpoch:
    """Stores the pending epoch and reports it activated; returns what was stored."""
    persisted = [o for o in core.outputs() if isinstance(o, PersistEpoch)]
    assert len(persisted) == 1
    output = persisted[0]
    core.epoch_persisted(
        SHARD,
        output.assignment,
        stored=core.record(output.shard, output.assignment),
        now=Instant(now),
    )
    event = SmEvent(kind=SmEventKind.ACTIVATED, ballot=output.assignment.ballot, config=None)
    core.on_event(SHARD, event, Instant(now))
    return output


def active_core() -> ShardManagerCore:
    core = ShardManagerCore(params=SmParams(), rng=random.Random(1))
    for node in NODES:
        report(core, node, 0, applied=0)
    core.create_shard(SHARD, NODES, Instant(0))
    settle(core, 0)
    for node in NODES:
        report(core, node, 10, applied=100)
    return core


def test_a_hand_off_goes_to_a_caught_up_acceptor_and_is_marked_as_one() -> None:
    core = active_core()
    assert core.transfer_problem(SHARD, NodeId("n2"), Instant(20)) is None
    assert core.transfer_primary(SHARD, NodeId("n2"), Instant(20))
    output = settle(core, 20)
    assert output.assignment.primary == "n2"
    assert output.assignment.epoch == Epoch(2)
    assert output.assignment.handoff


def test_a_lagging_target_is_refused_until_it_has_caught_up() -> None:
    core = active_core()
    report(core, NodeId("n3"), 20, applied=10)  # 90 entries behind, slack is 64
    problem = core.transfer_problem(SHARD, NodeId("n3"), Instant(20))
    assert problem is not None and "caught up" in problem
    assert not core.transfer_primary(SHARD, NodeId("n3"), Instant(20))
    report(core, NodeId("n3"), 30, applied=100)
    assert core.transfer_primary(SHARD, NodeId("n3"), Instant(30))


def test_no_hand_off_to_a_non_member_the_primary_itself_or_a_silent_node() -> None:
    core = active_core()
    assert "not an acceptor" in (core.transfer_problem(SHARD, NodeId("n9"), Instant(20)) or "")
    assert "already" in (core.transfer_problem(SHARD, NodeId("n1"), Instant(20)) or "")
    later = Instant(20 + core.p.failure_timeout_ms + 1)
    report(core, NodeId("n1"), later, applied=100)  # n2 falls silent
    assert "not live" in (core.transfer_problem(SHARD, NodeId("n2"), later) or "")
    assert "no p-shard" in (core.transfer_problem(ShardId(9), NodeId("n2"), later) or "")


def test_adding_a_member_under_the_same_primary_is_a_hand_off() -> None:
    core = active_core()
    report(core, NodeId("n4"), 20, applied=0)
    core.replace_member(SHARD, NodeId("n3"), NodeId("n4"))
    core.tick(Instant(20))
    output = settle(core, 20)
    assert output.assignment.config.followers == ("n4",)
    assert output.assignment.primary == "n1" and output.assignment.handoff


def test_a_restarted_manager_waits_for_reports_before_failing_a_primary_over() -> None:
    core = active_core()
    record = core.record(SHARD)
    fresh = ShardManagerCore(params=SmParams(), rng=random.Random(1))
    fresh.restore(SHARD, record, Instant(1_000))
    report(fresh, NodeId("n2"), 1_001, applied=100)  # n1 has not reported yet
    fresh.tick(Instant(1_050))
    assert [o for o in fresh.outputs() if isinstance(o, PersistEpoch)] == []
    # Still silent after the failure timeout: now it is failed over.
    report(fresh, NodeId("n2"), 1_700, applied=100)
    fresh.tick(Instant(1_700))
    persisted = [o for o in fresh.outputs() if isinstance(o, PersistEpoch)]
    assert [p.assignment.primary for p in persisted] == ["n2"]
    assert not persisted[0].assignment.handoff


def test_the_activation_timeout_runs_from_the_announcement_not_the_allocation() -> None:
    core = active_core()
    assert core.transfer_primary(SHARD, NodeId("n2"), Instant(20))
    (output,) = [o for o in core.outputs() if isinstance(o, PersistEpoch)]
    stored_at = 20 + 7_000  # the metastore took 7 s
    for node in NODES:
        report(core, node, stored_at, applied=100)
    core.epoch_persisted(
        SHARD,
        output.assignment,
        stored=core.record(output.shard, output.assignment),
        now=Instant(stored_at),
    )
    core.outputs()
    core.tick(Instant(stored_at + 100))
    assert [o for o in core.outputs() if isinstance(o, PersistEpoch)] == []  # not "stuck"
