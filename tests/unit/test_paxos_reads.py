"""Reads (DESIGN §3, PITFALLS 6, 16): lease reads, STRONG reads without a lease, and
bounded-staleness reads at a follower proven by a probe round trip on its own clock."""

from __future__ import annotations

import pytest
from paxos_harness import (
    PARAMS,
    Cluster,
    W,
    assignment,
    ballot,
    config,
    is_msg,
    n,
)

from loom.core.ids import Seq
from loom.core.time import Instant
from loom.paxos.messages import (
    Accepted,
    Envelope,
    FreshnessProbe,
    FreshnessReply,
    Heartbeat,
    HeartbeatAck,
    Learn,
    Prepare,
)
from loom.paxos.reads import ReadQueue
from loom.paxos.ready import ReadPending, Ready, RefusalReason, Refused, ServeNow

L = PARAMS.lease_ms
CFG = config(1, "abc", "d")


def cluster(
    offsets: dict[str, float] | None = None, rates: dict[str, float] | None = None
) -> Cluster:
    c = Cluster("abcd", offsets=offsets, rates=rates)
    c.now = W + 1
    c.elect(assignment(1, "a", CFG))
    c.run(200)
    return c


def acks_to_a(env: Envelope) -> bool:
    return env.dst == "a" and isinstance(env.message, (Accepted, HeartbeatAck))


# ---------------------------------------------------------------------- primary


def test_strong_read_is_a_lease_read_only_while_the_lease_is_valid() -> None:
    c = cluster()
    assert c.read("a", strong=True) == ServeNow(lease_read=True)
    # Acknowledgements stop: the lease runs out L after the last acknowledged round was
    # *sent*, on a's clock.
    c.drop_if = acks_to_a
    last_sent = max(t for t, env in c.sent if isinstance(env.message, Heartbeat))
    c.run(L - 250)
    assert c.r("a").lease_valid(c.clock("a"))
    assert c.read("a", strong=True) == ServeNow(lease_read=True)
    c.run(300)
    assert c.now > last_sent + L
    assert not c.r("a").lease_valid(c.clock("a"))
    assert isinstance(c.read("a", strong=True), ReadPending)


def test_lease_counts_from_when_the_round_was_sent_not_when_the_answer_came() -> None:
    c = cluster()
    c.drop_if = acks_to_a
    c.run(L + 100)  # every lease has run out
    assert not c.r("a").lease_valid(c.clock("a"))
    c.drop_if = None
    c.hold_if = acks_to_a
    c.run(c.params.heartbeat_interval_ms)
    sent_at = c.now
    acks = c.take(acks_to_a)
    c.hold_if = None
    assert acks
    c.now += 300  # the answers arrive late
    c.release(acks)
    c.pump()
    r = c.r("a")
    assert r.lease_valid(c.clock("a"))
    assert r.lease_valid(Instant(sent_at + L - 1))
    assert not r.lease_valid(Instant(sent_at + L))  # not sent_at + 300 + L


def test_primary_has_no_lease_once_its_own_acceptor_saw_a_higher_prepare() -> None:
    c = cluster()
    assert c.r("a").lease_valid(c.clock("a"))
    c.inject("z", "a", Prepare(ballot(2, "z"), config(2, "abz"), Seq(0)))
    c.pump()
    assert c.r("a").lead is not None  # still primary (its promise is deferred) ...
    assert not c.r("a").lease_valid(c.clock("a"))  # ... but no lease reads
    assert isinstance(c.read("a", strong=True), ReadPending)
    # Nor does it answer freshness probes any more.
    before = len(c.sent_of(FreshnessReply, src="a"))
    c.run(300)
    assert len(c.sent_of(FreshnessReply, src="a")) == before


def test_strong_read_without_lease_waits_for_a_round_sent_after_it_arrived() -> None:
    c = cluster()
    c.hold_if = acks_to_a
    c.run(100)
    old_acks = c.take(acks_to_a)  # answers to rounds sent before the read (and > L ago)
    c.hold_if = None
    c.drop_if = acks_to_a
    c.run(L + 50)
    c.drop_if = None
    assert old_acks
    assert not c.r("a").lease_valid(c.clock("a"))
    read_committed = c.r("a").commit_seq
    decision = c.read("a", strong=True)
    assert isinstance(decision, ReadPending)
    # The read sent its own confirmation round at once.
    fresh_round = c.take(is_msg(Heartbeat, src="a"))
    assert {env.dst for env in fresh_round} == {"b", "c"}
    # Answers to older rounds neither confirm it nor renew the lease, however late.
    c.release(old_acks)
    c.pump()
    assert c.node("a").reads_done == []
    assert not c.r("a").lease_valid(c.clock("a"))
    # A majority (a itself + b) answering the new round does both.
    c.release(fresh_round[:1])
    c.pump()
    assert c.node("a").reads_done == [(decision.token, ServeNow())]
    assert c.r("a").applied_seq >= read_committed
    assert c.r("a").lease_valid(c.clock("a"))


def test_strong_read_without_lease_times_out_when_no_round_is_confirmed() -> None:
    c = cluster()
    c.drop_if = acks_to_a
    c.run(L + 100)
    decision = c.read("a", strong=True)
    assert isinstance(decision, ReadPending)
    c.run(c.params.read_wait_max_ms - 20)
    assert c.node("a").reads_done == []
    c.run(40)
    assert c.node("a").reads_done == [
        (decision.token, Refused(reason=RefusalReason.TIMEOUT, retry_after_ms=50))
    ]


def test_strong_read_served_after_a_confirmed_round_reads_at_least_its_commit_point() -> None:
    c = cluster()
    a = c.r("a")
    c.hold_if = acks_to_a
    c.propose("a", b"w")
    c.pump()
    accepted = c.take(is_msg(Accepted, dst="a"))
    c.hold_if = None
    c.drop_if = acks_to_a
    c.run(L + 100)  # the lease is gone; the write is still uncommitted
    c.drop_if = None
    assert a.commit_seq == 1
    # The old answers commit the write but grant no lease (their round is old). The read
    # arrives before the driver applied it: its read index is 2.
    for env in accepted:
        a.step(env, c.clock("a"))
    assert (a.commit_seq, a.applied_seq) == (2, 1)
    decision = a.read(strong=True, now=c.clock("a"))
    assert isinstance(decision, ReadPending)
    c.flush("a")  # apply 2, send the confirmation round
    assert c.node("a").reads_done == []
    c.pump()
    assert c.node("a").reads_done == [(decision.token, ServeNow())]
    assert c.committed_values("a")[2] == b"w"


@pytest.mark.parametrize(
    ("events", "served_after"),
    [
        pytest.param(["confirm", "apply"], "apply", id="confirmed-then-applied"),
        pytest.param(["apply", "confirm"], "confirm", id="applied-then-confirmed"),
        pytest.param(["old-round", "apply"], None, id="an-older-round-confirms-nothing"),
    ],
)
def test_read_queue_serves_a_confirmed_read_only_once_apply_reached_its_read_index(
    events: list[str], served_after: str | None
) -> None:
    queue = ReadQueue(PARAMS)
    queue.on_applied(Seq(4), Ready())
    decision = queue.wait_for_round(7, Seq(5), Instant(0.0))
    assert isinstance(decision, ReadPending)
    for event in events:
        out = Ready()
        match event:
            case "confirm":
                queue.on_round_confirmed(7, out)
            case "old-round":
                queue.on_round_confirmed(6, out)
            case "apply":
                queue.on_applied(Seq(5), out)
        done = out.reads_done == [(decision.token, ServeNow())]
        assert done == (event == served_after), event


def test_strong_read_at_a_non_primary_is_refused_with_a_hint() -> None:
    c = cluster()
    refused = c.read("b", strong=True)
    assert refused == Refused(
        reason=RefusalReason.NOT_PRIMARY, primary_hint=n("a"), retry_after_ms=50
    )


# ---------------------------------------------------------------------- bounded reads


def test_bounded_read_at_a_follower_is_served_with_a_recent_freshness_proof() -> None:
    # d's clock is far away and runs fast: only its own readings are compared.
    c = cluster(offsets={"d": 5e6}, rates={"d": 1 + PARAMS.drift_bound})
    assert isinstance(c.read("d", strong=False, bound_ms=300), ServeNow)


@pytest.mark.parametrize(
    ("bound_ms", "served"),
    [(100.0, False), (151.0, False), (152.0, True), (250.0, True)],
)
def test_bounded_read_is_measured_from_when_the_probe_was_sent(
    bound_ms: float, served: bool
) -> None:
    # A proof that arrives 150 ms after its probe left is 150 ms old, and the bound is
    # shrunk by the drift bound (151 · 0.99 < 150 ≤ 152 · 0.99).
    c = cluster(offsets={"d": -3e6})
    c.drop_if = is_msg(FreshnessReply, dst="d")
    c.run(400)  # no proof younger than 400 ms
    c.drop_if = None
    c.hold_if = is_msg(FreshnessReply, dst="d")
    c.run_until(lambda: c.held != [], max_ms=200)
    probes = c.sent_of(FreshnessProbe, src="d")
    probe_sent_at = max(t for t, env in c.sent if env in probes)
    assert probe_sent_at == c.now
    c.hold_if = None
    replies = c.take(is_msg(FreshnessReply, dst="d"))
    assert len(replies) == 1
    c.now = probe_sent_at + 150  # no tick meanwhile: no newer probe
    c.release(replies)
    c.pump()
    decision = c.read("d", strong=False, bound_ms=bound_ms)
    if served:
        assert decision == ServeNow()
    else:
        assert isinstance(decision, ReadPending)
        c.drop_if = is_msg(FreshnessReply, dst="d")
        c.run(bound_ms + 10)
        assert c.node("d").reads_done == [
            (decision.token, Refused(reason=RefusalReason.TOO_STALE, retry_after_ms=50))
        ]


def test_bounded_read_is_refused_when_the_primary_holds_no_lease() -> None:
    c = cluster()
    # a loses its acceptors (b, c) but still reaches the follower d.
    c.partition("ad", "bc")
    c.run(L + 400)
    assert not c.r("a").lease_valid(c.clock("a"))
    decision = c.read("d", strong=False, bound_ms=200)
    assert isinstance(decision, ReadPending)
    c.run(300)
    assert c.sent_of(FreshnessProbe, src="d", dst="a") != []
    assert c.node("d").reads_done == [
        (decision.token, Refused(reason=RefusalReason.TOO_STALE, retry_after_ms=50))
    ]
    # A one-way Learn heartbeat from a proves nothing.
    assert c.sent_of(Learn, src="a", dst="d") != []


def test_bounded_read_waits_until_the_follower_applied_the_proven_commit_point() -> None:
    c = cluster()
    c.hold_if = is_msg(Learn, dst="d")
    c.propose("a", b"w")
    c.run(250)  # a's commit point 2 is in the freshness replies, d applied only 1
    assert c.r("d").applied_seq == 1
    decision = c.read("d", strong=False, bound_ms=500)
    assert isinstance(decision, ReadPending)
    c.run(20)
    assert c.node("d").reads_done == []
    c.hold_if = None
    c.release(c.take(is_msg(Learn, dst="d")))
    c.run(20)
    assert c.r("d").applied_seq == 2
    assert c.node("d").reads_done == [(decision.token, ServeNow())]


def test_read_your_writes_at_a_follower_waits_until_apply_reaches_the_clients_version() -> None:
    c = cluster()
    c.hold_if = is_msg(Learn, dst="d")
    c.propose("a", b"w")
    c.run(150)
    assert c.r("d").applied_seq == 1
    assert c.read("d", strong=False, min_seq=1) == ServeNow()
    waiting = c.read("d", strong=False, min_seq=2)
    assert isinstance(waiting, ReadPending)
    c.hold_if = None
    c.release(c.take(is_msg(Learn, dst="d")))
    c.run(20)
    assert c.node("d").reads_done == [(waiting.token, ServeNow())]
    # A version it never reaches: refused once the wait is over.
    never = c.read("d", strong=False, min_seq=99)
    assert isinstance(never, ReadPending)
    c.run(c.params.read_wait_max_ms + 20)
    assert c.node("d").reads_done[-1] == (
        never.token,
        Refused(reason=RefusalReason.TOO_STALE, retry_after_ms=50),
    )
