"""The acceptor role, driven message by message: strict promises (PITFALLS 13), the lease
wait before a promise (PITFALLS 1, 16) and refusing messages from lower ballots.

One replica `x` is played against scripted peers (`p`, `q`, `z`) whose messages the test
writes by hand and whose inboxes are `Cluster.outside`.
"""

from __future__ import annotations

import pytest
from paxos_harness import PARAMS, Cluster, W, ballot, config, durable, entry, n

from loom.core.ids import Ballot, Seq
from loom.paxos.messages import (
    Accept,
    Accepted,
    Heartbeat,
    HeartbeatAck,
    Message,
    Nack,
    Prepare,
    Promise,
)
from loom.paxos.params import ReplicaParams

CFG = config(2, "xpq")
B1 = ballot(1, "p")
B2 = ballot(2, "q")


def lone_acceptor(
    *,
    promised: Ballot | None = None,
    params: ReplicaParams = PARAMS,
    offsets: dict[str, float] | None = None,
    rates: dict[str, float] | None = None,
) -> Cluster:
    """Acceptor `x`, built long ago (its restart wait is over) unless told otherwise."""
    disk = durable(promise=promised, promise_config=CFG if promised else None)
    c = Cluster("x", disks={"x": disk}, params=params, offsets=offsets, rates=rates)
    c.now += W + 1
    return c


def send(c: Cluster, src: str, message: Message) -> list[Message]:
    """Delivers one message to `x` and returns what `x` answered to `src`."""
    before = len(c.outside)
    c.inject(src, "x", message)
    c.pump()
    return [env.message for env in c.outside[before:] if env.dst == n(src)]


def tick(c: Cluster) -> None:
    c.tick()
    c.pump()


def prepare(b: Ballot, commit: int = 0) -> Prepare:
    return Prepare(b, CFG, Seq(commit))


# ---------------------------------------------------------------------- strict promises


@pytest.mark.parametrize(
    ("offered", "answer"),
    [
        pytest.param(ballot(5, "a"), Nack, id="same-epoch-other-node-below"),
        pytest.param(ballot(5, "b", 0), Nack, id="same-epoch-same-node-older-incarnation"),
        pytest.param(ballot(4, "z"), Nack, id="lower-epoch"),
        pytest.param(ballot(5, "c"), Promise, id="same-epoch-strictly-above"),
        pytest.param(ballot(6, "a"), Promise, id="higher-epoch"),
    ],
)
def test_acceptor_promises_only_ballots_strictly_above_its_promise(
    offered: Ballot, answer: type
) -> None:
    c = lone_acceptor(promised=ballot(5, "b"))
    replies = send(c, offered.node, prepare(offered))
    assert [type(m) for m in replies] == [answer]
    if answer is Nack:
        assert replies == [Nack(offered, ballot(5, "b"))]
        assert c.node("x").disk.promise.ballot == ballot(5, "b")
    else:
        assert c.node("x").disk.promise.ballot == offered


def test_acceptor_refuses_to_promise_an_equal_ballot_from_another_node() -> None:
    # Two candidates of one epoch (a faulty shard manager): once one is promised, the other
    # must not be promised too unless it is strictly greater. Ballot(5, a) < Ballot(5, b).
    c = lone_acceptor()
    assert [type(m) for m in send(c, "b", prepare(ballot(5, "b")))] == [Promise]
    assert send(c, "a", prepare(ballot(5, "a"))) == [Nack(ballot(5, "a"), ballot(5, "b"))]
    # An Accept from the refused same-epoch ballot is refused as well.
    acc = Accept(ballot(5, "a"), (entry(ballot(5, "a"), 1, b"v"),), Seq(0), 1)
    assert send(c, "a", acc) == [Nack(ballot(5, "a"), ballot(5, "b"))]
    assert c.r("x").log == {}


def test_the_promise_equal_ballot_bug_would_promise_a_same_epoch_ballot_below() -> None:
    # The deliberate bug flag shows the previous test bites.
    bugged = ReplicaParams(lease_ms=PARAMS.lease_ms, bugs=frozenset({"promise-equal-ballot"}))
    c = lone_acceptor(params=bugged)
    c.now += bugged.promise_wait_ms
    send(c, "b", prepare(ballot(5, "b")))
    assert [type(m) for m in send(c, "a", prepare(ballot(5, "a")))] == [Promise]


def test_acceptor_answers_a_retransmitted_prepare_of_its_promised_ballot_again() -> None:
    c = lone_acceptor(promised=B1)
    first = send(c, "q", prepare(B2))
    assert len(first) == 1
    assert isinstance(first[0], Promise)
    # The candidate did not hear the answer and sends the same Prepare again: same answer,
    # nothing new to persist.
    c.r("x").ready()
    second = send(c, "q", prepare(B2))
    assert second == first
    # Even after it accepted under that ballot (a grant!), the retransmission is answered
    # at once (no lease wait for a ballot already promised), now with the accepted entry.
    send(c, "q", Accept(B2, (entry(B2, 1, b"v"),), Seq(0), 1))
    c.now += 1
    third = send(c, "q", prepare(B2))
    assert len(third) == 1
    assert isinstance(third[0], Promise)
    assert third[0].entries == (entry(B2, 1, b"v"),)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(prepare(B1), id="prepare"),
        pytest.param(Accept(B1, (entry(B1, 1, b"old"),), Seq(0), 3), id="accept"),
        pytest.param(Heartbeat(B1, Seq(1), 3), id="heartbeat"),
    ],
)
def test_acceptor_nacks_every_message_from_a_ballot_below_its_promise(message: Message) -> None:
    c = lone_acceptor(promised=B2)
    assert send(c, "p", message) == [Nack(B1, B2)]
    assert c.r("x").log == {}
    assert c.r("x").commit_seq == 0


# ---------------------------------------------------------------------- lease wait


def test_acceptor_that_granted_a_lease_defers_its_promise_until_w_passed_on_its_own_clock() -> None:
    # x's clock runs slow (at 1 - ρ of real time) and far from the others' clocks: the
    # wait is W of x's own clock, i.e. W / (1 - ρ) of real time.
    rate = 1 - PARAMS.drift_bound
    c = lone_acceptor(promised=B1, offsets={"x": 1e6}, rates={"x": rate})
    acks = send(c, "p", Heartbeat(B1, Seq(0), 1))
    assert acks == [HeartbeatAck(B1, 1, True, Seq(0))]
    sent_at, granted_at = c.now, c.clock("x")
    c.now += 5
    assert send(c, "q", prepare(B2)) == []  # deferred, not refused
    real_wait = W / rate
    for dt in (W - 5, W + 5, real_wait - 1):  # W of real time is not enough
        c.now = sent_at + dt
        tick(c)
        assert c.outside_of(Promise) == [], dt
        assert c.clock("x") < granted_at + W
    c.now = sent_at + real_wait + 1
    tick(c)
    assert c.clock("x") >= granted_at + W
    assert len(c.outside_of(Promise, dst="q")) == 1
    assert c.node("x").disk.promise.ballot == B2


def test_acceptor_stops_granting_leases_to_a_lower_ballot_once_it_saw_a_higher_prepare() -> None:
    c = lone_acceptor(promised=B1)
    assert send(c, "p", Heartbeat(B1, Seq(0), 1)) == [HeartbeatAck(B1, 1, True, Seq(0))]
    granted_at = c.now
    c.now += 10
    assert send(c, "q", prepare(B2)) == []
    # The old primary still gets its entries accepted (it may still be the only one that
    # can commit), but no more lease.
    c.now += 10
    assert send(c, "p", Heartbeat(B1, Seq(0), 2)) == [HeartbeatAck(B1, 2, False, Seq(0))]
    e1 = entry(B1, 1, b"late")
    assert send(c, "p", Accept(B1, (e1,), Seq(0), 3)) == [Accepted(B1, Seq(1), 3, False, Seq(0))]
    # The refused grants did not push the promise back: it leaves W after the last grant.
    c.now = granted_at + W - 1
    tick(c)
    assert c.outside_of(Promise) == []
    c.now = granted_at + W
    tick(c)
    promises = [env.message for env in c.outside_of(Promise, dst="q")]
    assert len(promises) == 1
    assert isinstance(promises[0], Promise)
    assert promises[0].entries == (e1,)  # what it accepted meanwhile is reported
    # After promising B2, the old primary is refused outright.
    assert send(c, "p", Heartbeat(B1, Seq(0), 4)) == [Nack(B1, B2)]


def test_deferred_prepare_is_answered_for_the_highest_ballot_seen_meanwhile() -> None:
    c = lone_acceptor(promised=B1)
    send(c, "p", Heartbeat(B1, Seq(0), 1))
    granted_at = c.now
    b3 = ballot(3, "z")
    assert send(c, "q", prepare(B2)) == []
    assert send(c, "z", prepare(b3)) == []
    c.now = granted_at + W
    tick(c)
    assert [env.dst for env in c.outside_of(Promise)] == [n("z")]
    # The lower candidate's retransmission is now refused.
    assert send(c, "q", prepare(B2)) == [Nack(B2, b3)]


def test_restarted_acceptor_promises_nothing_for_w() -> None:
    c = lone_acceptor(promised=B1)
    send(c, "p", Accept(B1, (entry(B1, 1, b"v"),), Seq(0), 1))
    # Long after that grant expired, x restarts: it may have granted a lease it forgot.
    c.now += 5 * W
    c.crash("x")
    c.restart("x")
    restarted_at = c.now
    c.now += 1
    assert send(c, "q", prepare(B2)) == []
    c.now = restarted_at + W - 1
    tick(c)
    assert c.outside_of(Promise) == []
    c.now = restarted_at + W
    tick(c)
    promises = [env.message for env in c.outside_of(Promise, dst="q")]
    assert len(promises) == 1
    assert isinstance(promises[0], Promise)
    assert promises[0].entries == (entry(B1, 1, b"v"),)  # the persisted entry survived


def test_acceptor_adopts_a_higher_ballot_from_its_accept_without_a_prepare() -> None:
    # The sender of an Accept already holds a majority of promises; the acceptor takes it
    # as a promise (persisted) and no longer answers the lower ballot.
    c = lone_acceptor(promised=B1)
    e = entry(B2, 1, b"v")
    assert send(c, "q", Accept(B2, (e,), Seq(0), 1)) == [Accepted(B2, Seq(1), 1, True, Seq(0))]
    assert c.node("x").disk.promise.ballot == B2
    assert send(c, "p", Heartbeat(B1, Seq(0), 9)) == [Nack(B1, B2)]
