"""Every deliberate bug breaks an invariant that some checker sees, at a known seed.

The seeds are the first that `loom sim --seeds 200 --faults all --bug NAME --fail-fast`
reports (docs/protocols/replication.md lists them with the invariant each breaks).
"""

import pytest

from loom.paxos.params import KNOWN_BUGS
from loom.sim.run import run_seed

FIRST_FAILING_SEED = {
    "skip-prepare": 1,
    "reply-before-persist": 3,
    "ignore-lease": 72,
    "stale-epoch-accept": 7,
    "promise-equal-ballot": 9,
    "commit-stale-entry": 2,
    "prev-config-unactivated": 12,
    "noop-below-commit": 1,
    "lease-from-reply": 57,
    "shared-batch-version": 1,
    "serve-before-catchup": 2,
    "no-dedupe": 1,
    "txn-skip-absent": 2,
    "fast-ack-visible": 1,
    "amnesia": 19,
    "staleness-from-heartbeat": 4,
}

# Bugs of μshard moves, caught under the "moves" profile (all faults + moves); seeds from
# `loom sim --seeds 200 --faults moves --bug NAME --fail-fast`.
FIRST_FAILING_MOVES_SEED = {
    "move-own-before-catchup": 1,
    "moved-source-serves-reads": 2,
}


# Bugs of planned hand-offs, caught under the "handoffs" profile (all faults + hand-offs);
# seeds from `loom sim --seeds 200 --faults handoffs --bug NAME --fail-fast`.
FIRST_FAILING_HANDOFF_SEED = {
    "release-while-leading": 1,
}


def test_every_known_bug_has_a_seed() -> None:
    seeded = set(FIRST_FAILING_SEED) | set(FIRST_FAILING_MOVES_SEED)
    assert seeded | set(FIRST_FAILING_HANDOFF_SEED) == set(KNOWN_BUGS)


@pytest.mark.parametrize(("bug", "seed"), sorted(FIRST_FAILING_SEED.items()))
def test_bug_is_caught_by_a_checker(bug: str, seed: int) -> None:
    result = run_seed(seed, faults="all", ops=300, bugs=frozenset({bug}))
    assert result.violations, f"--bug {bug} went unnoticed at seed {seed}"


@pytest.mark.parametrize("seed", sorted(set(FIRST_FAILING_SEED.values())))
def test_the_same_seed_is_clean_without_any_bug(seed: int) -> None:
    assert run_seed(seed, faults="all", ops=300).violations == []


@pytest.mark.parametrize(("bug", "seed"), sorted(FIRST_FAILING_MOVES_SEED.items()))
def test_move_bug_is_caught_by_a_checker(bug: str, seed: int) -> None:
    result = run_seed(seed, faults="moves", ops=300, bugs=frozenset({bug}))
    assert result.violations, f"--bug {bug} went unnoticed at seed {seed} (moves)"


@pytest.mark.parametrize("seed", sorted(set(FIRST_FAILING_MOVES_SEED.values())))
def test_the_same_moves_seed_is_clean_without_any_bug(seed: int) -> None:
    assert run_seed(seed, faults="moves", ops=300).violations == []


@pytest.mark.parametrize(("bug", "seed"), sorted(FIRST_FAILING_HANDOFF_SEED.items()))
def test_handoff_bug_is_caught_by_a_checker(bug: str, seed: int) -> None:
    result = run_seed(seed, faults="handoffs", ops=300, bugs=frozenset({bug}))
    assert result.violations, f"--bug {bug} went unnoticed at seed {seed} (handoffs)"


@pytest.mark.parametrize("seed", sorted(set(FIRST_FAILING_HANDOFF_SEED.values())))
def test_the_same_handoffs_seed_is_clean_without_any_bug(seed: int) -> None:
    assert run_seed(seed, faults="handoffs", ops=300).violations == []
