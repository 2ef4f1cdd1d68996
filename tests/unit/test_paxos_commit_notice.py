"""Commit notices (PITFALLS 14): a commit point from ballot b commits only entries the
receiver holds under b, never a stale value it accepted under an older ballot."""

from __future__ import annotations

import pytest
from paxos_harness import (
    PARAMS,
    Cluster,
    W,
    assignment,
    ballot,
    config,
    durable,
    entry,
    is_msg,
    value_of,
)

from loom.core.ids import Seq
from loom.paxos.messages import Accept, Accepted, Heartbeat, HeartbeatAck, Message
from loom.paxos.params import ReplicaParams

CFG = config(2, "xpq")
B1 = ballot(1, "p")
B2 = ballot(2, "q")
STALE = entry(B1, 2, b"stale")
FRESH = entry(B2, 2, b"fresh")
NOOP3 = entry(B2, 3, None)


def acceptor_with_stale_slot(params: ReplicaParams = PARAMS) -> Cluster:
    """x committed slot 1 and holds slot 2 under the old ballot B1 (never chosen)."""
    disk = durable(
        promise=B1,
        promise_config=CFG,
        entries=[entry(B1, 1, b"v1"), STALE],
        commit=1,
        applied=1,
    )
    c = Cluster("x", disks={"x": disk}, params=params)
    c.now = W + 1
    return c


# (message from the new primary q, x's commit point after it, x's match point reported)
STEPS: dict[str, list[tuple[Message, int, int]]] = {
    "heartbeat-then-own-value": [
        (Heartbeat(B2, Seq(2), 1), 1, 1),
        (Heartbeat(B2, Seq(3), 2), 1, 1),
        (Accept(B2, (FRESH, NOOP3), Seq(3), 3), 3, 3),
    ],
    "accept-above-the-stale-slot-then-own-value": [
        (Accept(B2, (NOOP3,), Seq(3), 1), 1, 1),
        (Heartbeat(B2, Seq(3), 2), 1, 1),
        (Accept(B2, (FRESH,), Seq(3), 3), 3, 3),
    ],
    "own-value-then-later-commit-notice": [
        (Accept(B2, (FRESH,), Seq(1), 1), 1, 2),
        (Heartbeat(B2, Seq(2), 2), 2, 2),
    ],
}


@pytest.mark.parametrize("steps", list(STEPS.values()), ids=list(STEPS))
def test_acceptor_commits_only_entries_held_under_the_ballot_of_the_commit_notice(
    steps: list[tuple[Message, int, int]],
) -> None:
    c = acceptor_with_stale_slot()
    for message, commit, match in steps:
        c.inject("q", "x", message)
        c.pump()
        reply = c.outside[-1].message
        assert isinstance(reply, (Accepted, HeartbeatAck))
        assert reply.match_seq == match, message
        assert c.r("x").commit_seq == commit, message
    applied = c.committed_values("x")
    assert b"stale" not in applied.values()
    assert applied[2] == b"fresh"


def test_acceptor_does_not_commit_a_stale_value_on_a_newer_commit_notice() -> None:
    c = acceptor_with_stale_slot()
    c.inject("q", "x", Heartbeat(B2, Seq(6), 1))
    c.pump()
    assert c.r("x").commit_seq == 1
    assert c.node("x").disk.commit_seq == 1
    assert c.committed_values("x") == {1: b"v1"}


def test_the_commit_stale_entry_bug_would_commit_the_stale_value() -> None:
    bugged = ReplicaParams(lease_ms=PARAMS.lease_ms, bugs=frozenset({"commit-stale-entry"}))
    c = acceptor_with_stale_slot(bugged)
    c.now += bugged.promise_wait_ms
    c.inject("q", "x", Heartbeat(B2, Seq(6), 1))
    c.pump()
    assert c.committed_values("x")[2] == b"stale"


def test_restarted_old_primary_does_not_commit_its_own_unchosen_value() -> None:
    # The PITFALLS 14 story: a's value for slot 2 reached nobody; a crashed; b became
    # primary and committed other values at 2..; a came back and hears commit_seq ≥ 2.
    c = Cluster("abc")
    c.now = W + 1
    cfg1, cfg2 = config(1, "abc"), config(2, "abc")
    c.elect(assignment(1, "a", cfg1))
    c.run(200)
    assert c.propose("a", b"lost") is not None
    assert len(c.take(is_msg(Accept, src="a"))) == 2  # lost on the wire
    assert value_of(c.node("a").disk.entries[Seq(2)]) == b"lost"
    c.crash("a")
    c.elect(assignment(2, "b", cfg2))
    for value in (b"w3", b"w4"):
        c.propose("b", value)
    c.run(300)
    assert c.committed_values("b") == {1: None, 2: None, 3: b"w3", 4: b"w4"}
    c.restart("a")
    # The first heartbeat from b carries commit_seq 4: a holds slot 2 under B1 only.
    c.run_until(lambda: c.sent_of(HeartbeatAck, src="a") != [], max_ms=500)
    first_ack = c.sent_of(HeartbeatAck, src="a")[0].message
    assert isinstance(first_ack, HeartbeatAck)
    assert first_ack.match_seq == 1
    assert all(commit <= 1 for commit in c.node("a").commits)
    # Once b's own entries reach it, a commits b's values.
    c.run(1000)
    assert c.committed_values("a") == {1: None, 2: None, 3: b"w3", 4: b"w4"}
    assert c.r("a").lead is None
    c.assert_agreement()
