"""A replica across restarts, hand-offs and snapshot installs."""

from __future__ import annotations

import pytest
from paxos_harness import Cluster, W, assignment, ballot, config, durable, entry

from loom.core.ids import Seq
from loom.paxos.messages import Nack, Prepare
from loom.paxos.ready import ReadPending, RefusalReason, Refused, ServeNow, SmEventKind
from loom.paxos.replica import Role

CFG1 = config(1, "abc")
CFG2 = config(2, "abc")


def test_restarted_primary_never_resumes_its_old_ballot() -> None:
    c = Cluster("abc")
    c.now = W + 1
    first = assignment(1, "a", CFG1)
    c.elect(first)
    c.propose("a", b"v")
    c.run(200)
    c.crash("a")
    c.restart("a")
    # Same node, same data directory (same incarnation): the same assignment again.
    c.assign(first, to="a")
    assert c.node("a").sm_events[-1].kind is SmEventKind.BALLOT_STALE
    assert c.r("a").lead is None
    assert c.r("a").role is Role.ACCEPTOR
    assert isinstance(c.propose("a", b"w"), Refused)
    # A fresh epoch works (after the restart wait of its own acceptor).
    c.elect(assignment(2, "a", CFG2), max_ms=3 * W)
    c.propose("a", b"w")
    c.run(200)
    assert c.committed_values("b") == {1: None, 2: b"v", 3: None, 4: b"w"}


def test_assignment_for_another_incarnation_is_stale() -> None:
    c = Cluster("abc")
    c.now = W + 1
    c.assign(assignment(1, "a", CFG1, incarnation=2), to="a")
    assert [e.kind for e in c.node("a").sm_events] == [SmEventKind.BALLOT_STALE]
    assert c.sent_of(Prepare) == []


def test_primary_steps_down_on_a_nack_with_a_higher_promise_and_refuses_pending_reads() -> None:
    c = Cluster("abc")
    c.now = W + 1
    c.elect(assignment(1, "a", CFG1))
    # Without a lease (acknowledgements lost), a STRONG read waits for a round.
    c.drop_if = lambda env: env.dst == "a" and env.src != "a"
    c.run(c.params.lease_ms + 100)
    decision = c.read("a", strong=True)
    assert isinstance(decision, ReadPending)
    c.drop_if = None
    c.inject("b", "a", Nack(ballot(1, "a"), ballot(2, "b")))
    c.pump()
    assert c.r("a").lead is None
    assert c.node("a").events(SmEventKind.STEPPED_DOWN) != []
    assert c.node("a").reads_done == [
        (decision.token, Refused(reason=RefusalReason.NOT_PRIMARY, retry_after_ms=50))
    ]
    refused = c.propose("a", b"x")
    assert isinstance(refused, Refused)
    assert refused.reason is RefusalReason.NOT_PRIMARY


@pytest.mark.parametrize(
    ("snapshot_seq", "expected"),
    [
        # (applied, commit, truncated, log slots kept)
        pytest.param(8, (8, 8, 8, [9, 10]), id="ahead-of-commit"),
        pytest.param(5, (5, 6, 5, [6, 7, 8, 9, 10]), id="between-applied-and-commit"),
        pytest.param(3, (4, 6, 3, [4, 5, 6, 7, 8, 9, 10]), id="behind-applied"),
    ],
)
def test_snapshot_installed_moves_applied_commit_and_truncated_forward_and_drops_entries(
    snapshot_seq: int, expected: tuple[int, int, int, list[int]]
) -> None:
    b1 = ballot(1, "p")
    disk = durable(
        promise=b1,
        promise_config=config(1, "xp"),
        entries=[entry(b1, s, f"v{s}".encode()) for s in range(1, 11)],
        commit=6,
        applied=4,
    )
    c = Cluster("x", disks={"x": disk})
    c.now = W + 1
    x = c.r("x")
    waiting = x.read(strong=False, now=c.clock("x"), min_seq=Seq(5))
    assert isinstance(waiting, ReadPending)
    x.snapshot_installed(Seq(snapshot_seq), b1, c.clock("x"))
    applied, commit, truncated, kept = expected
    assert (x.applied_seq, x.commit_seq, x.truncated_seq) == (applied, commit, truncated)
    assert sorted(x.log) == kept
    assert x.last_seq == 10
    assert x.match_seq >= min(snapshot_seq, 10)
    # The driver installed the snapshot; what is committed above it is applied next.
    c.node("x").disk.applied_seq = x.applied_seq
    c.node("x").disk.commit_seq = x.commit_seq
    c.flush("x")
    assert x.applied_seq == max(commit, applied)
    assert (waiting.token, ServeNow()) in c.node("x").reads_done
