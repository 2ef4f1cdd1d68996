"""DurableQ: the functions platform's queue, stored in loom kv (DESIGN §8).

Here so far: durable, idempotent submission; the due index; and the call transitions a
worker makes (claim with a lease, complete, fail with backoff or dead-letter, reclaim
after a lease expires), each one transaction conditional on the call's attempt number,
so a paused worker that wakes after losing its lease changes nothing. Not yet here:
scheduler partitions and their leases, rate limits, the `App` API, worker processes.

Layout — everything about one call lives in one μshard, so a submission is one
serializable transaction. The μshard is that of the call's partition,
`shard_key = q/{partition}`, with `partition = hash(call id) % partitions`:
- `q/{p}/call/{call id}`                 → `CallRecord` (msgpack)
- `q/{p}/due/{run_after_ms:016x}/{id}`   → b"" (queued calls in due order)
- `q/{p}/running/{lease_until:016x}/{id}` → b"" (running calls by lease end)
- `q/{p}/dead/{id}`                      → b"" (the dead-letter set: dead and expired)

A call's id is derived from its idempotency key when there is one (xxh3-128 of app,
function and key), so a repeated key finds the same record: the same arguments return
the existing call; other arguments are `InvalidArgument`. Without a key the id is
random. The record keeps a digest of the arguments, not a second copy.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import xxhash

from loom import kv
from loom.core.errors import ConditionFailed, InvalidArgument, NotFound

KEYSPACE = "__functions"
PARTITIONS_DEFAULT = 64
ARGS_BYTES_MAX = 256 * 1024
NAME = r"[A-Za-z_][A-Za-z0-9_.:-]{0,127}"
IDEMPOTENCY_KEY_BYTES_MAX = 512
DUE_PAGE_MAX = 1000
PARTITIONS_KEY = b"meta/partitions"


class CallState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"  # every attempt failed: in the dead-letter set
    EXPIRED = "expired"  # past its deadline before it could run


class Criticality(enum.Enum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"


class CallRecord(msgspec.Struct, frozen=True, kw_only=True):
    call_id: str
    app: str
    function: str
    args: bytes
    args_digest: bytes
    state: CallState = CallState.QUEUED
    attempt: int = 0
    run_after_ms: int
    deadline_ms: int | None = None
    criticality: Criticality = Criticality.NORMAL
    idempotency_key: str | None = None
    created_ms: int
    attempts_max: int = 1
    backoff_ms: int = 1000
    backoff_max_ms: int = 600_000
    lease_until_ms: int = 0
    worker: str | None = None
    result: bytes | None = None
    error: str | None = None


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(CallRecord)


def call_id_for(app: str, function: str, idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return secrets.token_hex(16)
    name = f"{app}\x00{function}\x00{idempotency_key}".encode()
    return xxhash.xxh3_128_hexdigest(name)


def partition_of(call_id: str, partitions: int) -> int:
    return xxhash.xxh3_64_intdigest(call_id.encode()) % partitions


def shard_key(partition: int) -> bytes:
    return b"q/%d" % partition


def call_key(partition: int, call_id: str) -> bytes:
    return b"q/%d/call/%s" % (partition, call_id.encode())


def due_prefix(partition: int) -> bytes:
    return b"q/%d/due/" % partition


def due_key(partition: int, run_after_ms: int, call_id: str) -> bytes:
    return due_prefix(partition) + b"%016x/%s" % (run_after_ms, call_id.encode())


def running_prefix(partition: int) -> bytes:
    return b"q/%d/running/" % partition


def running_key(partition: int, lease_until_ms: int, call_id: str) -> bytes:
    return running_prefix(partition) + b"%016x/%s" % (lease_until_ms, call_id.encode())


def dead_prefix(partition: int) -> bytes:
    return b"q/%d/dead/" % partition


def dead_key(partition: int, call_id: str) -> bytes:
    return dead_prefix(partition) + call_id.encode()


class StaleAttempt(InvalidArgument):
    """The call moved on (another attempt, or finished): this transition changes nothing."""


def retry_delay_ms(record: CallRecord, rng_fraction: float) -> int:
    """Exponential backoff with full jitter for the attempt that just failed."""
    ceiling = min(record.backoff_max_ms, record.backoff_ms * 2 ** max(0, record.attempt - 1))
    return int(ceiling * rng_fraction)


@dataclass(frozen=True, slots=True)
class Submitted:
    record: CallRecord
    created: bool  # False: an earlier submission with the same idempotency key


class DurableQueue:
    """Submission and lookup of calls in keyspace `__functions` of a loom kv cluster."""

    def __init__(self, client: kv.Client, *, partitions: int = PARTITIONS_DEFAULT) -> None:
        if not 1 <= partitions <= 4096:
            raise InvalidArgument("partitions must be 1..4096")
        self.client = client
        self.partitions = partitions
        self.ks = client.keyspace(KEYSPACE)

    async def ensure_keyspace(self, *, shards: int = 2, replication: int = 3) -> None:
        """Creates `__functions` if it does not exist (idempotent), and records the
        partition count, which every submitter, worker and tool must share."""
        await self.client.create_keyspace(KEYSPACE, shards=shards, replication=replication)
        stored = await self.stored_partitions(self.client)
        if stored is None:
            try:
                await self.ks.put(PARTITIONS_KEY, b"%d" % self.partitions, if_absent=True)
            except ConditionFailed:
                stored = await self.stored_partitions(self.client)
        if stored is not None and stored != self.partitions:
            raise InvalidArgument(
                f"DurableQ has {stored} partitions in this cluster, not {self.partitions}"
            )

    @staticmethod
    async def stored_partitions(client: kv.Client) -> int | None:
        item = await client.keyspace(KEYSPACE).get(PARTITIONS_KEY)
        return int(item.value) if item is not None else None

    async def submit(
        self,
        app: str,
        function: str,
        args: bytes,
        *,
        idempotency_key: str | None = None,
        run_after_ms: int | None = None,
        deadline_ms: int | None = None,
        criticality: Criticality = Criticality.NORMAL,
        attempts_max: int = 1,
        backoff_ms: int = 1000,
        backoff_max_ms: int = 600_000,
    ) -> Submitted:
        """Durable once it returns (QUORUM). A repeated idempotency key returns the
        existing call; the same key with other arguments is `InvalidArgument`."""
        _check_submission(
            app,
            function,
            args,
            idempotency_key=idempotency_key,
            run_after_ms=run_after_ms,
            deadline_ms=deadline_ms,
        )
        now_ms = int(time.time() * 1000)
        call_id = call_id_for(app, function, idempotency_key)
        partition = partition_of(call_id, self.partitions)
        record = CallRecord(
            call_id=call_id,
            app=app,
            function=function,
            args=args,
            args_digest=hashlib.blake2b(args, digest_size=16).digest(),
            run_after_ms=run_after_ms if run_after_ms is not None else now_ms,
            deadline_ms=deadline_ms,
            criticality=criticality,
            idempotency_key=idempotency_key,
            created_ms=now_ms,
            attempts_max=attempts_max,
            backoff_ms=backoff_ms,
            backoff_max_ms=backoff_max_ms,
        )

        async def create(tx: kv.Transaction) -> Submitted:
            existing = await tx.get(call_key(partition, call_id))
            if existing is not None:
                return Submitted(record=_DECODER.decode(existing.value), created=False)
            await tx.put(call_key(partition, call_id), _ENCODER.encode(record))
            await tx.put(due_key(partition, record.run_after_ms, call_id), b"")
            return Submitted(record=record, created=True)

        submitted = await self.ks.run_transaction(create, shard_key=shard_key(partition))
        if not submitted.created and submitted.record.args_digest != record.args_digest:
            raise InvalidArgument(
                f"idempotency key {idempotency_key!r} was used for call "
                f"{submitted.record.call_id} with other arguments"
            )
        return submitted

    async def get(self, call_id: str) -> CallRecord | None:
        partition = partition_of(call_id, self.partitions)
        item = await self.ks.get(call_key(partition, call_id), shard_key=shard_key(partition))
        return _DECODER.decode(item.value) if item is not None else None

    async def due(self, partition: int, now_ms: int, *, limit: int = 100) -> list[str]:
        """Ids of queued calls of `partition` due at `now_ms`, earliest first."""
        return await self._index(partition, due_prefix(partition), now_ms, limit)

    async def expired_leases(self, partition: int, now_ms: int, *, limit: int = 100) -> list[str]:
        """Ids of running calls of `partition` whose lease ended by `now_ms`."""
        return await self._index(partition, running_prefix(partition), now_ms, limit)

    async def _index(self, partition: int, prefix: bytes, until_ms: int, limit: int) -> list[str]:
        if not 0 <= partition < self.partitions or not 1 <= limit <= DUE_PAGE_MAX:
            raise InvalidArgument("partition or limit out of range")
        page = await self.ks.scan(shard_key=shard_key(partition), prefix=prefix, limit=limit)
        ids = []
        for item in page.items:
            stamp, _, call_id = item.key[len(prefix) :].partition(b"/")
            if int(stamp, 16) > until_ms:
                break
            ids.append(call_id.decode())
        return ids

    async def dead_letters(self, *, limit: int = 1000) -> list[str]:
        """Ids of dead-lettered calls, partition by partition (at most `limit`)."""
        ids: list[str] = []
        for partition in range(self.partitions):
            prefix = dead_prefix(partition)
            cursor: bytes | None = None
            while len(ids) < limit:
                page = await self.ks.scan(
                    shard_key=shard_key(partition),
                    prefix=prefix,
                    limit=min(DUE_PAGE_MAX, limit - len(ids)),
                    cursor=cursor,
                )
                ids += [item.key[len(prefix) :].decode() for item in page.items]
                cursor = page.cursor
                if cursor is None:
                    break
        return ids[:limit]

    async def replay(self, call_id: str, *, now_ms: int) -> CallRecord:
        """A dead-lettered or expired call goes back to the queue with a fresh set of
        attempts (and no deadline: the one it had has passed)."""
        partition = partition_of(call_id, self.partitions)

        def change(record: CallRecord) -> tuple[CallRecord, list[bytes], list[bytes]]:
            if record.state not in (CallState.DEAD, CallState.EXPIRED):
                raise StaleAttempt(f"call {call_id} is {record.state.value}, not dead")
            new = msgspec.structs.replace(
                record,
                state=CallState.QUEUED,
                run_after_ms=now_ms,
                deadline_ms=None,
                attempts_max=record.attempt + record.attempts_max,
            )
            return new, [dead_key(partition, call_id)], [due_key(partition, now_ms, call_id)]

        return await self._transition(call_id, change)

    # ---------------------------------------------------------------- transitions

    async def _transition(self, call_id: str, change: _Change) -> CallRecord:
        """Reads the call and writes `change`'s new record and index entries in one
        transaction of the call's μshard; `StaleAttempt` if `change` refuses."""
        partition = partition_of(call_id, self.partitions)

        async def apply(tx: kv.Transaction) -> CallRecord:
            item = await tx.get(call_key(partition, call_id))
            if item is None:
                raise NotFound(f"no call {call_id}")
            record = _DECODER.decode(item.value)
            new, drop, add = change(record)
            for key in drop:
                await tx.delete(key)
            for key in add:
                await tx.put(key, b"")
            await tx.put(call_key(partition, call_id), _ENCODER.encode(new))
            return new

        return await self.ks.run_transaction(apply, shard_key=shard_key(partition))

    async def claim(self, call_id: str, *, worker: str, lease_ms: int, now_ms: int) -> CallRecord:
        """QUEUED and due → RUNNING under a lease, as the next attempt."""
        partition = partition_of(call_id, self.partitions)

        def change(record: CallRecord) -> tuple[CallRecord, list[bytes], list[bytes]]:
            if record.state is not CallState.QUEUED or record.run_after_ms > now_ms:
                raise StaleAttempt(f"call {call_id} is {record.state.value}, not due")
            lease_until = now_ms + lease_ms
            new = msgspec.structs.replace(
                record,
                state=CallState.RUNNING,
                attempt=record.attempt + 1,
                lease_until_ms=lease_until,
                worker=worker,
            )
            drop = [due_key(partition, record.run_after_ms, call_id)]
            return new, drop, [running_key(partition, lease_until, call_id)]

        return await self._transition(call_id, change)

    async def expire(self, call_id: str, *, now_ms: int) -> CallRecord:
        """A queued call past its deadline becomes EXPIRED: visible in the dead-letter
        set and replayable, never silently dropped."""
        partition = partition_of(call_id, self.partitions)

        def change(record: CallRecord) -> tuple[CallRecord, list[bytes], list[bytes]]:
            deadline = record.deadline_ms
            if record.state is not CallState.QUEUED or deadline is None or deadline > now_ms:
                raise StaleAttempt(f"call {call_id} is {record.state.value}, not past a deadline")
            new = msgspec.structs.replace(record, state=CallState.EXPIRED, error="deadline passed")
            drop = [due_key(partition, record.run_after_ms, call_id)]
            return new, drop, [dead_key(partition, call_id)]

        return await self._transition(call_id, change)

    async def complete(self, call_id: str, *, attempt: int, result: bytes) -> CallRecord:
        """RUNNING in `attempt` → SUCCEEDED; a later or earlier attempt changes nothing."""
        partition = partition_of(call_id, self.partitions)

        def change(record: CallRecord) -> tuple[CallRecord, list[bytes], list[bytes]]:
            _require_running(record, attempt)
            new = msgspec.structs.replace(record, state=CallState.SUCCEEDED, result=result)
            return new, [running_key(partition, record.lease_until_ms, call_id)], []

        return await self._transition(call_id, change)

    async def fail(
        self, call_id: str, *, attempt: int, error: str, now_ms: int, jitter: float
    ) -> CallRecord:
        """RUNNING in `attempt` → QUEUED after a backoff, or DEAD after the last attempt."""
        partition = partition_of(call_id, self.partitions)

        def change(record: CallRecord) -> tuple[CallRecord, list[bytes], list[bytes]]:
            _require_running(record, attempt)
            drop = [running_key(partition, record.lease_until_ms, call_id)]
            if record.attempt >= record.attempts_max:
                dead = msgspec.structs.replace(record, state=CallState.DEAD, error=error)
                return dead, drop, [dead_key(partition, call_id)]
            run_after = now_ms + retry_delay_ms(record, jitter)
            new = msgspec.structs.replace(
                record, state=CallState.QUEUED, run_after_ms=run_after, error=error
            )
            return new, drop, [due_key(partition, run_after, call_id)]

        return await self._transition(call_id, change)

    async def reclaim(self, call_id: str, *, now_ms: int) -> CallRecord:
        """A RUNNING call whose lease ended goes back to the queue (at-least-once); the
        attempt it was in can no longer complete it."""
        partition = partition_of(call_id, self.partitions)

        def change(record: CallRecord) -> tuple[CallRecord, list[bytes], list[bytes]]:
            if record.state is not CallState.RUNNING or record.lease_until_ms > now_ms:
                raise StaleAttempt(f"call {call_id} holds a live lease or is not running")
            drop = [running_key(partition, record.lease_until_ms, call_id)]
            new = msgspec.structs.replace(record, state=CallState.QUEUED, run_after_ms=now_ms)
            return new, drop, [due_key(partition, now_ms, call_id)]

        return await self._transition(call_id, change)


_Change = Callable[[CallRecord], tuple[CallRecord, list[bytes], list[bytes]]]


def _require_running(record: CallRecord, attempt: int) -> None:
    if record.state is not CallState.RUNNING or record.attempt != attempt:
        raise StaleAttempt(
            f"call {record.call_id} is {record.state.value} in attempt {record.attempt}, "
            f"not running in attempt {attempt}"
        )


def _check_submission(
    app: str,
    function: str,
    args: bytes,
    *,
    idempotency_key: str | None,
    run_after_ms: int | None,
    deadline_ms: int | None,
) -> None:
    for label, name in (("app", app), ("function", function)):
        if not isinstance(name, str) or not re.fullmatch(NAME, name):
            raise InvalidArgument(f"{label} name {name!r} is not a valid name")
    if not isinstance(args, bytes) or len(args) > ARGS_BYTES_MAX:
        raise InvalidArgument(f"args must be bytes of at most {ARGS_BYTES_MAX}")
    if idempotency_key is not None and (
        not isinstance(idempotency_key, str)
        or not 1 <= len(idempotency_key.encode()) <= IDEMPOTENCY_KEY_BYTES_MAX
    ):
        raise InvalidArgument(f"idempotency_key must be 1..{IDEMPOTENCY_KEY_BYTES_MAX} bytes")
    for label, value in (("run_after_ms", run_after_ms), ("deadline_ms", deadline_ms)):
        if value is not None and (not isinstance(value, int) or not 0 <= value < 2**63):
            raise InvalidArgument(f"{label} must be a wall-clock time in ms")
    if run_after_ms is not None and deadline_ms is not None and deadline_ms < run_after_ms:
        raise InvalidArgument("deadline_ms is before run_after_ms")
