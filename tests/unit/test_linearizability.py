"""The linearizability checker accepts what a register could do and rejects what it could not."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.sim.checkers import KeyStatus, check_history, check_linearizable
from loom.sim.history import ANY, Operation

KEY = b"k"


def _op(kind: str, inv: float, comp: float | None, **fields: object) -> Operation:
    failed = bool(fields.pop("failed", False))
    outcome = "unknown" if comp is None else ("failed" if failed else "ok")
    return Operation(
        op_id=0,
        client=str(fields.pop("client", "c")),
        key=KEY,
        kind=kind,  # type: ignore[arg-type]
        invoked_ms=inv,
        completed_ms=comp,
        outcome=outcome,  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )


def w(value: bytes, inv: float, comp: float | None, **f: object) -> Operation:
    return _op("write", inv, comp, value=value, **f)


def d(inv: float, comp: float | None, **f: object) -> Operation:
    return _op("delete", inv, comp, **f)


def r(output: bytes | None, inv: float, comp: float | None) -> Operation:
    return _op("read", inv, comp, output=output)


def inc(delta: int, inv: float, comp: float | None, output: int | None = None) -> Operation:
    return _op("increment", inv, comp, delta=delta, output=output)


def numbered(*ops: Operation) -> list[Operation]:
    return [dataclasses.replace(op, op_id=i) for i, op in enumerate(ops)]


LINEARIZABLE = {
    "write then read sees it": [w(b"a", 0, 1), r(b"a", 2, 3)],
    "read concurrent with a write may see the old value": [
        w(b"a", 0, 1),
        w(b"b", 2, 6),
        r(b"a", 3, 4),
    ],
    "read concurrent with a write may see the new value": [
        w(b"a", 0, 1),
        w(b"b", 2, 6),
        r(b"b", 3, 4),
    ],
    "read of a never written key sees absent": [r(None, 0, 1)],
    "delete then read sees absent": [w(b"a", 0, 1), d(2, 3), r(None, 4, 5)],
    "unknown write that a later read sees": [w(b"a", 0, None), r(b"a", 5, 6)],
    "unknown write that is never seen": [w(b"a", 0, 1), w(b"b", 2, None), r(b"a", 5, 6)],
    "unknown write taking effect after a read that missed it": [
        w(b"b", 2, None),
        r(None, 5, 6),
        r(b"b", 10, 11),
    ],
    "conditional write whose precondition holds": [
        w(b"a", 0, 1),
        w(b"b", 2, 3, expect=b"a"),
        r(b"b", 4, 5),
    ],
    "conditional create on an absent key": [w(b"a", 0, 1, expect=None), r(b"a", 2, 3)],
    "failed conditional write when the value differs": [
        w(b"a", 0, 1),
        w(b"b", 2, 3, expect=None, failed=True),
        r(b"a", 4, 5),
    ],
    "failed conditional write concurrent with the write that made it false": [
        w(b"a", 0, 5),
        w(b"b", 1, 2, expect=None, failed=True),
    ],
    "unknown conditional write whose condition failed acts as omitted": [
        w(b"a", 0, 1),
        w(b"b", 2, None, expect=None),
        r(b"a", 5, 6),
    ],
    "unknown delete that a later read sees": [w(b"a", 0, 1), d(2, None), r(None, 5, 6)],
    "unknown write that explains a failed conditional create": [
        w(b"a", 0, None),
        w(b"b", 5, 6, expect=None, failed=True),
    ],
    "unknown write seen through a later conditional write": [
        w(b"a", 0, None),
        w(b"b", 5, 6, expect=b"a"),
        r(b"b", 7, 8),
    ],
    "unknown delete that restarts a counter": [
        inc(1, 0, 1, 1),
        d(2, None),
        inc(1, 5, 6, 1),
    ],
    "touching intervals count as concurrent": [w(b"a", 0, 5), r(None, 5, 6)],
    "sequential increments": [inc(1, 0, 1, 1), inc(2, 2, 3, 3)],
    "concurrent increments return in either order": [inc(1, 0, 5, 2), inc(1, 1, 3, 1)],
    "unknown increment explains a later jump": [inc(1, 0, None), inc(1, 2, 3, 2)],
    "unknown increment may never happen": [inc(1, 0, None), inc(1, 2, 3, 1)],
}

VIOLATING = {
    "stale read after a completed write": [w(b"a", 0, 1), w(b"b", 2, 3), r(b"a", 4, 5)],
    "read sees a value then an older value": [
        w(b"a", 0, 1),
        w(b"b", 2, 10),
        r(b"b", 3, 4),
        r(b"a", 5, 6),
    ],
    "lost acknowledged write": [w(b"a", 0, 1), r(None, 2, 3)],
    "lost acknowledged delete": [w(b"a", 0, 1), d(2, 3), r(b"a", 4, 5)],
    "two concurrent writes then reads that disagree": [
        w(b"a", 0, 5),
        w(b"b", 1, 6),
        r(b"a", 7, 8),
        r(b"b", 7, 8),
    ],
    "conditional write succeeding when it should not": [
        w(b"a", 0, 1),
        w(b"b", 2, 3, expect=None),
    ],
    "conditional write failing when it should have succeeded": [
        w(b"a", 0, 1),
        w(b"b", 2, 3, expect=b"a", failed=True),
    ],
    "read of a value never written": [w(b"a", 0, 1), r(b"ghost", 2, 3)],
    "read of an unknown write before it was invoked": [r(b"b", 0, 1), w(b"b", 5, None)],
    "increments returning duplicate values": [inc(1, 0, 5, 1), inc(1, 1, 6, 1)],
    "increment skipping a value no unknown increment explains": [inc(1, 0, 1, 2)],
}


@pytest.mark.parametrize("ops", LINEARIZABLE.values(), ids=LINEARIZABLE.keys())
def test_history_a_register_could_produce_is_linearizable(ops: list[Operation]) -> None:
    verdict = check_linearizable(numbered(*ops))
    assert verdict.status is KeyStatus.LINEARIZABLE
    assert verdict.violation is None


@pytest.mark.parametrize("ops", VIOLATING.values(), ids=VIOLATING.keys())
def test_history_no_register_could_produce_is_a_violation(ops: list[Operation]) -> None:
    verdict = check_linearizable(numbered(*ops))
    assert verdict.status is KeyStatus.VIOLATION
    assert verdict.violation is not None
    assert verdict.violation.key == KEY
    assert verdict.violation.op_ids


def test_stale_read_violation_names_the_read_the_newer_write_and_the_value_it_kept() -> None:
    verdict = check_linearizable(numbered(w(b"a", 0, 1), w(b"b", 2, 3), r(b"a", 4, 5)))
    assert verdict.violation is not None
    assert verdict.violation.op_ids == (0, 1, 2)
    explanation = verdict.violation.explanation
    assert "#1 c write b'b' [2, 3] ok could not take effect" in explanation
    assert (
        "state b'a' (set by #0), which must stay until #2 c read -> b'a' [4, 5] ok" in explanation
    )


def test_failed_operation_without_precondition_is_rejected() -> None:
    with pytest.raises(ValueError, match="without a precondition"):
        check_linearizable(numbered(w(b"a", 0, 1, failed=True)))


def test_operations_on_two_keys_are_rejected_by_the_per_key_check() -> None:
    other = dataclasses.replace(r(None, 0, 1), key=b"other")
    with pytest.raises(ValueError, match="key"):
        check_linearizable(numbered(w(b"a", 0, 1), other))


def test_two_writes_of_the_same_value_are_rejected_since_pruning_needs_unique_values() -> None:
    with pytest.raises(ValueError, match="same value"):
        check_linearizable(numbered(w(b"a", 0, 1), w(b"a", 2, 3)))


def test_history_check_reports_violations_only_on_the_key_that_broke() -> None:
    good = numbered(w(b"a", 0, 1), r(b"a", 2, 3))
    bad = [dataclasses.replace(op, key=b"bad", op_id=op.op_id + 10) for op in good[:1]]
    bad.append(dataclasses.replace(r(None, 4, 5), key=b"bad", op_id=20))
    report = check_history([*bad, *good])
    assert report.keys_checked == 2
    assert report.operations_checked == 4
    assert [v.key for v in report.violations] == [b"bad"]
    assert report.violations[0].op_ids == (10, 20)
    assert report.keys_unchecked == ()
    assert not report.is_linearizable
    assert "key b'bad'" in report.summary()


def test_unknown_reads_are_dropped_before_the_search() -> None:
    verdict = check_linearizable(numbered(w(b"a", 0, 1), r(None, 2, None)))
    assert verdict.status is KeyStatus.LINEARIZABLE
    assert (verdict.operations, verdict.operations_searched) == (2, 1)


def test_unknown_write_nobody_could_notice_is_not_searched() -> None:
    verdict = check_linearizable(numbered(w(b"a", 0, 1), w(b"b", 2, None), r(b"a", 5, 6)))
    assert verdict.status is KeyStatus.LINEARIZABLE
    assert verdict.operations_searched == 2


def test_many_interchangeable_unknown_increments_are_searched_without_blowup() -> None:
    unknown = [inc(1, float(i), None) for i in range(40)]
    verdict = check_linearizable(numbered(*unknown, inc(1, 100, 101, 21)), budget=20_000)
    assert verdict.status is KeyStatus.LINEARIZABLE


def _hard_history(writers: int) -> list[Operation]:
    """Many mutually concurrent writes, then a read no order explains: the search must try
    every subset before giving up."""
    ops = [w(f"v{i}".encode(), 0, 100, client=f"c{i}") for i in range(writers)]
    return numbered(*ops, r(b"never-written", 200, 201))


def test_search_that_exhausts_its_budget_is_reported_unchecked_not_passed() -> None:
    report = check_history(_hard_history(14), budget_per_key=1_000)
    assert report.keys_unchecked == (KEY,)
    assert report.keys_checked == 0
    assert report.operations_checked == 0
    assert report.violations == ()
    assert not report.is_linearizable


def test_same_hard_history_is_decided_with_enough_budget() -> None:
    verdict = check_linearizable(_hard_history(6), budget=1_000_000)
    assert verdict.status is KeyStatus.VIOLATION


@st.composite
def register_histories(draw: st.DrawFn, overlap: bool) -> list[Operation]:
    """Run a register (key b"k") and a counter (key b"c") one op at a time, each taking
    effect at t = 10 * i; the recorded interval always contains that instant."""
    state: bytes | None = None
    count = 0
    written: list[bytes | None] = [None]
    ops: list[Operation] = []
    n = draw(st.integers(0, 24))
    for i in range(n):
        at = 10.0 * i
        inv = at - (draw(st.integers(0, 25)) if overlap else 0)
        comp: float | None = at + (draw(st.integers(0, 25)) if overlap else 4)
        kind = draw(st.sampled_from(["read", "write", "delete", "cas", "cdel", "increment"]))
        is_unknown = kind != "read" and draw(st.integers(0, 4)) == 0
        applied = not is_unknown or draw(st.booleans())
        comp = None if is_unknown else comp
        if kind == "read":
            ops.append(r(state, inv, comp))
        elif kind == "increment":
            delta = draw(st.integers(1, 3))
            count += delta if applied else 0
            op = inc(delta, inv, comp, None if is_unknown else count)
            ops.append(dataclasses.replace(op, key=b"c"))
        else:
            value = None if kind in ("delete", "cdel") else f"v{i}".encode()
            expect = draw(st.sampled_from([ANY, *written])) if kind in ("cas", "cdel") else ANY
            holds = expect is ANY or expect == state
            ops.append(
                _op(
                    "delete" if value is None else "write",
                    inv,
                    comp,
                    value=value,
                    expect=expect,
                    failed=not holds,
                )
            )
            written.append(value)
            state = value if holds and applied else state
    ops.append(r(state, 10.0 * n + 30, 10.0 * n + 31))  # after every interval above
    return numbered(*ops)


@settings(max_examples=300, deadline=None)
@given(register_histories(overlap=False))
def test_sequential_register_execution_is_always_linearizable(ops: list[Operation]) -> None:
    assert check_history(ops).is_linearizable


@settings(max_examples=300, deadline=None)
@given(register_histories(overlap=True))
def test_overlapping_execution_at_points_inside_intervals_is_linearizable(
    ops: list[Operation],
) -> None:
    assert check_history(ops).is_linearizable


@settings(max_examples=300, deadline=None)
@given(register_histories(overlap=False), st.data())
def test_corrupting_one_read_to_a_never_written_value_is_a_violation(
    ops: list[Operation], data: st.DataObject
) -> None:
    reads = [i for i, op in enumerate(ops) if op.kind == "read" and op.outcome == "ok"]
    victim = data.draw(st.sampled_from(reads))
    ops[victim] = dataclasses.replace(ops[victim], output=b"never-written")
    report = check_history(ops)
    assert [v.key for v in report.violations] == [KEY]
    assert victim in report.violations[0].op_ids


def _brute_force_is_linearizable(ops: list[Operation]) -> bool:
    """The definition, by enumeration: some subset of the unknown ops plus every known op, in
    some order that respects real time, is a legal run of the register/counter."""
    known = [op for op in ops if op.outcome != "unknown"]
    unknown = [op for op in ops if op.outcome == "unknown" and op.kind != "read"]
    for size in range(len(unknown) + 1):
        for extra in itertools.combinations(unknown, size):
            for order in itertools.permutations([*known, *extra]):
                if _respects_real_time(order) and _is_legal_run(order):
                    return True
    return False


def _respects_real_time(order: tuple[Operation, ...]) -> bool:
    return not any(
        later.completed_ms is not None and later.completed_ms < earlier.invoked_ms
        for i, earlier in enumerate(order)
        for later in order[i + 1 :]
    )


def _is_legal_run(order: tuple[Operation, ...]) -> bool:
    state: bytes | int | None = None
    for op in order:
        holds = op.expect is ANY or state == op.expect
        if op.kind == "read":
            ok = state == op.output
        elif op.kind == "increment":
            if isinstance(state, bytes):
                return False
            state = (state or 0) + op.delta
            ok = op.outcome == "unknown" or state == op.output
        elif op.outcome == "failed":
            ok = not holds
        else:
            ok, state = holds, op.value
        if not ok:
            return False
    return True


@st.composite
def small_arbitrary_histories(draw: st.DrawFn) -> list[Operation]:
    """Up to 6 ops with random intervals and random (often wrong) outputs."""
    ops = []
    values: list[bytes | None] = [None, b"w0", b"w1", b"w2", b"w3", b"w4", b"w5", b"zz"]
    for i in range(draw(st.integers(1, 6))):
        inv = float(draw(st.integers(0, 8)))
        comp = None if draw(st.integers(0, 3)) == 0 else inv + draw(st.integers(0, 4))
        kind = draw(st.sampled_from(["read", "write", "delete", "increment"]))
        fields: dict[str, object] = {}
        if kind == "read":
            fields["output"] = draw(st.sampled_from([*values, 1, 2]))
        elif kind == "increment":
            fields["delta"] = draw(st.integers(1, 2))
            fields["output"] = draw(st.integers(1, 5))
        else:
            fields["value"] = f"w{i}".encode() if kind == "write" else None
            fields["expect"] = draw(st.sampled_from([ANY, ANY, *values]))
            fields["failed"] = fields["expect"] is not ANY and draw(st.booleans())
        if comp is None:
            fields.pop("output", None)
        ops.append(_op(kind, inv, comp, **fields))
    return numbered(*ops)


@settings(max_examples=1500, deadline=None)
@given(small_arbitrary_histories())
def test_checker_agrees_with_brute_force_enumeration_on_small_histories(
    ops: list[Operation],
) -> None:
    verdict = check_linearizable(ops)
    expected = KeyStatus.LINEARIZABLE if _brute_force_is_linearizable(ops) else KeyStatus.VIOLATION
    assert verdict.status is expected
