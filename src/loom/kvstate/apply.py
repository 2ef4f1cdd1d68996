"""Apply one log entry to one p-shard's state: the pure kv state machine (DESIGN §3).

Rules:
- A pure function of (durable state, entry context, command bytes): no IO, no clock,
  no randomness, no dict/set order. Every replica computes identical results and an
  identical batch; wall time comes only from `EntryContext.wall_ms`, stamped by the
  primary. `limits` changes state (size checks, dedupe trimming), so it must be the
  same on every replica.
- Command i of an entry is version (generation, seq, i): commands never share a
  version (PITFALLS 17). Later commands see earlier ones' writes through an Overlay;
  the net writes go into the caller's batch, which also carries `applied_seq`.
- Command bytes came from clients: anything undecodable or out of range is
  `Rejected("invalid")`, never an exception. Records we stored ourselves are trusted:
  if they do not decode, apply raises (crash, don't limp).
- Every write is exactly-once (PITFALLS 5): a remembered request returns its first
  result and changes nothing; a fresh one is applied and its result remembered, a
  rejection included (see `loom.kvstate.dedupe`).
- A transaction's snapshot names a whole applied entry: a record is newer than the
  snapshot iff its (generation, seq) is greater; the snapshot's index is ignored.
- An expired value counts as absent for conditions and counters, but keeps its
  version for transaction checks; a tombstone is a record with a version until a Gc
  horizon passes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import assert_never

import msgspec

from loom.core.ids import Epoch, Generation, Seq, UShard, Version
from loom.core.limits import DEFAULT_LIMITS, Limits
from loom.core.time import WallMs
from loom.kvstate import dedupe, keys, ownership
from loom.kvstate.commands import (
    Abort,
    Applied,
    Delete,
    Drop,
    Freeze,
    Gc,
    Increment,
    Ingest,
    Noop,
    Own,
    Put,
    Rejected,
    Result,
    TxnCommit,
    TxnRead,
    WriteCommand,
    decode_command,
)
from loom.kvstate.overlay import Overlay, StateReader
from loom.kvstate.records import (
    COUNTER_MAX,
    COUNTER_MIN,
    ValueRecord,
    decode_counter,
    decode_uint64,
    decode_value_record,
    encode_counter,
    encode_uint64,
    encode_value_record,
)
from loom.storage.api import WriteBatch

__all__ = ["EntryContext", "StateReader", "apply_entry", "tombstone_horizon"]

# Keeps wall_ms + ttl_ms far inside the record's integer range (~146 million years).
TTL_MS_MAX = 2**62


@dataclass(frozen=True, slots=True, kw_only=True)
class EntryContext:
    """What the primary stamped into the log entry; all apply knows about the world."""

    seq: Seq
    epoch: Epoch
    wall_ms: WallMs
    # The generation of a μshard that never moved (its record overrides it after a move).
    generation: Generation
    # The μshards the p-shard was created with (None: all); see loom.kvstate.ownership.
    initial: frozenset[UShard] | None = None


def apply_entry(
    state: StateReader,
    ctx: EntryContext,
    commands: Sequence[bytes],
    batch: WriteBatch,
    limits: Limits = DEFAULT_LIMITS,
    *,
    shared_version_bug: bool = False,
) -> list[Result]:
    """Apply the entry's commands in order; add their net writes to `batch`.

    `shared_version_bug` deliberately gives every command of the entry one version
    (PITFALLS 17), for the simulator's `--bug shared-batch-version`.
    """
    assert 0 <= ctx.wall_ms <= keys.WALL_MS_MAX, ctx
    assert ctx.seq > 0, "log slots start at 1"
    view = Overlay(state)
    results: list[Result] = []
    for index, data in enumerate(commands):
        results.append(_apply_command(view, ctx, 0 if shared_version_bug else index, data, limits))
    view.flush(batch)
    return results


def tombstone_horizon(state: StateReader) -> Seq:
    """Tombstones below this seq may be gone; snapshots below it are refused."""
    stored = state.get(keys.TOMBSTONE_HORIZON_KEY)
    return Seq(0 if stored is None else decode_uint64(stored))


def _apply_command(
    view: Overlay, ctx: EntryContext, index: int, data: bytes, limits: Limits
) -> Result:
    try:
        command = decode_command(data)
    except msgspec.DecodeError as exc:
        return _invalid(f"undecodable command: {exc}")
    version = Version(generation=ctx.generation, seq=ctx.seq, index=index)
    match command:
        case Noop():
            return Applied(version=version)
        case Gc():
            return _collect_garbage(view, ctx, version, command)
        case Put() | Delete() | Increment() | TxnCommit():
            if not keys.is_valid_ushard(command.ushard):
                return _invalid(f"ushard must be in 0..{keys.USHARD_MAX}")
            if not ownership.is_owned(view, command.ushard, ctx.initial):
                # Not dedupe'd: the μshard's table is frozen or elsewhere, and the retry
                # at the owner must find the request fresh (or remembered there).
                return Rejected(reason="moved", message=f"μshard {command.ushard} is not here")
            # The μshard's own generation: above every version it had on earlier p-shards.
            generation = ownership.generation(view, command.ushard, ctx.generation)
            version = Version(generation=generation, seq=ctx.seq, index=index)
            return _apply_write(view, ctx, version, command, limits)
        case Freeze() | Ingest() | Own() | Abort() | Drop():
            refusal = ownership.apply_move(view, command, ctx.initial)
            if refusal is not None:
                return Rejected(reason="ownership", message=refusal)
            return Applied(version=version)
        case _:
            assert_never(command)


def _apply_write(
    view: Overlay, ctx: EntryContext, version: Version, command: WriteCommand, limits: Limits
) -> Result:
    problem = _request_problem(command)
    if problem is not None:
        # Without a valid request id there is no dedupe key: answer, remember nothing.
        return _invalid(problem)
    ushard, request = command.ushard, command.request
    remembered = dedupe.lookup(view, ushard, request)
    if remembered is not None:
        return remembered
    if dedupe.is_below_floor(view, ushard, request):
        # The client already has this request's result; this copy is a late duplicate.
        return _invalid("stale duplicate: the request is below the client's floor")
    result = _execute(view, ctx, version, command, limits)
    dedupe.raise_floor(view, ushard, request.client, command.client_floor, ctx.wall_ms)
    dedupe.remember(view, ushard, request, wall_ms=ctx.wall_ms, result=result, limits=limits)
    return result


def _execute(
    view: Overlay, ctx: EntryContext, version: Version, command: WriteCommand, limits: Limits
) -> Result:
    match command:
        case Put():
            return _put(view, ctx, version, command, limits)
        case Delete():
            return _delete(view, ctx, version, command, limits)
        case Increment():
            return _increment(view, ctx, version, command, limits)
        case TxnCommit():
            return _commit_transaction(view, ctx, version, command, limits)
        case _:
            assert_never(command)


def _put(view: Overlay, ctx: EntryContext, version: Version, cmd: Put, limits: Limits) -> Result:
    problem = _key_problem(cmd.key, limits) or _value_problem(cmd.value, limits)
    if cmd.if_value is not None:
        problem = problem or _value_problem(cmd.if_value, limits)
    if cmd.ttl_ms is not None and not 0 < cmd.ttl_ms <= TTL_MS_MAX:
        problem = problem or f"ttl_ms must be in 1..{TTL_MS_MAX}"
    if problem is not None:
        return _invalid(problem)
    live = _live_record(view, ctx, cmd.ushard, cmd.key)
    live_version = None if live is None else live.version
    if cmd.if_absent and live is not None:
        return _condition_failed("if_absent: the key exists", live_version)
    if cmd.if_version is not None and live_version != cmd.if_version:
        return _condition_failed("if_version: the key's version differs", live_version)
    if cmd.if_value is not None and (live is None or live.value != cmd.if_value):
        return _condition_failed("if_value: the key's value differs", live_version)
    expires_at_ms = 0 if cmd.ttl_ms is None else ctx.wall_ms + cmd.ttl_ms
    record = ValueRecord(version=version, value=cmd.value, expires_at_ms=expires_at_ms)
    _write_record(view, cmd.ushard, cmd.key, record)
    return Applied(version=version)


def _delete(
    view: Overlay, ctx: EntryContext, version: Version, cmd: Delete, limits: Limits
) -> Result:
    problem = _key_problem(cmd.key, limits)
    if problem is not None:
        return _invalid(problem)
    live = _live_record(view, ctx, cmd.ushard, cmd.key)
    live_version = None if live is None else live.version
    if cmd.if_exists and live is None:
        return _condition_failed("if_exists: the key is absent", None)
    if cmd.if_version is not None and live_version != cmd.if_version:
        return _condition_failed("if_version: the key's version differs", live_version)
    # A tombstone even for an absent key: a transaction that read the key as absent
    # must see that something happened after its snapshot.
    _write_record(view, cmd.ushard, cmd.key, ValueRecord(version=version, value=None))
    return Applied(version=version, existed=live is not None)


def _increment(
    view: Overlay, ctx: EntryContext, version: Version, cmd: Increment, limits: Limits
) -> Result:
    problem = _key_problem(cmd.key, limits)
    if problem is not None:
        return _invalid(problem)
    if not COUNTER_MIN <= cmd.delta <= COUNTER_MAX:
        return _invalid("delta is not a signed 64-bit integer")
    live = _live_record(view, ctx, cmd.ushard, cmd.key)
    current = 0
    if live is not None:
        assert live.value is not None
        decoded = decode_counter(live.value)
        if decoded is None:
            return _invalid("the value is not an 8-byte counter")
        current = decoded
    counter = current + cmd.delta
    if not COUNTER_MIN <= counter <= COUNTER_MAX:
        return _invalid("the counter would overflow 64 bits")
    # A live counter keeps its expiry: a TTL'd counter counts within its window.
    expires_at_ms = 0 if live is None else live.expires_at_ms
    value = encode_counter(counter)
    record = ValueRecord(version=version, value=value, expires_at_ms=expires_at_ms)
    _write_record(view, cmd.ushard, cmd.key, record)
    return Applied(version=version, counter=counter)


def _commit_transaction(
    view: Overlay, ctx: EntryContext, version: Version, cmd: TxnCommit, limits: Limits
) -> Result:
    problem = _transaction_problem(cmd, limits)
    if problem is not None:
        return _invalid(problem)
    if cmd.epoch != ctx.epoch:
        # PITFALLS 9: a snapshot read in another epoch may predate a lost failover.
        return Rejected(reason="epoch", message="the snapshot was read in another epoch")
    if cmd.snapshot.generation != version.generation:
        # PITFALLS 9: the μshard moved since the snapshot; its history here is partial.
        return Rejected(reason="epoch", message="the μshard moved since the snapshot")
    if cmd.snapshot.seq < tombstone_horizon(view):
        # Tombstones the snapshot could rely on may be collected: changes are invisible.
        return Rejected(reason="horizon", message="the snapshot is below the GC horizon")
    for read in cmd.reads:
        conflict = _read_conflict(view, ctx, cmd, read)
        if conflict is not None:
            return conflict
    for write in cmd.writes:
        _write_record(view, cmd.ushard, write.key, ValueRecord(version=version, value=write.value))
    return Applied(version=version)


def _read_conflict(
    view: Overlay, ctx: EntryContext, cmd: TxnCommit, read: TxnRead
) -> Rejected | None:
    """Whether the key changed since the snapshot, tombstones and expired values included."""
    current = _stored_record(view, cmd.ushard, read.key)
    current_version = None if current is None else current.version
    changed = (
        (current_version is not None and _is_after_snapshot(current_version, cmd.snapshot))
        or (read.version is not None and current_version != read.version)
        or (read.version is None and current is not None and current.is_live(ctx.wall_ms))
    )
    if not changed:
        return None
    return Rejected(
        reason="conflict", message="a key read changed after the snapshot", current=current_version
    )


def _is_after_snapshot(version: Version, snapshot: Version) -> bool:
    """A snapshot names a whole applied entry (replicas apply entries atomically), so
    every command of entry `snapshot.seq` is in it whatever `snapshot.index` says."""
    return (version.generation, version.seq) > (snapshot.generation, snapshot.seq)


def _collect_garbage(view: Overlay, ctx: EntryContext, version: Version, cmd: Gc) -> Result:
    """Raise the horizon, drop dead records below it, forget old dedupe records.

    Scans every data record of the p-shard: Gc is meant to be rare. Expired values
    below the horizon go too; like tombstones, they read as absent and a transaction
    relying on one is refused by the horizon check.
    """
    if not 0 <= cmd.tombstone_horizon <= ctx.seq:
        return _invalid("tombstone_horizon must be in 0..the entry's seq")
    if cmd.dedupe_before_wall_ms < 0:
        return _invalid("dedupe_before_wall_ms must not be negative")
    horizon = max(tombstone_horizon(view), cmd.tombstone_horizon)
    view.put(keys.TOMBSTONE_HORIZON_KEY, encode_uint64(horizon))
    owned: dict[UShard, bool] = {}

    def is_owned(ushard: UShard) -> bool:
        # A μshard that is frozen or being ingested must not change under the copy.
        if ushard not in owned:
            owned[ushard] = ownership.is_owned(view, ushard, ctx.initial)
        return owned[ushard]

    dead = [
        stored_key
        for stored_key, value in view.scan(keys.ALL_DATA.start, keys.ALL_DATA.end)
        if _is_collectable(decode_value_record(value), horizon, ctx.wall_ms)
        and is_owned(keys.ushard_of_table_key(stored_key))
    ]
    for stored_key in dead:
        view.delete(stored_key)
    dedupe.forget_before(view, cmd.dedupe_before_wall_ms, is_owned)
    return Applied(version=version)


def _is_collectable(record: ValueRecord, horizon: int, wall_ms: int) -> bool:
    return record.version.seq < horizon and not record.is_live(wall_ms)


# --- records ----------------------------------------------------------------------------


def _stored_record(view: Overlay, ushard: UShard, key: bytes) -> ValueRecord | None:
    stored = view.get(keys.data_key(ushard, key))
    return None if stored is None else decode_value_record(stored)


def _live_record(
    view: Overlay, ctx: EntryContext, ushard: UShard, key: bytes
) -> ValueRecord | None:
    record = _stored_record(view, ushard, key)
    return record if record is not None and record.is_live(ctx.wall_ms) else None


def _write_record(view: Overlay, ushard: UShard, key: bytes, record: ValueRecord) -> None:
    view.put(keys.data_key(ushard, key), encode_value_record(record))


# --- validation of client input ---------------------------------------------------------


def _request_problem(cmd: WriteCommand) -> str | None:
    if not keys.is_valid_request(cmd.request):
        return "request id out of range"
    if not 0 <= cmd.client_floor <= cmd.request.seq:
        # The request itself is not complete, so the floor cannot be above it.
        return "client_floor must be in 0..request.seq"
    return None


def _key_problem(key: bytes, limits: Limits) -> str | None:
    if len(key) > limits.key_bytes_max:
        return f"key longer than {limits.key_bytes_max} bytes"
    return None


def _value_problem(value: bytes, limits: Limits) -> str | None:
    if len(value) > limits.value_bytes_max:
        return f"value longer than {limits.value_bytes_max} bytes"
    return None


def _transaction_problem(cmd: TxnCommit, limits: Limits) -> str | None:
    if len(cmd.reads) > limits.txn_reads_max:
        return f"more than {limits.txn_reads_max} reads"
    if len(cmd.writes) > limits.txn_writes_max:
        return f"more than {limits.txn_writes_max} writes"
    for read in cmd.reads:
        problem = _key_problem(read.key, limits)
        if problem is not None:
            return problem
    for write in cmd.writes:
        problem = _key_problem(write.key, limits)
        if problem is None and write.value is not None:
            problem = _value_problem(write.value, limits)
        if problem is not None:
            return problem
    return None


def _invalid(message: str) -> Rejected:
    return Rejected(reason="invalid", message=message)


def _condition_failed(message: str, current: Version | None) -> Rejected:
    return Rejected(reason="condition", message=message, current=current)
