"""Who owns a μshard, as the replicated log says; and apply of the move commands.

Rules (DESIGN §6, PITFALLS 10):
- Ownership is state: one `OwnershipRecord` per μshard in the μshard meta table
  (`keys.owner_key`), changed only by applying Freeze / Ingest / Own / Abort / Drop.
  Never an in-memory fence: every replica of a p-shard agrees at every applied seq.
- A μshard without a record is owned iff the p-shard was created with it
  (`initial` — the keyspace mapping at creation, the same on every replica; None
  means "every μshard", the layout before moves existed).
- Only an `owned` μshard is read or written. `frozen` (source, between Freeze and
  Drop), `incoming` (target, between the first Ingest and Own), `absent` and
  `dropped` answer MOVED at every consistency level.
- The move id of a μshard's record only grows: a command of an older move, or a
  delayed copy of one, does not fit the table below and is refused ("ownership"),
  so apply stays idempotent under duplicates and replays.
- Own is the commit point: nothing turns an Own-ed μshard back (Abort refuses it).
- A frozen μshard never changes until Drop or Abort (Gc skips it too), so a copy
  read from any replica that applied the Freeze is the state at the freeze point.
"""

from __future__ import annotations

import enum

import msgspec
from msgspec import Struct

from loom.core.ids import Generation, MoveId, UShard
from loom.kvstate import keys
from loom.kvstate.commands import Abort, Drop, Freeze, Ingest, MoveCommand, Own
from loom.kvstate.overlay import Overlay, StateReader
from loom.kvstate.records import decode_uint64, encode_uint64


class Owner(enum.Enum):
    OWNED = "owned"
    FROZEN = "frozen"
    INCOMING = "incoming"
    ABSENT = "absent"
    DROPPED = "dropped"


# A p-shard "holds" a μshard in these states: its data is (or is becoming) there. A
# p-shard that holds none may be retired (a shrink, loom.shardmgr.shrink).
HELD = (Owner.OWNED, Owner.FROZEN, Owner.INCOMING)


class OwnershipRecord(Struct, frozen=True, array_like=True, tag=1):
    state: Owner
    move_id: MoveId
    # An `owned` μshard that arrived by Own(move_id): that move is committed here.
    committed: bool = False


Initial = frozenset[UShard] | None

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(OwnershipRecord)


def ownership(state: StateReader, ushard: UShard, initial: Initial) -> OwnershipRecord:
    stored = state.get(keys.owner_key(ushard))
    if stored is not None:
        return _decoder.decode(stored)
    born_with = initial is None or ushard in initial
    return OwnershipRecord(state=Owner.OWNED if born_with else Owner.ABSENT, move_id=MoveId(0))


def is_owned(state: StateReader, ushard: UShard, initial: Initial) -> bool:
    return ownership(state, ushard, initial).state is Owner.OWNED


def generation(state: StateReader, ushard: UShard, default: Generation) -> Generation:
    """The μshard's generation: set by Own; `default` (the host's) before any move."""
    stored = state.get(keys.generation_key(ushard))
    return default if stored is None else Generation(decode_uint64(stored))


# --- apply ----------------------------------------------------------------------------

# Outcome of a move command: None = applied, else why it was refused.
Refusal = str | None


def apply_move(view: Overlay, command: MoveCommand, initial: Initial) -> Refusal:
    """Apply one move command to the overlay; never raises on client-shaped input."""
    if not keys.is_valid_ushard(command.ushard) or command.move_id <= 0:
        return "invalid μshard or move id"
    record = ownership(view, command.ushard, initial)
    match command:
        case Freeze():
            return _freeze(view, command, record)
        case Ingest():
            return _ingest(view, command, record)
        case Own():
            return _own(view, command, record)
        case Abort():
            return _abort(view, command, record)
        case Drop():
            return _drop(view, command, record)


def _freeze(view: Overlay, cmd: Freeze, record: OwnershipRecord) -> Refusal:
    if record.state is Owner.FROZEN and record.move_id == cmd.move_id:
        return None  # a retry
    if record.state is Owner.OWNED and record.move_id < cmd.move_id:
        _set(view, cmd.ushard, Owner.FROZEN, cmd.move_id)
        return None
    return _unfit(cmd, record)


def _ingest(view: Overlay, cmd: Ingest, record: OwnershipRecord) -> Refusal:
    for item in cmd.records:
        if not is_movable_key(item.key, cmd.ushard):
            return "an ingested key is not part of the μshard's movable state"
    if record.state in (Owner.ABSENT, Owner.DROPPED) and record.move_id < cmd.move_id:
        # Nothing of the μshard is here but its record (Drop and Abort clear it).
        _set(view, cmd.ushard, Owner.INCOMING, cmd.move_id)
    elif not (record.state is Owner.INCOMING and record.move_id == cmd.move_id):
        return _unfit(cmd, record)
    # Puts of the frozen source's bytes: a duplicated chunk writes the same again.
    for item in cmd.records:
        view.put(item.key, item.value)
    return None


def _own(view: Overlay, cmd: Own, record: OwnershipRecord) -> Refusal:
    if record.state is Owner.OWNED and record.committed and record.move_id == cmd.move_id:
        return None  # a retry
    if not (record.state is Owner.INCOMING and record.move_id == cmd.move_id):
        return _unfit(cmd, record)
    current = view.get(keys.generation_key(cmd.ushard))
    if current is not None and decode_uint64(current) >= cmd.generation:
        return "the new generation must be above the source's"
    held = movable_records(view, cmd.ushard)
    if held != cmd.records:
        return f"incomplete copy: {held} records ingested, the source exported {cmd.records}"
    view.put(keys.generation_key(cmd.ushard), encode_uint64(cmd.generation))
    _set(view, cmd.ushard, Owner.OWNED, cmd.move_id, committed=True)
    return None


def _abort(view: Overlay, cmd: Abort, record: OwnershipRecord) -> Refusal:
    state, move_id = record.state, record.move_id
    if move_id == cmd.move_id:
        if state is Owner.FROZEN:
            _set(view, cmd.ushard, Owner.OWNED, cmd.move_id)  # the source owns again
            return None
        if state is Owner.INCOMING:
            _clear(view, cmd.ushard)
            _set(view, cmd.ushard, Owner.ABSENT, cmd.move_id)
            return None
        if (state is Owner.OWNED and not record.committed) or state is Owner.ABSENT:
            return None  # a retry
        return _unfit(cmd, record)  # Own or Drop of this move applied: it is committed
    if move_id < cmd.move_id and state in (Owner.OWNED, Owner.ABSENT, Owner.DROPPED):
        # This side never took part (its Freeze or Ingest was lost): only raise the
        # move id, so a late copy of that Freeze or Ingest is refused.
        _set(view, cmd.ushard, Owner.OWNED if state is Owner.OWNED else Owner.ABSENT, cmd.move_id)
        return None
    return _unfit(cmd, record)


def _drop(view: Overlay, cmd: Drop, record: OwnershipRecord) -> Refusal:
    if record.state is Owner.DROPPED and record.move_id == cmd.move_id:
        return None
    if not (record.state is Owner.FROZEN and record.move_id == cmd.move_id):
        return _unfit(cmd, record)
    _clear(view, cmd.ushard)
    _set(view, cmd.ushard, Owner.DROPPED, cmd.move_id)
    return None


def _unfit(cmd: MoveCommand, record: OwnershipRecord) -> str:
    name = f"{type(cmd).__name__}({cmd.move_id})"
    held = f"{record.state.value}({record.move_id})"
    return f"{name} does not fit μshard {cmd.ushard}: {held}"


def _set(
    view: Overlay, ushard: UShard, state: Owner, move_id: MoveId, *, committed: bool = False
) -> None:
    record = OwnershipRecord(state=state, move_id=move_id, committed=committed)
    view.put(keys.owner_key(ushard), _encoder.encode(record))


def _clear(view: Overlay, ushard: UShard) -> None:
    """Delete the μshard's whole state (its ownership record is rewritten by the caller).

    Proportional to the μshard's size; a μshard is meant to be small (many per p-shard).
    """
    for key_range in keys.ushard_ranges(ushard):
        doomed = [key for key, _ in view.scan(key_range.start, key_range.end)]
        for key in doomed:
            view.delete(key)


# --- export ---------------------------------------------------------------------------


def is_movable_key(key: bytes, ushard: UShard) -> bool:
    """A key of `ushard`'s state that a move copies: everything but its ownership record."""
    return key != keys.owner_key(ushard) and any(
        r.start <= key < r.end for r in keys.ushard_ranges(ushard)
    )


def movable_records(state: StateReader, ushard: UShard) -> int:
    """How many records a move of `ushard` copies (one scan of the μshard)."""
    return sum(
        1
        for key_range in keys.ushard_ranges(ushard)
        for key, _ in state.scan(key_range.start, key_range.end)
        if key != keys.owner_key(ushard)
    )


def export_chunk(
    state: StateReader, ushard: UShard, after: bytes | None, limit: int
) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """Up to `limit` movable records of `ushard` in key order after `after`; the cursor
    for the next chunk is the last key returned, None when nothing is left."""
    assert limit > 0
    out: list[tuple[bytes, bytes]] = []
    for key_range in keys.ushard_ranges(ushard):
        start = key_range.start if after is None else max(key_range.start, after + b"\x00")
        if start >= key_range.end:
            continue
        for key, value in state.scan(start, key_range.end):  # lazy: stops at the break
            if key == keys.owner_key(ushard):
                continue
            if len(out) == limit:
                return out, out[-1][0]
            out.append((key, value))
    return out, None
