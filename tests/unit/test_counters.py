"""Counter sanity checks: distinct acknowledged values and a converged value within bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.sim.checkers import check_counters, check_history
from loom.sim.history import Operation


def inc(
    op_id: int, delta: int, output: int | None, *, unknown: bool = False, key: bytes = b"n"
) -> Operation:
    return Operation(
        op_id=op_id,
        client="c",
        key=key,
        kind="increment",
        invoked_ms=float(op_id),
        completed_ms=None if unknown else op_id + 0.5,
        outcome="unknown" if unknown else "ok",
        delta=delta,
        output=None if unknown else output,
    )


CONSISTENT = {
    "acknowledged increments and their sum": ([inc(0, 1, 1), inc(1, 2, 3)], 3),
    "unknown increment that was applied": ([inc(0, 1, 1), inc(1, 5, None, unknown=True)], 6),
    "unknown increment that was lost": ([inc(0, 1, 1), inc(1, 5, None, unknown=True)], 1),
    "only unknown increments, none applied": ([inc(0, 1, None, unknown=True)], 0),
}

INCONSISTENT = {
    "increments returning duplicate values": (
        [inc(0, 1, 1), inc(1, 1, 1)],
        2,
        "all returned 1",
    ),
    "final value below the acknowledged sum": ([inc(0, 1, 1), inc(1, 1, 2)], 1, "final value 1"),
    "final value above every increment that may have applied": (
        [inc(0, 1, 1), inc(1, 1, None, unknown=True)],
        3,
        "final value 3 outside [1, 2]",
    ),
    "increment returning less than its own delta": ([inc(0, 3, 2)], 3, "returned 2"),
    "increment returning more than could ever have been added": (
        [inc(0, 1, 5)],
        1,
        "returned 5",
    ),
}


@pytest.mark.parametrize(("ops", "final"), CONSISTENT.values(), ids=CONSISTENT.keys())
def test_consistent_counter_has_no_problems(ops: list[Operation], final: int) -> None:
    assert check_counters(ops, {b"n": final}) == []


@pytest.mark.parametrize(("ops", "final", "needle"), INCONSISTENT.values(), ids=INCONSISTENT.keys())
def test_inconsistent_counter_is_reported(ops: list[Operation], final: int, needle: str) -> None:
    problems = check_counters(ops, {b"n": final})
    assert any(needle in p for p in problems), problems
    assert all(p.startswith("key b'n': ") for p in problems)


def test_counter_missing_from_final_values_converged_to_absent_which_is_zero() -> None:
    assert check_counters([inc(0, 1, None, unknown=True)], {}) == []
    assert check_counters([inc(0, 1, 1)], {}) != []


def test_keys_that_mix_increments_with_writes_are_left_to_the_linearizability_checker() -> None:
    write = Operation(
        op_id=9, client="c", key=b"n", kind="write", invoked_ms=9.0, completed_ms=9.5,
        outcome="ok", value=b"x",
    )  # fmt: skip
    assert check_counters([inc(0, 1, 1), inc(1, 1, 1), write], {b"n": 0}) == []


def test_problems_are_listed_in_key_order() -> None:
    ops = [inc(0, 1, 1, key=b"b"), inc(1, 1, 1, key=b"a")]
    problems = check_counters(ops, {b"a": 0, b"b": 0})
    assert [p[:8] for p in problems] == ["key b'a'", "key b'b'"]


def test_non_positive_delta_is_rejected() -> None:
    with pytest.raises(ValueError, match="positive deltas"):
        check_counters([inc(0, 0, 0)], {b"n": 0})


@st.composite
def sequential_counters(draw: st.DrawFn) -> tuple[list[Operation], int]:
    """Increments applied one at a time; some replies lost, their effect applied or not."""
    total = 0
    ops = []
    for i in range(draw(st.integers(0, 30))):
        delta = draw(st.integers(1, 5))
        unknown = draw(st.integers(0, 3)) == 0
        if not unknown or draw(st.booleans()):
            total += delta
        ops.append(inc(i, delta, None if unknown else total, unknown=unknown))
    return ops, total


@settings(max_examples=300, deadline=None)
@given(sequential_counters())
def test_sequential_counter_execution_always_passes_both_checkers(
    history: tuple[list[Operation], int],
) -> None:
    ops, final = history
    assert check_counters(ops, {b"n": final}) == []
    assert check_history(ops).is_linearizable
