"""DurableQ's stored records, call ids and key layout (see `loom.functions.queue`).

What the queue keeps in keyspace `__functions`, and where. Everything about one call
lives in its partition's μshard (`shard_key = q/{partition}`), so a submission is one
serializable transaction and a scheduler claims many calls of a partition in one:
- `q/{p}/lease`                                  → `PartitionLease` (who schedules p)
- `q/{p}/call/{call id}`                         → `CallRecord` (msgpack)
- `q/{p}/due/{app}/{function}/{run_after:016x}/{id}` → `DueEntry` (queued calls, per
  function in due order, so one function's backlog never hides another's calls)
- `q/{p}/running/{id}`                           → `RunningEntry` (running calls)
- `q/{p}/dead/{id}`                              → b"" (the dead-letter set: dead and expired)
- `q/{p}/done/{finished:016x}/{id}`              → b"" (succeeded calls, oldest first: the
  scheduler forgets them after the retention period, and with them their idempotency key)
- `meta/partitions` (shard key `meta`)           → the partition count, as recorded by the
  first opener

Rules: no IO; records are msgspec structs stored as msgpack, by `_ENCODER` and one
decoder per record type (`_DECODER`, `_DUE`, `_RUNNING`, `_LEASE`; these are private
to the queue modules, not to this file); a call id is `{partition}-{32 hex digits}`,
and `partition_of` answers anything else with `InvalidArgument`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import msgspec

from loom.core.errors import InvalidArgument

KEYSPACE = "__functions"
QUEUE_TENANT = "functions"
PARTITIONS_DEFAULT = 16
PARTITIONS_MAX = 4096
ARGS_BYTES_MAX = 256 * 1024
NAME = r"[A-Za-z_][A-Za-z0-9_.:-]{0,127}"
IDEMPOTENCY_KEY_BYTES_MAX = 512
PAGE_MAX = 1000
# Calls per transaction: each costs one read and up to three writes, and a
# transaction reads and writes at most 1024 keys.
CALLS_PER_TXN_MAX = 200
PARTITIONS_KEY = b"meta/partitions"
META_SHARD_KEY = b"meta"


class CallState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"  # every attempt failed, or a non-retryable error: dead-lettered
    EXPIRED = "expired"  # past its deadline before it could run


class Criticality(enum.Enum):
    LOW = "low"  # may be time-shifted: waits while the cluster is busy, until its deadline nears
    NORMAL = "normal"
    HIGH = "high"


class CallRecord(msgspec.Struct, frozen=True, kw_only=True):
    call_id: str
    app: str
    function: str
    args: bytes
    args_digest: bytes
    state: CallState = CallState.QUEUED
    # Starts of the call so far; each claim adds one. Transitions name the attempt
    # they belong to, which fences out a worker that lost its lease.
    attempt: int = 0
    # Attempts that do not count against `attempts_max`: those that ended in
    # `Throttled`, and those a worker handed back unstarted.
    throttled: int = 0
    run_after_ms: int
    deadline_ms: int | None = None
    criticality: Criticality = Criticality.NORMAL
    idempotency_key: str | None = None
    created_ms: int
    attempts_max: int = 1
    backoff_ms: int = 1000
    backoff_max_ms: int = 600_000
    lease_ms: int = 0
    worker: str | None = None
    scheduler: str | None = None
    result: bytes | None = None
    error: str | None = None
    finished_ms: int | None = None

    @property
    def attempts_used(self) -> int:
        return self.attempt - self.throttled


class DueEntry(msgspec.Struct, frozen=True, array_like=True):
    deadline_ms: int | None


class RunningEntry(msgspec.Struct, frozen=True, array_like=True):
    app: str
    function: str
    attempt: int
    lease_ms: int


class PartitionLease(msgspec.Struct, frozen=True, kw_only=True):
    """Who schedules a partition. `token` grows with every new holder (the fencing
    token); `beat` grows with every renewal, so others can see the holder is alive."""

    owner: str | None = None
    token: int = 0
    beat: int = 0


@dataclass(frozen=True, slots=True)
class LeaseHold:
    partition: int
    owner: str
    token: int
    beat: int = 0


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(CallRecord)
_DUE = msgspec.msgpack.Decoder(DueEntry)
_RUNNING = msgspec.msgpack.Decoder(RunningEntry)
_LEASE = msgspec.msgpack.Decoder(PartitionLease)


def decode_due(value: bytes) -> DueEntry:
    return _DUE.decode(value)


CALL_ID = re.compile(r"(\d{1,4})-[0-9a-f]{32}")


def partition_of(call_id: str) -> int:
    match = CALL_ID.fullmatch(call_id) if isinstance(call_id, str) else None
    if match is None:
        raise InvalidArgument(f"{call_id!r} is not a call id")
    return int(match.group(1))


def shard_key(partition: int) -> bytes:
    return b"q/%d" % partition


def lease_key(partition: int) -> bytes:
    return b"q/%d/lease" % partition


def call_key(partition: int, call_id: str) -> bytes:
    return b"q/%d/call/%s" % (partition, call_id.encode())


def due_prefix(partition: int, app: str, function: str) -> bytes:
    return b"q/%d/due/%s/%s/" % (partition, app.encode(), function.encode())


def due_key(partition: int, record: CallRecord) -> bytes:
    stamp = b"%016x/" % record.run_after_ms
    return due_prefix(partition, record.app, record.function) + stamp + record.call_id.encode()


def running_prefix(partition: int) -> bytes:
    return b"q/%d/running/" % partition


def running_key(partition: int, call_id: str) -> bytes:
    return running_prefix(partition) + call_id.encode()


def done_prefix(partition: int) -> bytes:
    return b"q/%d/done/" % partition


def done_key(partition: int, finished_ms: int, call_id: str) -> bytes:
    return done_prefix(partition) + b"%016x/%s" % (finished_ms, call_id.encode())


def dead_prefix(partition: int) -> bytes:
    return b"q/%d/dead/" % partition


def dead_key(partition: int, call_id: str) -> bytes:
    return dead_prefix(partition) + call_id.encode()
