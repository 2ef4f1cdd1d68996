"""Leases across a fail-over (PITFALLS 1, 16): while the old primary may still believe in
its lease, no new primary gets one, whatever the clock rates within the drift bound."""

from __future__ import annotations

import pytest
from paxos_harness import PARAMS, Cluster, W, assignment, config

from loom.paxos.params import ReplicaParams
from loom.paxos.ready import SmEventKind

RHO = PARAMS.drift_bound
RATES = {
    "equal-clocks": {},
    "old-primary-slow-voters-fast": {"a": 1 - RHO * 0.95, "b": 1 + RHO * 0.95, "c": 1 + RHO * 0.95},
    "old-primary-fast-voters-slow": {"a": 1 + RHO * 0.95, "b": 1 - RHO * 0.95, "c": 1 - RHO * 0.95},
}


def failover(rates: dict[str, float], params: ReplicaParams = PARAMS) -> tuple[float, float]:
    """a leads epoch 1, is cut off, b is elected in epoch 2. Returns (real time a's lease
    ended, real time b's lease began); asserts no moment had two lease holders."""
    c = Cluster("abc", rates=rates, params=params)
    c.now = params.promise_wait_ms * 1.1
    c.elect(assignment(1, "a", config(1, "abc")))
    c.run(200)
    assert c.r("a").lease_valid(c.clock("a"))
    c.isolate("a")
    c.assign(assignment(2, "b", config(2, "abc")), to="bc")
    a_until = b_from = None
    for _ in range(4000):
        c.now += 1.0
        c.tick()
        c.pump()
        a_has = c.r("a").lease_valid(c.clock("a"))
        b_has = c.r("b").lease_valid(c.clock("b"))
        if not a_has and a_until is None:
            a_until = c.now
        if b_has:
            b_from = c.now
            break
        assert not (a_has and b_has)
    assert b_from is not None
    assert a_until is not None
    assert c.node("b").events(SmEventKind.ACTIVATED) != []
    return a_until, b_from


@pytest.mark.parametrize("rates", list(RATES.values()), ids=list(RATES))
def test_new_primary_gets_no_lease_until_the_old_primary_lease_expired(
    rates: dict[str, float],
) -> None:
    a_until, b_from = failover(rates)
    assert a_until <= b_from
    # Nor does it wait much longer than W.
    assert b_from - a_until < W


def test_ignoring_the_promise_wait_would_let_two_leases_overlap() -> None:
    bugged = ReplicaParams(
        lease_ms=PARAMS.lease_ms,
        heartbeat_interval_ms=PARAMS.heartbeat_interval_ms,
        bugs=frozenset({"ignore-lease"}),
    )
    with pytest.raises(AssertionError):
        failover({}, bugged)
