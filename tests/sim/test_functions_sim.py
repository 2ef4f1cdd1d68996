"""The functions platform's queue lifecycle in the deterministic simulation: the real
scheduler and worker code under crashes, pauses, store outages and lost answers, in
virtual time. Clean seeds stay clean; a deliberate bug is caught at a known seed; a
seed replays exactly."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from loom.functions_sim.run import run_seed

# Seeds that once failed stay here: 9 (a worker paused with a reply in flight started
# calls whose leases had ended: calls now start soon after their pull or go back),
# 22 (a worker's cancelled pull left a waiter behind that took calls nobody ran, and
# a lease that ended on the last attempt put the call back instead of dead-lettering),
# 78 (the drain's check scanned the due index, then the running index, and missed a
# call a reclaim moved between them: one scan now reads both).
CLEAN_SEEDS = [1, 2, 3, 4, 9, 22, 78]


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)  # every simulated fault is logged otherwise
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("seed", CLEAN_SEEDS)
def test_clean_seeds_have_no_violations(seed: int) -> None:
    result = run_seed(seed)
    assert result.violations == []
    assert result.submitted > 100 and result.runs >= result.submitted
    assert sum(result.faults.values()) >= 5


def test_reclaiming_before_the_lease_ends_is_caught() -> None:
    result = run_seed(2, bugs=["reclaim-early"])
    assert any("ran at once under live leases" in v for v in result.violations), result.violations


def test_a_seed_replays_exactly() -> None:
    first, again = run_seed(3), run_seed(3)
    assert (first.submitted, first.runs, first.faults) == (
        again.submitted,
        again.runs,
        again.faults,
    )


def test_unknown_bugs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown bugs"):
        run_seed(1, bugs=["no-such-bug"])
