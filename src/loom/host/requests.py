"""Client ↔ replica requests and replies for one p-shard. Wire format v1 (msgspec).

`token` is the caller's id for the request, echoed in the reply.
"""

from __future__ import annotations

import enum

from msgspec import Struct

from loom.core.ids import Ballot, Epoch, Generation, MoveId, NodeId, Seq, UShard, Version
from loom.kvstate.commands import Result
from loom.kvstate.reads import Item


class Durability(enum.Enum):
    QUORUM = "quorum"
    FAST_ACK = "fast_ack"


class Consistency(enum.Enum):
    STRONG = "strong"
    BOUNDED = "bounded"
    READ_YOUR_WRITES = "ryw"
    EVENTUAL = "eventual"


class WriteRequest(Struct, frozen=True, tag="write", kw_only=True):
    token: int
    command: bytes  # an encoded loom.kvstate.commands write command
    durability: Durability = Durability.QUORUM


class ReadRequest(Struct, frozen=True, tag="read", kw_only=True):
    token: int
    ushard: UShard
    key: bytes
    consistency: Consistency = Consistency.STRONG
    bound_ms: float | None = None
    min_version: Version | None = None
    # More keys of the same μshard, read at the same point as `key` (`get_many`, a
    # transaction's batch): one request instead of one each. At most
    # `Limits.read_keys_max` - 1; each counts as a read for the reads/s quota.
    also: tuple[bytes, ...] = ()


class ScanRequest(Struct, frozen=True, tag="scan", kw_only=True):
    """Live items of one μshard whose key starts with `prefix`, after `start_after`."""

    token: int
    ushard: UShard
    prefix: bytes = b""
    start_after: bytes | None = None
    limit: int = 100
    consistency: Consistency = Consistency.STRONG
    bound_ms: float | None = None
    min_version: Version | None = None


class MoveRequest(Struct, frozen=True, tag="move", kw_only=True):
    """From the shard manager's mover: an encoded Freeze/Ingest/Own/Abort/Drop to
    propose at this p-shard's primary. Answered like a write (WriteReply)."""

    token: int
    command: bytes


class ExportRequest(Struct, frozen=True, tag="export", kw_only=True):
    """From the mover: the next chunk of a μshard frozen by `move_id`, after `after`."""

    token: int
    ushard: UShard
    move_id: MoveId
    after: bytes | None = None
    limit: int = 512


class HoldingRequest(Struct, frozen=True, tag="holding", kw_only=True):
    """From the shard manager before it retires a p-shard (a shrink): which of μshards
    0..ushards-1 this p-shard's activated primary holds (owned, frozen or incoming)."""

    token: int
    ushards: int


class HoldingReply(Struct, frozen=True, tag="held", kw_only=True):
    token: int
    ushards: tuple[UShard, ...]


class ExportReply(Struct, frozen=True, tag="exported", kw_only=True):
    token: int
    records: tuple[tuple[bytes, bytes], ...]
    # Pass as `after` for the next chunk; None when the μshard is fully exported.
    cursor: bytes | None
    # The μshard's generation at the source; the target's Own sets one above it.
    generation: Generation
    # In the first chunk (after=None) only: how many records the whole export holds.
    total: int | None = None


class WriteReply(Struct, frozen=True, tag="wrote", kw_only=True):
    token: int
    result: Result
    # FAST_ACK: acknowledged when sequenced; the ballot lets a lost write be named.
    fast_ack_ballot: Ballot | None = None


class KeyRead(Struct, frozen=True, array_like=True):
    """One more key of a `ReadRequest.also`: what `ReadReply.item` and
    `record_version` are for the first."""

    item: Item | None
    record_version: Version | None


class ReadReply(Struct, frozen=True, tag="readreply", kw_only=True):
    token: int
    item: Item | None
    # The record's version including tombstones, for transactions' read sets.
    record_version: Version | None
    applied_seq: Seq
    epoch: Epoch
    # The μshard's generation at this replica: a transaction's snapshot is
    # (generation, applied_seq), comparable with the versions it reads.
    generation: Generation = Generation(0)
    # The request's `also` keys, in its order.
    also: tuple[KeyRead, ...] = ()

    def reads(self) -> list[KeyRead]:
        """Every key's read, the request's `key` first."""
        return [KeyRead(self.item, self.record_version), *self.also]


class ScanReply(Struct, frozen=True, tag="scanned", kw_only=True):
    token: int
    items: tuple[Item, ...]
    # Pass as `start_after` for the next page; None when nothing is left.
    cursor: bytes | None
    applied_seq: Seq
    epoch: Epoch


class ErrorCode(enum.Enum):
    NOT_PRIMARY = "not_primary"
    NOT_READY = "not_ready"
    OVERLOADED = "overloaded"
    TOO_STALE = "too_stale"
    TIMEOUT = "timeout"
    # The slot this write was sequenced in holds another command: it never applied.
    NOT_APPLIED = "not_applied"
    INVALID = "invalid"
    # The μshard is not owned by this p-shard (moving or moved): refresh the mapping.
    MOVED = "moved"
    # Over the keyspace's reads/s or writes/s quota: retry after `retry_after_ms`.
    THROTTLED = "throttled"
    # Over the keyspace's stored-bytes quota: not retryable (ADR 0008).
    QUOTA_EXCEEDED = "quota_exceeded"
    # The request's token is missing, unknown, or does not reach this keyspace.
    PERMISSION_DENIED = "permission_denied"


class ErrorReply(Struct, frozen=True, tag="error", kw_only=True):
    token: int
    code: ErrorCode
    message: str = ""
    primary_hint: NodeId | None = None
    retry_after_ms: int = 0


ReadLike = ReadRequest | ScanRequest
ClientRequest = WriteRequest | ReadRequest | ScanRequest
ClientReply = WriteReply | ReadReply | ScanReply | ErrorReply
MoverRequest = MoveRequest | ExportRequest | HoldingRequest
MoverReply = WriteReply | ExportReply | HoldingReply | ErrorReply
