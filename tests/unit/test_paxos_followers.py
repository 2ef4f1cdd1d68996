"""Followers (learners): they commit only what arrived in Learn messages, and a follower
promoted to acceptor reports a match point at least its commit point (sim seed 273)."""

from __future__ import annotations

import pytest
from paxos_harness import (
    Cluster,
    W,
    assignment,
    ballot,
    config,
    durable,
    entry,
    is_msg,
    n,
)

from loom.core.ids import Seq
from loom.paxos.messages import (
    Accept,
    Accepted,
    FreshnessProbe,
    FreshnessReply,
    Heartbeat,
    Learn,
    LearnAck,
    Prepare,
)
from loom.paxos.ready import Refused, SmEventKind
from loom.paxos.replica import Role

B1 = ballot(1, "p")
B2 = ballot(2, "q")
N1, N2, N3 = entry(B2, 1, b"n1"), entry(B2, 2, b"n2"), entry(B2, 3, b"n3")

# (Learn from the primary q, follower commit point after it, held_seq in its LearnAck)
LEARN_STEPS: list[tuple[Learn, int, int]] = [
    (Learn(B2, (), Seq(2)), 0, 0),  # a bare commit point commits nothing
    (Learn(B2, (N2,), Seq(2)), 0, 0),  # out of order: ignored
    (Learn(B2, (N1,), Seq(2)), 1, 1),
    (Learn(B2, (), Seq(2)), 1, 1),  # slot 2 still holds only the stale value
    (Learn(B2, (N2, N3), Seq(2)), 2, 2),  # n3 is beyond the sender's commit point
    (Learn(B2, (N3,), Seq(3)), 3, 3),
]


def test_follower_commits_only_entries_received_in_learn_messages() -> None:
    # x accepted s1, s2 long ago as an acceptor of epoch 1; neither was chosen.
    disk = durable(
        promise=B1,
        promise_config=config(1, "xp"),
        entries=[entry(B1, 1, b"s1"), entry(B1, 2, b"s2")],
    )
    c = Cluster("x", disks={"x": disk})
    c.now = W + 1
    c.r("x").assign(assignment(2, "q", config(2, "pq", "x")), c.clock("x"))
    assert c.r("x").role is Role.FOLLOWER
    for learn, commit, held in LEARN_STEPS:
        c.inject("q", "x", learn)
        c.pump()
        assert c.r("x").commit_seq == commit, learn
        ack = c.outside[-1].message
        assert isinstance(ack, LearnAck)
        assert (ack.ballot, ack.held_seq) == (B2, held), learn
    assert c.committed_values("x") == {1: b"n1", 2: b"n2", 3: b"n3"}


def test_follower_in_a_cluster_applies_the_committed_log_from_learn_messages_only() -> None:
    c = Cluster("abcd")
    c.now = W + 1
    c.elect(assignment(1, "a", config(1, "abc", "d")))
    for value in (b"v1", b"v2", b"v3"):
        c.propose("a", value)
    c.run(300)
    assert c.committed_values("d") == c.committed_values("a")
    assert c.committed_values("d") == {1: None, 2: b"v1", 3: b"v2", 4: b"v3"}
    to_d = {type(env.message) for env in c.sent_of(object, dst="d")}
    # No Prepare, Accept or Heartbeat: d does not vote (it probes for freshness).
    assert to_d == {Learn, FreshnessReply}
    from_d = {type(env.message) for env in c.sent_of(object, src="d")}
    assert from_d == {LearnAck, FreshnessProbe}


def test_follower_catches_up_after_missing_learn_messages() -> None:
    c = Cluster("abcd")
    c.now = W + 1
    c.elect(assignment(1, "a", config(1, "abc", "d")))
    c.drop_if = is_msg(Learn, dst="d")
    for value in (b"v1", b"v2"):
        c.propose("a", value)
    c.run(300)
    assert c.committed_values("d") == {1: None}
    c.drop_if = None
    c.propose("a", b"v3")
    c.run(1000)
    assert c.committed_values("d") == c.committed_values("a")


@pytest.mark.parametrize("first_b2_message", [Accept, Heartbeat])
def test_acceptor_that_learned_as_a_follower_reports_match_at_least_its_commit_point(
    first_b2_message: type,
) -> None:
    """Regression for simulator seed 273. d was a follower of epoch 1 and becomes an
    acceptor of epoch 2 ({a, b, d}, b down). It adopts ballot B2 with commit 0, then a
    delayed epoch-1 Learn commits 1..3 there. The primary re-sends 1..4; d skips slots at
    or below its commit point, so its match point must start from its commit point or
    the primary (which needs d's vote) can never commit."""
    cfg1 = config(1, "abc", "d")
    cfg2 = config(2, "abd")
    c = Cluster("abcd")
    c.now = W + 1
    c.hold_if = is_msg(Learn, dst="d")
    c.elect(assignment(1, "a", cfg1))
    for value in (b"v1", b"v2"):
        c.propose("a", value)
    c.run(300)
    assert c.r("a").commit_seq == 3
    assert c.r("d").commit_seq == 0
    epoch1_learns = c.take(is_msg(Learn, dst="d"))
    assert epoch1_learns

    c.isolate("b")
    c.hold_if = is_msg(first_b2_message, dst="d")
    c.assign(assignment(2, "a", cfg2, prior=(cfg1,), activated_epoch=1))
    c.run_until(lambda: c.r("a").role is Role.PRIMARY, max_ms=3 * W)
    assert c.sent_of(Prepare, src="a", dst="d") != []
    c.hold_if = is_msg(Accept, dst="d") if first_b2_message is Heartbeat else None
    # d adopts B2 while its commit point is still 0 ...
    first = c.take(is_msg(first_b2_message, dst="d"))
    c.release(first[:1])
    c.pump()
    assert c.r("d").match_ballot == ballot(2, "a")
    assert c.r("d").commit_seq == 0
    # ... then the delayed epoch-1 Learns commit 1..3 there.
    c.release(epoch1_learns)
    c.pump()
    assert c.r("d").commit_seq == 3
    c.hold_if = None
    c.release(c.take(lambda env: True))
    activated = c.node("a").events
    c.run_until(lambda: len(activated(SmEventKind.ACTIVATED)) == 2, max_ms=2000)
    assert activated(SmEventKind.ACTIVATED)[-1].ballot == ballot(2, "a")
    replies = [env.message for env in c.sent_of(Accepted, src="d")]
    assert all(isinstance(m, Accepted) and m.match_seq >= m.commit_seq for m in replies)
    assert not isinstance(c.propose("a", b"v3"), Refused)
    c.run(300)
    assert c.committed_values("d") == {1: None, 2: b"v1", 3: b"v2", 4: None, 5: b"v3"}
    assert c.r("a").commit_seq == 5
    lead = c.r("a").lead
    assert lead is not None
    assert n("d") in lead.peers
    c.assert_agreement()
