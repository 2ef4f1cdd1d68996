"""Cheap sanity checks for counter keys, independent of the linearizability search.

Rules of this module:
- A counter key is a key whose every operation is an increment; keys that mix increments
  with reads, writes or deletes are left to the linearizability checker, since a write or
  delete resets the sum these bounds rely on.
- Deltas are assumed strictly positive (ValueError otherwise): only then is every value a
  counter returns distinct, and the converged value bounded below by the acknowledged
  increments and above by acknowledged plus unknown ones.
- A key missing from `final_values` converged to absent, which an increment reads as 0.
- Problems are reported as strings in sorted key order, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from loom.sim.history import Operation


def check_counters(ops: Iterable[Operation], final_values: Mapping[bytes, int]) -> list[str]:
    """Human-readable problems found on counter keys; empty when every key is consistent.

    For each counter key:
    - every ok increment returned a distinct value;
    - every ok increment returned at least its own delta and at most the sum of all
      deltas that may have been applied (ok + unknown);
    - the final value lies between the sum of ok deltas and the sum of ok + unknown deltas.
    """
    by_key: dict[bytes, list[Operation]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    problems: list[str] = []
    for key in sorted(by_key):
        key_ops = by_key[key]
        if any(op.kind != "increment" for op in key_ops):
            continue
        problems += _check_counter_key(key, key_ops, final_values.get(key, 0))
    return problems


def _check_counter_key(key: bytes, ops: list[Operation], final: int) -> list[str]:
    acked: list[Operation] = []
    applied_max = 0  # sum of every delta that may have been applied
    for op in sorted(ops, key=lambda o: o.op_id):
        if op.delta <= 0:
            raise ValueError(f"op #{op.op_id}: counter checks assume positive deltas")
        if op.outcome == "failed":
            raise ValueError(f"op #{op.op_id}: an increment has no condition that can fail")
        applied_max += op.delta
        if op.outcome == "ok":
            if not isinstance(op.output, int):
                raise ValueError(f"op #{op.op_id}: an ok increment must return an int")
            acked.append(op)
    applied_min = sum(op.delta for op in acked)
    problems: list[str] = []
    returned_by: dict[int, list[int]] = {}
    for op in acked:
        assert isinstance(op.output, int)
        returned_by.setdefault(op.output, []).append(op.op_id)
        if not op.delta <= op.output <= applied_max:
            problems.append(
                f"key {key!r}: increment #{op.op_id} (+{op.delta}) returned {op.output}, "
                f"outside [{op.delta}, {applied_max}]"
            )
    for value in sorted(returned_by):
        ids = returned_by[value]
        if len(ids) > 1:
            listed = ", ".join(f"#{i}" for i in ids)
            problems.append(f"key {key!r}: ok increments {listed} all returned {value}")
    if not applied_min <= final <= applied_max:
        problems.append(
            f"key {key!r}: final value {final} outside [{applied_min}, {applied_max}] "
            f"(sum of ok deltas, sum of ok + unknown deltas)"
        )
    return problems
