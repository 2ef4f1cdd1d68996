"""The mover: the shard manager's sans-IO coordinator of μshard moves (DESIGN §6).

One move of μshard m from p-shard S (source) to T (target), freeze first:

    FREEZE   propose Freeze(m) at S                    → m answers MOVED on S
    EXPORT   read the next chunk of m from S            (any replica that applied it)
    INGEST   propose Ingest(m, chunk) at T; back to EXPORT until the cursor ends
    OWN      propose Own(m, generation + 1) at T        ← the single commit point
    INSTALL  the driver installs the new mapping version (m → T)
    DROP     propose Drop(m) at S                       → S forgets m
    DONE

Rules:
- Each step is a replicated command or a read of frozen (immutable) state, so every
  step is idempotent: a lost request or reply is simply sent again (`resend_after_ms`),
  and a stale reply (older token) is ignored.
- Abort (at T, then at S) only before Own was ever sent: once the mover has sent Own
  it may have committed, so the move only goes forward (`ABORT` is unreachable from
  OWN and later). A move still before OWN after `abort_after_ms` aborts.
- Move ids grow (`next_move_id`); the kv state refuses commands of older moves, so a
  delayed copy of an aborted move's command changes nothing.
- Outputs are values (`MoverOutput`); the driver sends them to the p-shard's current
  primary, feeds replies to `on_reply`, and calls `mapping_installed` once the new
  mapping version is stored. The mover never decides safety: the replicated
  ownership records do (loom.kvstate.ownership).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from msgspec import Struct

from loom.core.ids import Generation, MoveId, ShardId, UShard
from loom.core.time import Instant
from loom.kvstate.commands import (
    Abort,
    Applied,
    Drop,
    Freeze,
    Ingest,
    IngestRecord,
    MoveCommand,
    Own,
    Result,
    encode_command,
)


class Step(enum.Enum):
    FREEZE = "freeze"
    EXPORT = "export"
    INGEST = "ingest"
    OWN = "own"
    INSTALL = "install"
    DROP = "drop"
    DONE = "done"
    ABORT_TARGET = "abort-target"
    ABORT_SOURCE = "abort-source"
    ABORTED = "aborted"
    STUCK = "stuck"  # a command the ownership record refused after Own: needs an operator


FINISHED = (Step.DONE, Step.ABORTED, Step.STUCK)
_BEFORE_OWN = (Step.FREEZE, Step.EXPORT, Step.INGEST)


@dataclass(frozen=True, slots=True, kw_only=True)
class MoverParams:
    resend_after_ms: float = 300.0
    abort_after_ms: float = 10_000.0
    chunk_records_max: int = 512
    moves_in_flight_max: int = 4
    # Deliberate bugs for the simulator (loom.paxos.params.KNOWN_BUGS).
    bugs: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class ProposeMove:
    """Send MoveRequest(token, command) to `shard`'s primary."""

    move_id: MoveId
    token: int
    shard: ShardId
    command: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportChunk:
    """Send ExportRequest(token, ushard, move_id, after, limit) to `shard`."""

    move_id: MoveId
    token: int
    shard: ShardId
    ushard: UShard
    after: bytes | None
    limit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallMapping:
    """Store the mapping version where `ushard` belongs to `shard`, then call
    `Mover.mapping_installed(move_id)`."""

    move_id: MoveId
    ushard: UShard
    shard: ShardId


MoverOutput = ProposeMove | ExportChunk | InstallMapping


class MoveRecord(Struct, frozen=True, array_like=True, tag=1):
    """What a durable driver stores of a move, to resume it after a restart."""

    move_id: MoveId
    ushard: UShard
    source: ShardId
    target: ShardId
    step: Step
    cursor: bytes | None
    generation: Generation
    records: int
    own_sent: bool


class MoverRecord(Struct, frozen=True, array_like=True, tag=1):
    """A mover's unfinished work: its moves under way and its plan."""

    next_move_id: int
    moves: tuple[MoveRecord, ...]
    planned: tuple[tuple[UShard, ShardId], ...]


# What the driver reports back for a request token.
@dataclass(frozen=True, slots=True, kw_only=True)
class Exported:
    records: tuple[tuple[bytes, bytes], ...]
    cursor: bytes | None
    generation: Generation
    total: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Proposed:
    result: Result


@dataclass(frozen=True, slots=True, kw_only=True)
class Unanswered:
    """Not primary, not ready, overloaded, lost: `tick` sends again."""


MoverInput = Exported | Proposed | Unanswered


@dataclass(slots=True, kw_only=True)
class Move:
    move_id: MoveId
    ushard: UShard
    source: ShardId
    target: ShardId
    started_at: Instant
    step: Step = Step.FREEZE
    token: int = 0  # of the request in flight; 0 = none
    sent_at: Instant = Instant(0)
    cursor: bytes | None = None
    chunk: tuple[IngestRecord, ...] = ()
    next_cursor: bytes | None = None
    generation: Generation = Generation(0)
    chunks: int = 0
    # The source's record count of the whole μshard (from the first chunk): Own
    # carries it and the target refuses a copy that holds another number.
    records: int = 0
    own_sent: bool = False
    problem: str = ""


@dataclass(slots=True)
class Mover:
    params: MoverParams = field(default_factory=MoverParams)
    next_move_id: int = 1
    next_token: int = 1
    moves: dict[MoveId, Move] = field(default_factory=dict)
    by_token: dict[int, MoveId] = field(default_factory=dict)
    pending: list[MoverOutput] = field(default_factory=list)
    # A reshard's plan: (μshard, target) still to start, in order.
    planned: list[tuple[UShard, ShardId]] = field(default_factory=list)
    # The longest write pause of each μshard moved (ms): from the move's start (its
    # Freeze leaves then) to `mapping_installed` (the new mapping is usable). A move
    # resumed by `restore` counts from the restore: the earlier part is not known.
    pauses: dict[UShard, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ plans

    def plan(self, moves: Sequence[tuple[UShard, ShardId]], first_move_id: int = 0) -> None:
        """Queue moves (a reshard); `start_planned` starts them as slots free up.
        `first_move_id`: with a durable driver, the first of len(planned) + len(moves)
        ids it allocated, so ids stay above every earlier one across restarts."""
        if first_move_id:
            assert first_move_id >= self.next_move_id, "move ids only grow"
            self.next_move_id = first_move_id
        self.planned.extend(moves)

    def start_planned(
        self,
        owner_of: Callable[[UShard], ShardId],
        now: Instant,
        is_ready: Callable[[ShardId], bool] | None = None,
    ) -> int:
        """Start queued moves while fewer than `moves_in_flight_max` are under way.
        `owner_of` is the current mapping: a μshard already at its target is skipped,
        one being moved (or stuck) waits. With `is_ready`, a move waits until both its
        p-shards have an active primary (a Freeze sent while the target is still
        starting would stretch the write pause by the target's start). Returns how
        many started."""
        started = 0
        waiting: list[tuple[UShard, ShardId]] = []
        for ushard, target in self.planned:
            source = owner_of(ushard)
            if source == target:
                continue
            unready = is_ready is not None and not (is_ready(source) and is_ready(target))
            if (
                unready
                or self.in_flight() >= self.params.moves_in_flight_max
                or self.is_moving(ushard)
            ):
                waiting.append((ushard, target))
                continue
            self.start(ushard, source, target, now)
            started += 1
        self.planned = waiting
        return started

    # ------------------------------------------------------------------ inputs

    def start(self, ushard: UShard, source: ShardId, target: ShardId, now: Instant) -> MoveId:
        assert source != target
        assert not self.is_moving(ushard), "one move of a μshard at a time"
        move_id = MoveId(self.next_move_id)
        self.next_move_id += 1
        move = Move(move_id=move_id, ushard=ushard, source=source, target=target, started_at=now)
        self.moves[move_id] = move
        self._send(move, now)
        return move_id

    def tick(self, now: Instant) -> None:
        for move_id in sorted(self.moves):
            move = self.moves[move_id]
            if move.step in FINISHED or move.step is Step.INSTALL:
                continue
            if (
                move.step in _BEFORE_OWN
                and not move.own_sent
                and now - move.started_at > self.params.abort_after_ms
            ):
                move.problem = f"not copied within {self.params.abort_after_ms:g} ms"
                self._go(move, Step.ABORT_TARGET, now)
            elif now - move.sent_at >= self.params.resend_after_ms:
                self._send(move, now)

    def on_reply(self, token: int, reply: MoverInput, now: Instant) -> None:
        move_id = self.by_token.pop(token, None)
        move = self.moves.get(move_id) if move_id is not None else None
        if move is None or move.token != token:
            return  # stale: a resent request's answer arrives, or the move finished
        if isinstance(reply, Unanswered):
            return  # keep the token: `tick` sends again after resend_after_ms
        move.token = 0
        if isinstance(reply, Exported):
            if move.step is Step.EXPORT:
                self._exported(move, reply, now)
            return
        if not isinstance(reply.result, Applied):
            self._refused(move, reply.result.message, now)
            return
        self._applied(move, now)

    def mapping_installed(self, move_id: MoveId, now: Instant) -> None:
        move = self.moves[move_id]
        assert move.step is Step.INSTALL
        pause = float(now - move.started_at)
        self.pauses[move.ushard] = max(pause, self.pauses.get(move.ushard, 0.0))
        self._go(move, Step.DROP, now)

    def outputs(self) -> list[MoverOutput]:
        out, self.pending = self.pending, []
        return out

    # ------------------------------------------------------------------ durability

    def record(self) -> MoverRecord:
        """The unfinished work. A driver stores it before it sends the outputs that
        follow a change (so `own_sent` is durable before Own leaves: a resumed move
        that may have committed never aborts)."""
        moves = tuple(
            MoveRecord(
                move_id=m.move_id,
                ushard=m.ushard,
                source=m.source,
                target=m.target,
                step=m.step,
                cursor=m.cursor,
                generation=m.generation,
                records=m.records,
                own_sent=m.own_sent or m.step is Step.OWN,
            )
            for _, m in sorted(self.moves.items())
            if m.step not in FINISHED
        )
        return MoverRecord(next_move_id=self.next_move_id, moves=moves, planned=tuple(self.planned))

    def restore(self, record: MoverRecord, now: Instant) -> None:
        """Resume stored work: each move sends its step again (every step is
        idempotent); a copy goes on from the stored cursor; a move whose mapping may
        not be stored yet installs it again."""
        self.next_move_id = max(self.next_move_id, record.next_move_id)
        self.planned = list(record.planned)
        for r in record.moves:
            step = Step.EXPORT if r.step is Step.INGEST else r.step  # the chunk is gone
            move = Move(
                move_id=r.move_id,
                ushard=r.ushard,
                source=r.source,
                target=r.target,
                started_at=now,
                step=step,
                cursor=r.cursor,
                generation=r.generation,
                records=r.records,
                own_sent=r.own_sent,
            )
            self.moves[r.move_id] = move
            self._go(move, step, now)

    # ------------------------------------------------------------------ queries

    def is_moving(self, ushard: UShard) -> bool:
        """A move of it is under way, or stuck (then only an operator may move it)."""
        return any(
            m.ushard == ushard and m.step not in (Step.DONE, Step.ABORTED)
            for m in self.moves.values()
        )

    def in_flight(self) -> int:
        return sum(1 for m in self.moves.values() if m.step not in FINISHED)

    # ------------------------------------------------------------------ steps

    def _exported(self, move: Move, reply: Exported, now: Instant) -> None:
        move.chunk = tuple(IngestRecord(k, v) for k, v in reply.records)
        move.next_cursor = reply.cursor
        move.generation = reply.generation
        if reply.total is not None:
            move.records = reply.total
        self._go(move, Step.INGEST, now)

    def _applied(self, move: Move, now: Instant) -> None:
        match move.step:
            case Step.FREEZE:
                self._go(move, Step.EXPORT, now)
            case Step.INGEST:
                move.chunks += 1
                move.cursor, move.chunk = move.next_cursor, ()
                done = move.cursor is None
                if "move-own-before-catchup" in self.params.bugs:
                    done = True  # deliberate bug: commit after the first chunk
                self._go(move, Step.OWN if done else Step.EXPORT, now)
            case Step.OWN:
                self._go(move, Step.INSTALL, now)
            case Step.DROP:
                self._go(move, Step.DONE, now)
            case Step.ABORT_TARGET:
                self._go(move, Step.ABORT_SOURCE, now)
            case Step.ABORT_SOURCE:
                self._go(move, Step.ABORTED, now)
            case _:
                pass  # an answer for a step already left behind

    def _refused(self, move: Move, why: str, now: Instant) -> None:
        move.problem = why
        if move.step in _BEFORE_OWN and not move.own_sent:
            self._go(move, Step.ABORT_TARGET, now)
        else:
            # After Own was sent, or while aborting, a refusal means the records
            # disagree with the mover's view: stop and leave it to an operator.
            self._go(move, Step.STUCK, now)

    def _go(self, move: Move, step: Step, now: Instant) -> None:
        move.step = step
        move.token = 0
        if step is Step.INSTALL:
            self.pending.append(
                InstallMapping(move_id=move.move_id, ushard=move.ushard, shard=move.target)
            )
        elif step not in FINISHED:
            self._send(move, now)

    def _send(self, move: Move, now: Instant) -> None:
        token = self.next_token
        self.next_token += 1
        if move.token:
            self.by_token.pop(move.token, None)
        move.token, move.sent_at = token, now
        self.by_token[token] = move.move_id
        if move.step is Step.EXPORT:
            self.pending.append(
                ExportChunk(
                    move_id=move.move_id,
                    token=token,
                    shard=move.source,
                    ushard=move.ushard,
                    after=move.cursor,
                    limit=self.params.chunk_records_max,
                )
            )
            return
        shard, command = self._command(move)
        self.pending.append(
            ProposeMove(
                move_id=move.move_id, token=token, shard=shard, command=encode_command(command)
            )
        )

    def _command(self, move: Move) -> tuple[ShardId, MoveCommand]:
        m, mid = move.ushard, move.move_id
        match move.step:
            case Step.FREEZE:
                return move.source, Freeze(ushard=m, move_id=mid)
            case Step.INGEST:
                return move.target, Ingest(ushard=m, move_id=mid, records=move.chunk)
            case Step.OWN:
                move.own_sent = True
                generation = Generation(move.generation + 1)
                own = Own(ushard=m, move_id=mid, generation=generation, records=move.records)
                return move.target, own
            case Step.DROP:
                return move.source, Drop(ushard=m, move_id=mid)
            case Step.ABORT_TARGET:
                return move.target, Abort(ushard=m, move_id=mid)
            case Step.ABORT_SOURCE:
                return move.source, Abort(ushard=m, move_id=mid)
            case _:
                raise AssertionError(f"no command for {move.step}")


def plan_reshard(
    current: Mapping[UShard, ShardId], target: Mapping[UShard, ShardId]
) -> list[tuple[UShard, ShardId]]:
    """The moves that turn mapping `current` into `target`, in μshard order, round-robin
    over the target p-shards so parallel moves spread their copies."""
    by_target: dict[ShardId, list[UShard]] = {}
    for ushard in sorted(target):
        if current.get(ushard) != target[ushard]:
            by_target.setdefault(target[ushard], []).append(ushard)
    plan: list[tuple[UShard, ShardId]] = []
    queues = [(shard, by_target[shard]) for shard in sorted(by_target)]
    while any(queue for _, queue in queues):
        for shard, queue in queues:
            if queue:
                plan.append((queue.pop(0), shard))
    return plan
