"""Checkers that judge simulated client histories: linearizability per key, counter sanity.

Checkers are pure and deterministic: same history in, same report out.
"""

from loom.sim.checkers.counters import check_counters
from loom.sim.checkers.linearizability import (
    KeyStatus,
    KeyVerdict,
    LinearizabilityReport,
    Violation,
    check_history,
    check_linearizable,
)

__all__ = [
    "KeyStatus",
    "KeyVerdict",
    "LinearizabilityReport",
    "Violation",
    "check_counters",
    "check_history",
    "check_linearizable",
]
