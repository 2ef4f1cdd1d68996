"""Commands carried by log entries, and the results apply produces. Wire/disk format v1.

Encoded with msgspec MessagePack, tagged unions, explicit fields; never pickle.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

from loom.core.ids import Epoch, RequestId, RequestSeq, Seq, UShard, Version


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


Command = Put | Delete | Increment | TxnCommit | Noop | Gc
WriteCommand = Put | Delete | Increment | TxnCommit

FailureReason = Literal["condition", "conflict", "invalid", "epoch", "horizon"]


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
