"""Linearizability of client histories, one key at a time (Wing & Gong / Lowe, as in Porcupine).

Rules of this module:
- Linearizability is P-compositional, so a history is split by key and each key is searched
  alone against a register model whose state is `bytes | int | None` (None = absent; an
  increment treats absent as 0 and cannot apply to a bytes value).
- The search walks call/return entries depth first and memoises visited configurations
  (state, ops placed); a key whose search exceeds its step budget is reported *unchecked*
  and is never counted as passing.
- Every pruning is exact (it never changes a verdict) and leans on write values being unique
  per key, which `check_linearizable` enforces.
- Intervals are closed: an op completing at t and one invoked at t count as concurrent, since
  the simulator may order two events inside the same virtual millisecond either way.
- Deterministic: entries are ordered by (time, call-before-return, invocation order) and no
  decision depends on set or dict iteration order.
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from loom.sim.history import ANY, Operation


class _Unseen:
    """The state after writing a value that no operation reads or expects."""

    def __repr__(self) -> str:
        return "UNSEEN"


_UNSEEN = _Unseen()
State: TypeAlias = bytes | int | _Unseen | None

_DESCRIBED_OPS_MAX = 3  # ops listed per group in a violation: enough to debug, short to read


class KeyStatus(enum.Enum):
    LINEARIZABLE = "linearizable"
    VIOLATION = "violation"
    UNCHECKED = "unchecked"  # the search ran out of budget: neither pass nor fail


@dataclass(frozen=True, slots=True, kw_only=True)
class Violation:
    key: bytes
    explanation: str
    op_ids: tuple[int, ...]  # the operations the explanation names, ascending


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyVerdict:
    key: bytes
    status: KeyStatus
    operations: int  # as given, before irrelevant ones were dropped
    operations_searched: int
    steps: int
    violation: Violation | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearizabilityReport:
    keys_checked: int  # keys with a verdict: linearizable or violated
    operations_checked: int  # operations on those keys
    violations: tuple[Violation, ...]
    keys_unchecked: tuple[bytes, ...]  # budget exhausted: NOT a pass
    verdicts: tuple[KeyVerdict, ...]

    @property
    def is_linearizable(self) -> bool:
        """True only when every key was searched to the end and none was violated."""
        return not self.violations and not self.keys_unchecked

    def summary(self) -> str:
        lines = [
            f"{self.keys_checked} keys / {self.operations_checked} ops checked, "
            f"{len(self.violations)} violations, {len(self.keys_unchecked)} keys unchecked"
        ]
        lines += [f"  key {v.key!r}: {v.explanation}" for v in self.violations]
        lines += [f"  key {k!r}: search budget exhausted" for k in self.keys_unchecked]
        return "\n".join(lines)


def check_history(ops: Iterable[Operation], budget_per_key: int = 200_000) -> LinearizabilityReport:
    """Check every key of a history independently; keys are visited in sorted order."""
    by_key: dict[bytes, list[Operation]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    verdicts = tuple(check_linearizable(by_key[k], budget=budget_per_key) for k in sorted(by_key))
    decided = [v for v in verdicts if v.status is not KeyStatus.UNCHECKED]
    return LinearizabilityReport(
        keys_checked=len(decided),
        operations_checked=sum(v.operations for v in decided),
        violations=tuple(v.violation for v in decided if v.violation is not None),
        keys_unchecked=tuple(v.key for v in verdicts if v.status is KeyStatus.UNCHECKED),
        verdicts=verdicts,
    )


def check_linearizable(ops: Sequence[Operation], *, budget: int = 200_000) -> KeyVerdict:
    """Search for a linearization of the operations on ONE key.

    `budget` caps search steps (entries visited); past it the key is UNCHECKED.
    Raises ValueError on histories the model cannot interpret (mixed keys, a "failed"
    operation without a precondition, a write without a value, ...).
    """
    if not ops:
        raise ValueError("check_linearizable needs at least one operation")
    key = ops[0].key
    for op in ops:
        _validate(op, key)
    written = [op.value for op in ops if op.kind == "write"]
    if len(set(written)) != len(written):  # every pruning below leans on unique values
        raise ValueError(f"key {key!r}: two writes carry the same value")
    plan = _plan(ops)
    result = _Search(plan).run(budget)
    violation = None
    if result.status is KeyStatus.VIOLATION:
        assert result.dead_end is not None
        violation = _explain(key, plan.ops, result.dead_end)
    return KeyVerdict(
        key=key,
        status=result.status,
        operations=len(ops),
        operations_searched=len(plan.ops),
        steps=result.steps,
        violation=violation,
    )


def _validate(op: Operation, key: bytes) -> None:
    if op.key != key:
        raise ValueError(f"op #{op.op_id} is on key {op.key!r}, expected only {key!r}")
    if op.outcome == "failed" and op.expect is ANY:
        raise ValueError(f"op #{op.op_id} failed without a precondition; failure is undefined")
    if op.kind in ("read", "increment") and op.expect is not ANY:
        raise ValueError(f"op #{op.op_id}: a {op.kind} cannot carry a precondition")
    if op.kind == "write" and not isinstance(op.value, bytes):
        raise ValueError(f"op #{op.op_id}: a write needs a bytes value")
    if op.kind == "delete" and op.value is not None:
        raise ValueError(f"op #{op.op_id}: a delete carries no value")
    if op.kind == "increment" and op.outcome == "ok" and not isinstance(op.output, int):
        raise ValueError(f"op #{op.op_id}: an ok increment must return an int")


def _apply(op: Operation, effect: State, state: State) -> tuple[bool, State]:
    """One model transition: (is it legal here?, next state).

    Unknown operations are only ever placed as having taken effect; "did not take effect" is
    expressed by leaving them out, which is why an unknown conditional op requires its
    condition to hold.
    """
    if op.kind == "read":
        return state == op.output, state
    if op.kind == "increment":
        if state is not None and not isinstance(state, int):
            return False, state
        new = (state or 0) + op.delta
        return op.outcome == "unknown" or new == op.output, new
    holds = op.expect is ANY or state == op.expect
    if op.outcome == "failed":
        return not holds, state
    return holds, effect


@dataclass(slots=True)
class _Plan:
    """What the search needs, per op in invocation order (see `_plan`)."""

    ops: list[Operation]
    returns: list[float]  # completion, or the latest it can have happened; inf = maybe never
    effects: list[State]  # the state a write or delete leaves behind
    prereqs: list[int]  # the interchangeable unknown op that must be placed first, or -1
    observes: list[bytes | None]  # the value a required op needs to see as the state
    counter_ranks: list[int] | None  # pure counter keys: position of each ok increment ...
    counter_limits: list[float]  # ... and the most the count may be before the k-th one


def _plan(ops: Sequence[Operation]) -> _Plan:
    """Shape a key's history for the search; unknown ops are what make it explode, so:

    - unknown reads carry no information and are dropped;
    - an unknown write whose unique value an ok op observed must have taken effect before
      the earliest such observer completed, so it becomes a definite op ending there;
    - an unknown write/delete nobody could have noticed is dropped (`_is_unnoticeable`);
    - a value no op reads or expects is indistinguishable from any other such value, so all
      of them become one state `_UNSEEN`, which lets the memo merge their branches;
    - identical unknown ops are interchangeable, so each may only be placed after the
      previously invoked one of its kind, which removes permutations.
    """
    observed_ms: dict[State, float] = {}  # value -> earliest completion of an ok observer
    distinguishable: set[State] = set()  # only ever used for membership
    for op in ops:
        seen: State
        if op.kind == "read" and op.outcome == "ok":
            seen = op.output
        elif isinstance(op.expect, bytes | None):
            seen = op.expect
        else:
            continue
        distinguishable.add(seen)
        if op.completed_ms is not None and op.outcome == "ok":
            observed_ms[seen] = min(observed_ms.get(seen, math.inf), op.completed_ms)
    plan = _Plan([], [], [], [], [], None, [math.inf])
    for op in sorted(ops, key=lambda o: (o.invoked_ms, o.op_id)):
        returns_ms = op.completed_ms
        if returns_ms is None:
            if op.kind == "read" or _is_unnoticeable(op, ops, observed_ms):
                continue
            returns_ms = math.inf
            if isinstance(op.value, bytes) and op.value in observed_ms:
                returns_ms = max(op.invoked_ms, observed_ms[op.value])
        plan.ops.append(op)
        plan.returns.append(returns_ms)
        is_seen = op.value is None or op.value in distinguishable
        plan.effects.append(op.value if is_seen else _UNSEEN)
        needs = op.output if op.kind == "read" else op.expect
        is_required = returns_ms != math.inf and op.outcome != "failed"
        plan.observes.append(needs if is_required and isinstance(needs, bytes) else None)
    _add_symmetry_prereqs(plan)
    _add_counter_limits(plan)
    return plan


def _is_unnoticeable(op: Operation, ops: Sequence[Operation], observed: dict[State, float]) -> bool:
    """Can dropping this unknown write/delete never turn a valid linearization invalid?

    Removing it changes only the state seen until the next mutation. Nothing can see its
    value if no ok read returned it, no non-failed op expects it, and no failed op needed
    the state to differ from something else. Increments can follow an absent value, so an
    unknown delete on a key with increments always stays.
    """
    value = op.value
    if op.kind == "increment" or value in observed:
        return False
    for other in ops:
        if other.expect is ANY:
            if value is None and other.kind == "increment":
                return False
        elif other.outcome == "failed":
            if other.expect != value:
                return False  # it may have failed only because this op changed the state
        elif other.expect == value:
            return False  # it may have succeeded only because of this op
    return True


def _add_symmetry_prereqs(plan: _Plan) -> None:
    last_of_class: dict[tuple[object, ...], int] = {}
    for i, op in enumerate(plan.ops):
        plan.prereqs.append(-1)
        if plan.returns[i] == math.inf:
            cls = (op.kind, op.expect, op.delta, plan.effects[i])
            plan.prereqs[i] = last_of_class.get(cls, -1)
            last_of_class[cls] = i


def _add_counter_limits(plan: _Plan) -> None:
    """With only positive increments the count never decreases, so ok increments take effect
    in the order of their outputs, and no state may exceed what the next one starts from."""
    if any(op.kind != "increment" or op.delta <= 0 for op in plan.ops):
        return
    acked = [i for i, op in enumerate(plan.ops) if op.outcome == "ok"]
    acked.sort(key=lambda i: (_int(plan.ops[i].output), i))
    plan.counter_ranks = [-1] * len(plan.ops)
    for rank, i in enumerate(acked):
        plan.counter_ranks[i] = rank
    plan.counter_limits = [_int(plan.ops[i].output) - plan.ops[i].delta for i in acked]
    plan.counter_limits.append(math.inf)


def _int(value: State) -> int:
    assert isinstance(value, int)
    return value


@dataclass(frozen=True, slots=True)
class _DeadEnd:
    """The furthest point the search reached before an op's return could not be honoured."""

    entry: int  # the blocked return entry; later entries mean further along in time
    blocked: int  # index of the op that had to be placed but could not be
    deadline_ms: float  # when it had to be placed by: its completion, or its first observer's
    depth: int
    state: State
    writer: int  # the placed op that produced `state`, or -1 for the initial absent value
    awaiting: tuple[int, ...]  # unplaced ops that still need to observe `state`
    recent: tuple[int, ...]  # last few ops placed on the way there, oldest first
    open_ops: tuple[int, ...]  # ops invoked but not yet placed at that point


@dataclass(frozen=True, slots=True)
class _Result:
    status: KeyStatus
    steps: int
    dead_end: _DeadEnd | None = None


@dataclass(frozen=True, slots=True)
class _Placed:
    entry: int
    state_before: State
    gone_before: int
    is_forced: bool  # a read-only op placed as soon as it was legal; see `_try_place`


class _Search:
    """Porcupine's just-in-time linearization search over a doubly linked entry list."""

    def __init__(self, plan: _Plan) -> None:
        n = len(plan.ops)
        events = sorted(
            [(op.invoked_ms, 0, i) for i, op in enumerate(plan.ops)]
            + [(plan.returns[i], 1, i) for i in range(n)]
        )
        self.plan = plan
        self.head = 2 * n
        self.entry_op = [i for _, _, i in events]
        self.is_call = [kind == 0 for _, kind, _ in events]
        self.is_unknown_return = [kind == 1 and t == math.inf for t, kind, _ in events]
        return_entry = {i: e for e, (_, kind, i) in enumerate(events) if kind == 1}
        self.match = [return_entry[i] if kind == 0 else -1 for _, kind, i in events]
        # Index 2n is the head sentinel; -1 terminates the list.
        self.nxt = [*range(1, 2 * n), -1, 0 if n else -1]
        self.prv = [self.head, *range(2 * n - 1), -1]
        self.is_read_only = [op.kind == "read" or op.outcome == "failed" for op in plan.ops]
        self.state: State = None
        self.linearized = 0  # bit i set = plan.ops[i] placed
        self.acked = 0  # ok increments placed, on pure counter keys
        self.stack: list[_Placed] = []
        self.visited: dict[tuple[int, State], list[int]] = {}
        self.definite_mask = sum(1 << i for i, t in enumerate(plan.returns) if t != math.inf)
        self.awaiting = collections.Counter(v for v in plan.observes if v is not None)
        self.gone = 0  # unknown ops that expect an overwritten value, so can never happen
        self.expecting: dict[bytes, int] = {}  # value -> unknown ops that expect it
        for i, op in enumerate(plan.ops):
            if plan.returns[i] == math.inf and isinstance(op.expect, bytes):
                self.expecting[op.expect] = self.expecting.get(op.expect, 0) | 1 << i

    def run(self, budget: int) -> _Result:
        nxt, is_call, head = self.nxt, self.is_call, self.head
        dead_end: _DeadEnd | None = None
        entry = nxt[head]
        steps = 0
        while entry != -1:
            steps += 1
            if steps > budget:
                return _Result(KeyStatus.UNCHECKED, budget)
            if is_call[entry]:
                entry = nxt[head] if self._try_place(entry) else nxt[entry]
                continue
            # A return entry: every definite op before it is placed once we reach an
            # infinite (unknown) return, and the leftover unknown ops simply never happened.
            if self.is_unknown_return[entry]:
                return _Result(KeyStatus.LINEARIZABLE, steps)
            # Report the dead end furthest along in time: any blocked op later than the
            # real culprit would need the culprit placed first, so it cannot outrank it.
            if dead_end is None or (entry, len(self.stack)) > (dead_end.entry, dead_end.depth):
                dead_end = self._dead_end(entry)
            resume = self._backtrack()
            if resume is None:
                return _Result(KeyStatus.VIOLATION, steps, dead_end)
            entry = nxt[resume]
        return _Result(KeyStatus.LINEARIZABLE, steps)

    def _try_place(self, entry: int) -> bool:
        """Place the op whose call this is, if the model allows it and the result is new.

        A read-only op legal right now can always be placed now: every op that returned
        before it was invoked is already placed, and it changes nothing for those after.
        So if the search fails past it, it fails here too, and `_backtrack` skips the
        alternatives (`is_forced`).
        """
        plan, i, state = self.plan, self.entry_op[entry], self.state
        p = plan.prereqs[i]
        if p >= 0 and not (self.linearized >> p) & 1:
            return False
        legal, new_state = _apply(plan.ops[i], plan.effects[i], state)
        ranks = plan.counter_ranks
        is_acked = ranks is not None and ranks[i] >= 0
        if legal and ranks is not None:
            in_order = not is_acked or ranks[i] == self.acked
            legal = in_order and _int(new_state) <= plan.counter_limits[self.acked + is_acked]
        gone = self.gone
        if legal and isinstance(state, bytes) and new_state != state:
            # Values are unique per write, so once overwritten a value never returns: an
            # op that still has to observe it would be stranded, and an unknown op that
            # expects it can never happen any more.
            legal = self.awaiting.get(state, 0) == (plan.observes[i] == state)
            gone |= self.expecting.get(state, 0)
        linearized = self.linearized | (1 << i)
        if not legal or self._is_dominated(linearized, gone, new_state):
            return False
        self.stack.append(_Placed(entry, state, self.gone, self.is_read_only[i]))
        self.linearized, self.state, self.gone = linearized, new_state, gone
        self.acked += is_acked
        if (observed := plan.observes[i]) is not None:
            self.awaiting[observed] -= 1
        self.lift(entry)
        return True

    def _is_dominated(self, linearized: int, gone: int, state: State) -> bool:
        """Was the search already at this state with the same definite ops placed and every
        optional (unknown) op usable here also usable there? More choices can only do
        better, so that earlier failure is this one's too. Records the visit if not."""
        definite = linearized & self.definite_mask
        unusable = (linearized ^ definite) | gone
        visits = self.visited.setdefault((definite, state), [])
        if any(earlier & ~unusable == 0 for earlier in visits):
            return True
        visits.append(unusable)
        return False

    def _backtrack(self) -> int | None:
        """Undo placements up to the last one with untried alternatives; its entry, or None."""
        while self.stack:
            placed = self.stack.pop()
            i = self.entry_op[placed.entry]
            self.linearized &= ~(1 << i)
            self.state, self.gone = placed.state_before, placed.gone_before
            ranks = self.plan.counter_ranks
            self.acked -= ranks is not None and ranks[i] >= 0
            if (observed := self.plan.observes[i]) is not None:
                self.awaiting[observed] += 1
            self.unlift(placed.entry)
            if not placed.is_forced:
                return placed.entry
        return None

    def lift(self, call: int) -> None:
        nxt, prv = self.nxt, self.prv
        for e in (call, self.match[call]):
            nxt[prv[e]] = nxt[e]
            if nxt[e] != -1:
                prv[nxt[e]] = prv[e]

    def unlift(self, call: int) -> None:
        nxt, prv = self.nxt, self.prv
        for e in (self.match[call], call):
            nxt[prv[e]] = e
            if nxt[e] != -1:
                prv[nxt[e]] = e

    def _dead_end(self, blocked_return: int) -> _DeadEnd:
        open_ops = []
        e = self.nxt[self.head]
        while e != blocked_return:
            if self.is_call[e]:
                open_ops.append(self.entry_op[e])
            e = self.nxt[e]
        placed = [self.entry_op[p.entry] for p in self.stack]
        writers = [i for i in placed if not self.is_read_only[i]]
        blocked = self.entry_op[blocked_return]
        return _DeadEnd(
            entry=blocked_return,
            blocked=blocked,
            deadline_ms=self.plan.returns[blocked],
            depth=len(placed),
            state=self.state,
            writer=writers[-1] if writers else -1,
            awaiting=tuple(
                i
                for i, needs in enumerate(self.plan.observes)
                if needs is not None and needs == self.state and not self.linearized >> i & 1
            ),
            recent=tuple(placed[-3:]),
            open_ops=tuple(i for i in open_ops if i != blocked),
        )


def _explain(key: bytes, ops: list[Operation], dead: _DeadEnd) -> Violation:
    blocked = _describe(ops[dead.blocked])
    if ops[dead.blocked].completed_ms is None:
        blocked += f" (its value was observed by {dead.deadline_ms:g})"
    recent = ", ".join(_describe(ops[i]) for i in dead.recent) or "nothing"
    open_text, shown_open = _describe_some(ops, dead.open_ops)
    if dead.writer < 0:
        state = "absent (initial)"
    else:
        writer = ops[dead.writer]
        value = writer.value if dead.state is _UNSEEN else dead.state
        state = f"{_show(value)} (set by #{writer.op_id})"
    awaiting_text, shown_awaiting = _describe_some(ops, dead.awaiting)
    if dead.awaiting:
        state += f", which must stay until {awaiting_text}"
    explanation = (
        f"no linearization: {blocked} could not take effect in its interval. "
        f"Furthest attempt placed {dead.depth}/{len(ops)} ops, last {recent}, "
        f"leaving state {state}; also open then: {open_text}"
    )
    writer_ids = (dead.writer,) if dead.writer >= 0 else ()
    named = (dead.blocked, *dead.recent, *writer_ids, *shown_awaiting, *shown_open)
    involved = {ops[i].op_id for i in named}
    return Violation(key=key, explanation=explanation, op_ids=tuple(sorted(involved)))


def _describe_some(ops: list[Operation], indexes: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    shown = indexes[:_DESCRIBED_OPS_MAX]
    text = ", ".join(_describe(ops[i]) for i in shown) or "none"
    if len(indexes) > len(shown):
        text += f" (+{len(indexes) - len(shown)} more)"
    return text, shown


def _describe(op: Operation) -> str:
    text = f"#{op.op_id} {op.client} {op.kind}"
    if op.kind == "write":
        text += f" {_show(op.value)}"
    if op.kind == "increment":
        text += f" +{op.delta}"
    if op.expect is not ANY:
        text += f" if={_show(op.expect)}"
    if op.outcome == "ok" and op.kind in ("read", "increment"):
        text += f" -> {_show(op.output)}"
    end = "?" if op.completed_ms is None else f"{op.completed_ms:g}"
    return f"{text} [{op.invoked_ms:g}, {end}] {op.outcome}"


def _show(value: object) -> str:
    if value is None:
        return "absent"
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."
