"""Planned hand-off (DESIGN §3): the old primary steps down and releases its lease, so its
successor activates without waiting W; a release never shortens the wait for anyone else."""

from __future__ import annotations

import dataclasses

from paxos_harness import PARAMS, Cluster, W, assignment, ballot, config

from loom.paxos.messages import LeaseRelease
from loom.paxos.ready import SmEventKind


def led_by_a() -> Cluster:
    c = Cluster("abc")
    c.now = W * 1.1
    c.elect(assignment(1, "a", config(1, "abc")))
    c.run(200)
    assert c.r("a").lease_valid(c.clock("a"))
    return c


def activation_ms(c: Cluster, name: str, *, limit_ms: float = 4 * W) -> float:
    """Virtual ms until `name` reports ACTIVATED (the harness clock, not real time)."""
    start = c.now
    c.run_until(lambda: c.node(name).events(SmEventKind.ACTIVATED) != [], max_ms=limit_ms)
    return c.now - start


def test_a_planned_hand_off_activates_the_successor_without_waiting_out_the_lease() -> None:
    c = led_by_a()
    handoff = dataclasses.replace(assignment(2, "b", config(2, "abc")), handoff=True)
    c.assign(handoff)
    assert not c.r("a").lease_valid(c.clock("a"))  # stepped down before releasing
    assert activation_ms(c, "b") < W / 2
    assert c.r("b").lease_valid(c.clock("b"))


def test_an_unplanned_change_of_primary_still_waits_out_the_lease() -> None:
    c = led_by_a()
    c.assign(assignment(2, "b", config(2, "abc")))
    assert activation_ms(c, "b") >= W * 0.9


def test_a_release_of_an_older_ballot_does_not_shorten_the_wait_for_a_later_one() -> None:
    c = led_by_a()
    c.inject("a", "c", LeaseRelease(ballot(0, "a")))
    c.pump()
    assert c.r("c").released_ballot is None
    # Nor may another node release a's lease.
    c.inject("b", "c", LeaseRelease(ballot(1, "a")))
    c.pump()
    assert c.r("c").released_ballot is None


def test_an_acceptor_grants_nothing_to_a_ballot_it_released() -> None:
    c = led_by_a()
    # Releases as if a had stepped down, while a (never told) goes on heartbeating: the
    # acceptors grant it nothing more, so its lease runs out instead of being renewed.
    for peer in "bc":
        c.inject("a", peer, LeaseRelease(ballot(1, "a")))
    c.pump()
    assert c.r("b").released_ballot == ballot(1, "a")
    c.run(PARAMS.lease_ms * 1.5)
    assert not c.r("a").lease_valid(c.clock("a"))


def test_a_restarted_acceptor_ignores_a_release_since_it_forgot_whom_it_granted() -> None:
    c = led_by_a()
    c.restart("b")  # and the hand-off comes before a's next heartbeat reaches it
    handoff = dataclasses.replace(assignment(2, "c", config(2, "abc")), handoff=True)
    c.assign(handoff)
    c.pump()
    assert c.r("b").released_ballot is None  # waits out W, as after any restart
    assert c.r("c").released_ballot == ballot(1, "a")
    # a and c released: they make a majority, so c still activates at once.
    assert activation_ms(c, "c") < W / 2
