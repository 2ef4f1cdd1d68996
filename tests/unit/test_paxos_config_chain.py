"""Config chains (PITFALLS 15): {a,b,c} (activated) → {b,c,d} (never activated) → {c,d,e}.

A value `v` was chosen in epoch 1 on {a, b}. Phase 1 of epoch 3 on {c, d, e} alone (and
even on {b,c,d} through c and d) misses it; the candidate needs a majority of every config
since the last activated one, which the shard manager lists and promises reveal.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from paxos_harness import PARAMS, Cluster, W, assignment, ballot, config, durable, entry, n

from loom.core.ids import Incarnation, Seq
from loom.paxos.activation import Candidacy
from loom.paxos.messages import Config, Prepare, Promise
from loom.paxos.params import ReplicaParams
from loom.paxos.ready import SmEventKind

CFG1 = config(1, "abc")
CFG2 = config(2, "bcd")
CFG3 = config(3, "cde")
B1 = ballot(1, "a")
B2 = ballot(2, "b")
V = entry(B1, 1, b"v")


def chain_cluster(params: ReplicaParams | None = None) -> Cluster:
    disks = {
        "a": durable(promise=B1, promise_config=CFG1, entries=[V], commit=1, applied=1),
        # b accepted v in epoch 1, then (as epoch 2's candidate) promised itself.
        "b": durable(promise=B2, promise_config=CFG2, prior_config=CFG1, entries=[V]),
        "c": durable(promise=B2, promise_config=CFG2, prior_config=CFG1),
        "d": durable(promise=B2, promise_config=CFG2),
    }
    c = Cluster("abcde", disks=disks, params=params or PARAMS)
    c.now = W + 1
    return c


@dataclass(frozen=True)
class ChainCase:
    prior: tuple[Config, ...]
    activated_epoch: int
    # Nodes cut off at first: the candidate must not activate without them.
    cut: str
    # Healing this one lets it activate (with v).
    heal: str


CASES = {
    # The shard manager lists the last activated config and every one since.
    "shard-manager-lists-the-chain": ChainCase((CFG1, CFG2), 1, cut="ab", heal="a"),
    # It forgot epoch 2: c's promise reveals it, so e prepares b (and d) too.
    "a-promise-reveals-a-forgotten-config": ChainCase((), 1, cut="abd", heal="b"),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_activation_with_prior_configs_needs_a_majority_of_every_config_listed(
    case: ChainCase,
) -> None:
    c = chain_cluster()
    for name in case.cut:
        c.isolate(name)
    c.assign(
        assignment(3, "e", CFG3, prior=case.prior, activated_epoch=case.activated_epoch),
        to="cde",
    )
    c.run(3 * W)
    primary = c.node("e")
    # A majority of {c,d,e} (and of {b,c,d} for the first case) promised, but not of all.
    promised = {env.src for env in c.sent_of(Promise, dst="e")}
    assert promised >= {n("c"), n("e")}
    assert primary.events(SmEventKind.ACTIVATED) == []
    assert c.sent_of(Prepare, src="e", dst=case.heal) != []
    c.heal()
    for name in set(case.cut) - set(case.heal):
        c.isolate(name)
    c.run_until(lambda: primary.events(SmEventKind.ACTIVATED) != [], max_ms=3 * W)
    assert c.committed_values("e")[1] == b"v"
    c.run(300)
    assert c.committed_values("c")[1] == b"v"
    c.assert_agreement()


def test_activation_on_the_new_config_alone_would_miss_the_chosen_value() -> None:
    # What the rule prevents: with the deliberate bug, e activates on {c, d, e} and
    # commits a no-op where v was chosen.
    bugged = ReplicaParams(lease_ms=1000.0, bugs=frozenset({"prev-config-unactivated"}))
    c = chain_cluster(bugged)
    c.now += bugged.promise_wait_ms
    c.isolate("a")
    c.isolate("b")
    c.assign(assignment(3, "e", CFG3, prior=(CFG1, CFG2), activated_epoch=1), to="cde")
    c.run_until(lambda: c.node("e").events(SmEventKind.ACTIVATED) != [], max_ms=3 * W)
    assert c.committed_values("e")[1] is None
    assert c.committed_values("a")[1] == b"v"


def test_candidacy_follows_a_prior_config_newer_than_the_last_activated_only() -> None:
    cand = Candidacy(
        ballot=ballot(3, "e"),
        config=CFG3,
        activated_epoch=CFG1.epoch,
        required=[CFG3],
        own_commit_seq=Seq(0),
    )

    def promise(prior: Config | None) -> Promise:
        return Promise(ballot(3, "e"), Seq(0), Seq(0), prior, (), Incarnation(1))

    assert cand.add(n("c"), promise(CFG1), follow_prior_configs=True) == []  # activated: known
    assert cand.add(n("d"), promise(CFG2), follow_prior_configs=True) == [n("b")]
    assert cand.required == [CFG3, CFG2]
    assert cand.add(n("e"), promise(CFG2), follow_prior_configs=True) == []
    # {c,d,e} has a majority; {b,c,d} has c and d: a majority too.
    assert cand.has_quorum()
    cand2 = Candidacy(
        ballot=ballot(3, "e"),
        config=CFG3,
        activated_epoch=CFG1.epoch,
        required=[CFG1, CFG3],
        own_commit_seq=Seq(0),
    )
    for name in "cde":
        cand2.add(n(name), promise(None), follow_prior_configs=True)
    assert not cand2.has_quorum()  # only c of {a, b, c}
    cand2.add(n("a"), promise(None), follow_prior_configs=True)
    assert cand2.has_quorum()
