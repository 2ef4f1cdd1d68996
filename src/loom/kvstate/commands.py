"""Commands carried by log entries, and the results apply produces. Wire/disk format v1.

Encoded with msgspec MessagePack, tagged unions, explicit fields; never pickle.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

from loom.core.ids import Epoch, Generation, MoveId, RequestId, RequestSeq, Seq, UShard, Version


class Put(Struct, frozen=True, tag="put", kw_only=True):
    request: RequestId
    ushard: UShard
    key: bytes
    value: bytes
    if_absent: bool = False
    if_version: Version | None = None
    if_value: bytes | None = None
    ttl_ms: int | None = None
    # Every request of this client below `client_floor` has completed and will never be
    # retried, so apply may forget its dedupe entries (a replicated watermark).
    client_floor: RequestSeq = RequestSeq(0)


class Delete(Struct, frozen=True, tag="del", kw_only=True):
    request: RequestId
    ushard: UShard
    key: bytes
    if_exists: bool = False
    if_version: Version | None = None
    client_floor: RequestSeq = RequestSeq(0)


class Increment(Struct, frozen=True, tag="inc", kw_only=True):
    request: RequestId
    ushard: UShard
    key: bytes
    delta: int
    client_floor: RequestSeq = RequestSeq(0)


class TxnRead(Struct, frozen=True, array_like=True):
    key: bytes
    version: Version | None  # None: the key was read as absent (PITFALLS: txn-skip-absent)


class TxnWrite(Struct, frozen=True, array_like=True):
    key: bytes
    value: bytes | None  # None: delete


class TxnCommit(Struct, frozen=True, tag="txn", kw_only=True):
    request: RequestId
    ushard: UShard
    snapshot: Version
    epoch: Epoch  # epoch of the replica the snapshot was read from (PITFALLS 9)
    reads: tuple[TxnRead, ...]
    writes: tuple[TxnWrite, ...]
    client_floor: RequestSeq = RequestSeq(0)


class Noop(Struct, frozen=True, tag="noop"):
    """Fills a hole during activation; applies to nothing."""


class Gc(Struct, frozen=True, tag="gc", kw_only=True):
    """Replicated garbage collection, so every replica forgets the same things.

    Tombstones with version seq below `tombstone_horizon` are dropped, and a
    transaction whose snapshot is below it is rejected from then on. Dedupe entries
    stamped before `dedupe_before_wall_ms` are trimmed.
    """

    tombstone_horizon: Seq
    dedupe_before_wall_ms: int


# --- μshard moves (DESIGN §6, docs/protocols/resharding.md) ------------------------------
# Proposed by the shard manager's mover, never by clients. Each names the move it belongs
# to; `move_id`s of one μshard only grow, so a delayed copy of a command from an earlier
# move, or one of an aborted move, is refused instead of re-applied.


class Freeze(Struct, frozen=True, tag="freeze", kw_only=True):
    """On the source: from this entry on the μshard is read-only here, and every read
    and write of it is answered MOVED."""

    ushard: UShard
    move_id: MoveId


class IngestRecord(Struct, frozen=True, array_like=True):
    """One stored key/value of the μshard, exactly as the source holds it."""

    key: bytes
    value: bytes


class Ingest(Struct, frozen=True, tag="ingest", kw_only=True):
    """On the target: a chunk of the frozen source's μshard state (data, dedupe table,
    μshard meta). The first one turns the μshard `incoming`."""

    ushard: UShard
    move_id: MoveId
    records: tuple[IngestRecord, ...]


class Own(Struct, frozen=True, tag="own", kw_only=True):
    """On the target: the single commit point of the move. `generation` is the source's
    generation + 1, so every version written here is above every version written there."""

    ushard: UShard
    move_id: MoveId
    generation: Generation
    # How many records the source exported: Own refuses a copy that holds another
    # number, so no mover bug can commit a partial μshard.
    records: int


class Abort(Struct, frozen=True, tag="abort", kw_only=True):
    """Before Own only: the source owns again, the target forgets what it ingested."""

    ushard: UShard
    move_id: MoveId


class Drop(Struct, frozen=True, tag="drop", kw_only=True):
    """On the source, after Own committed on the target: forget the μshard."""

    ushard: UShard
    move_id: MoveId


MoveCommand = Freeze | Ingest | Own | Abort | Drop
Command = Put | Delete | Increment | TxnCommit | Noop | Gc | Freeze | Ingest | Own | Abort | Drop
WriteCommand = Put | Delete | Increment | TxnCommit

# "moved": the μshard is not owned here (frozen, being ingested, moved away): retry at
# the owner the routing table names. "ownership": a move command did not fit the
# μshard's ownership record (a stale or out-of-order command of a move).
FailureReason = Literal[
    "condition", "conflict", "invalid", "epoch", "horizon", "moved", "ownership"
]


class Applied(Struct, frozen=True, tag="ok", kw_only=True):
    """The command took effect at `version`. `counter` is the new value of an increment."""

    version: Version
    counter: int | None = None
    # For a conditional delete of a missing key with if_exists=False: nothing existed.
    existed: bool = True


class Rejected(Struct, frozen=True, tag="no", kw_only=True):
    """The command did nothing. `current` is the key's version when a condition failed."""

    reason: FailureReason
    message: str
    current: Version | None = None


Result = Applied | Rejected

_command_encoder = msgspec.msgpack.Encoder()
# Annotated: mypy cannot infer a union's Decoder type from the call.
_command_decoder: msgspec.msgpack.Decoder[Command] = msgspec.msgpack.Decoder(Command)
_result_decoder: msgspec.msgpack.Decoder[Result] = msgspec.msgpack.Decoder(Result)


def encode_command(command: Command) -> bytes:
    return _command_encoder.encode(command)


def decode_command(data: bytes) -> Command:
    """Raises msgspec.DecodeError on bytes that are not a v1 command."""
    try:
        return _command_decoder.decode(data)
    except UnicodeDecodeError as error:  # msgspec lets it through for non-UTF-8 strings
        raise msgspec.DecodeError(f"not UTF-8: {error}") from None


def encode_result(result: Result) -> bytes:
    return _command_encoder.encode(result)


def decode_result(data: bytes) -> Result:
    return _result_decoder.decode(data)
