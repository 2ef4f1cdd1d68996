"""DurableQ: the functions platform's queue, stored in loom kv (DESIGN §8).

Durable, idempotent submission; the due and running indexes; the call transitions;
the partition lease records schedulers own partitions by. Every transition is one
transaction of the call's μshard, conditional on the call's attempt number, so a
paused worker that wakes after losing its lease changes nothing; the transitions a
scheduler makes (claim, reclaim, expire) also check its partition lease in the same
transaction, so a paused scheduler that lost its partition changes nothing either.

Layout — everything about one call lives in its partition's μshard
(`shard_key = q/{partition}`), so a submission is one serializable transaction and a
scheduler claims many calls of a partition in one:
- `q/{p}/lease`                                  → `PartitionLease` (who schedules p)
- `q/{p}/call/{call id}`                         → `CallRecord` (msgpack)
- `q/{p}/due/{app}/{function}/{run_after:016x}/{id}` → `DueEntry` (queued calls, per
  function in due order, so one function's backlog never hides another's calls)
- `q/{p}/running/{id}`                           → `RunningEntry` (running calls)
- `q/{p}/dead/{id}`                              → b"" (the dead-letter set: dead and expired)
- `q/{p}/done/{finished:016x}/{id}`              → b"" (succeeded calls, oldest first: the
  scheduler forgets them after the retention period, and with them their idempotency key)

A call id is `{partition}-{32 hex digits}`, so anyone holding the id finds the call.
The digits come from the idempotency key when there is one (xxh3-128 of app, function
and key), so a repeated key finds the same record: the same arguments return the
existing call; other arguments are `InvalidArgument`. Without a key they are random.
The partition is drawn among the ones the function's limits allot (`limits`), from
the same digits. The record keeps a digest of the arguments, not a second copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import msgspec
import xxhash

from loom import kv
from loom.core.errors import ConditionFailed, InvalidArgument, NotFound, PermissionDenied

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


def call_id_for(
    app: str, function: str, idempotency_key: str | None, partitions: Sequence[int]
) -> str:
    """`{partition}-{digits}`; the partition is one of `partitions`, from the digits."""
    if idempotency_key is None:
        digits = secrets.token_hex(16)
    else:
        digits = xxhash.xxh3_128_hexdigest(f"{app}\x00{function}\x00{idempotency_key}".encode())
    partition = partitions[int(digits[:8], 16) % len(partitions)]
    return f"{partition}-{digits}"


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


class StaleAttempt(InvalidArgument):
    """The call moved on (another attempt, or finished): this transition changes nothing."""


class LeaseLost(ConditionFailed):
    """The scheduler no longer holds the partition: its write changes nothing."""


def retry_delay_ms(record: CallRecord, rng_fraction: float) -> int:
    """Exponential backoff with full jitter for the attempt that just failed."""
    ceiling = min(record.backoff_max_ms, record.backoff_ms * 2 ** max(0, record.attempts_used - 1))
    return int(ceiling * rng_fraction)


@dataclass(frozen=True, slots=True)
class Submission:
    app: str
    function: str
    args: bytes
    partitions: Sequence[int]  # where this function's calls may go (`limits`)
    idempotency_key: str | None = None
    run_after_ms: int | None = None
    deadline_ms: int | None = None
    criticality: Criticality = Criticality.NORMAL
    attempts_max: int = 1
    backoff_ms: int = 1000
    backoff_max_ms: int = 600_000


@dataclass(frozen=True, slots=True)
class Submitted:
    record: CallRecord
    created: bool  # False: an earlier submission with the same idempotency key


@dataclass(frozen=True, slots=True)
class DueCall:
    call_id: str
    run_after_ms: int
    deadline_ms: int | None


@dataclass(frozen=True, slots=True)
class RunningCall:
    call_id: str
    entry: RunningEntry


# What a worker reports about one attempt.
@dataclass(frozen=True, slots=True)
class Succeeded:
    call_id: str
    attempt: int
    result: bytes


@dataclass(frozen=True, slots=True)
class Failed:
    call_id: str
    attempt: int
    error: str
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class WasThrottled:
    """The function met `Throttled` downstream: back to the queue after `retry_after_ms`,
    without using up an attempt."""

    call_id: str
    attempt: int
    retry_after_ms: int


@dataclass(frozen=True, slots=True)
class NotStarted:
    """A worker fetched the call but did not start it in time (its running slots were
    busy): back to the queue at once, without using up an attempt."""

    call_id: str
    attempt: int


Outcome = Succeeded | Failed | WasThrottled | NotStarted
_Change = Callable[[CallRecord], tuple[CallRecord, list[bytes], dict[bytes, bytes]]]


class DurableQueue:
    """DurableQ in keyspace `__functions` of a loom kv cluster."""

    def __init__(self, client: kv.Client, *, partitions: int = PARTITIONS_DEFAULT) -> None:
        if not isinstance(partitions, int) or not 1 <= partitions <= PARTITIONS_MAX:
            raise InvalidArgument(f"partitions must be 1..{PARTITIONS_MAX}")
        self.client = client
        self.partitions = partitions
        self.ks = client.keyspace(KEYSPACE)

    @classmethod
    async def open(
        cls,
        client: kv.Client,
        *,
        partitions: int = PARTITIONS_DEFAULT,
        shards: int = 2,
        replication: int = 3,
    ) -> DurableQueue:
        """The cluster's DurableQ. The first opener creates keyspace `__functions` and
        records `partitions`; everyone later (submitters, schedulers, workers, tools)
        adopts the recorded count, whatever they asked for."""
        stored = await cls.stored_partitions(client)
        if stored is None:
            cls(client, partitions=partitions)  # checks the count before creating anything
            try:
                # A tenant of its own: the nodes queue its requests apart (weighted fair
                # queuing), so the queue cannot starve the data its functions work on.
                await client.create_tenant(QUEUE_TENANT)
                tenant: str | None = QUEUE_TENANT
            except PermissionDenied:
                tenant = None  # a tenant's token: the queue is that tenant's
            await client.create_keyspace(
                KEYSPACE, shards=shards, replication=replication, tenant=tenant
            )
            ks = client.keyspace(KEYSPACE)
            with contextlib.suppress(ConditionFailed):
                await ks.put(
                    PARTITIONS_KEY, b"%d" % partitions, if_absent=True, shard_key=META_SHARD_KEY
                )
            stored = await cls.stored_partitions(client)
            assert stored is not None
        return cls(client, partitions=stored)

    @staticmethod
    async def stored_partitions(client: kv.Client) -> int | None:
        """The recorded partition count; None if no queue was ever opened here."""
        try:
            item = await client.keyspace(KEYSPACE).get(PARTITIONS_KEY, shard_key=META_SHARD_KEY)
        except NotFound:
            return None  # no keyspace `__functions` yet
        return int(item.value) if item is not None else None

    def _partition(self, call_id: str) -> int:
        partition = partition_of(call_id)
        if partition >= self.partitions:
            raise InvalidArgument(f"call id {call_id!r} names partition {partition} of none")
        return partition

    # ------------------------------------------------------------------ submission

    async def submit(self, submission: Submission) -> Submitted:
        """One call; see `submit_many`."""
        return (await self.submit_many([submission]))[0]

    async def submit_many(self, submissions: Sequence[Submission]) -> list[Submitted]:
        """Durable once it returns (QUORUM), one transaction per partition touched. A
        repeated idempotency key returns the existing call; the same key with other
        arguments is `InvalidArgument` (and nothing of this batch is lost: the calls of
        other partitions are in; retrying the batch returns them as existing)."""
        now_ms = int(time.time() * 1000)
        records = [self._record(s, now_ms) for s in submissions]
        by_partition: dict[int, list[int]] = {}
        for index, record in enumerate(records):
            by_partition.setdefault(partition_of(record.call_id), []).append(index)
        results: list[Submitted | None] = [None] * len(records)

        async def one_partition(partition: int, indexes: list[int]) -> None:
            for chunk in _chunks(indexes, CALLS_PER_TXN_MAX):
                batch = [records[i] for i in chunk]

                async def create(
                    tx: kv.Transaction, batch: list[CallRecord] = batch
                ) -> list[Submitted]:
                    return await self._create(tx, partition, batch)

                done = await self.ks.run_transaction(create, shard_key=shard_key(partition))
                for index, submitted in zip(chunk, done, strict=True):
                    results[index] = submitted

        await asyncio.gather(*(one_partition(p, ix) for p, ix in by_partition.items()))
        for submitted, record in zip(results, records, strict=True):
            assert submitted is not None
            if not submitted.created and submitted.record.args_digest != record.args_digest:
                raise InvalidArgument(
                    f"idempotency key {record.idempotency_key!r} was used for call "
                    f"{submitted.record.call_id} with other arguments"
                )
        return [s for s in results if s is not None]

    def _record(self, s: Submission, now_ms: int) -> CallRecord:
        _check_submission(s, self.partitions)
        call_id = call_id_for(s.app, s.function, s.idempotency_key, s.partitions)
        return CallRecord(
            call_id=call_id,
            app=s.app,
            function=s.function,
            args=s.args,
            args_digest=hashlib.blake2b(s.args, digest_size=16).digest(),
            run_after_ms=s.run_after_ms if s.run_after_ms is not None else now_ms,
            deadline_ms=s.deadline_ms,
            criticality=s.criticality,
            idempotency_key=s.idempotency_key,
            created_ms=now_ms,
            attempts_max=s.attempts_max,
            backoff_ms=s.backoff_ms,
            backoff_max_ms=s.backoff_max_ms,
        )

    @staticmethod
    async def _create(
        tx: kv.Transaction, partition: int, records: list[CallRecord]
    ) -> list[Submitted]:
        # Only a call with an idempotency key can exist already: a random id is new.
        keyed = [r for r in records if r.idempotency_key is not None]
        items = await asyncio.gather(*(tx.get(call_key(partition, r.call_id)) for r in keyed))
        existing_of = {r.call_id: item for r, item in zip(keyed, items, strict=True)}
        done = []
        for record in records:
            existing = existing_of.get(record.call_id)
            if existing is not None:
                done.append(Submitted(record=_DECODER.decode(existing.value), created=False))
                continue
            await tx.put(call_key(partition, record.call_id), _ENCODER.encode(record))
            await tx.put(due_key(partition, record), _ENCODER.encode(DueEntry(record.deadline_ms)))
            done.append(Submitted(record=record, created=True))
        return done

    # --------------------------------------------------------------------- lookups

    async def get(self, call_id: str) -> CallRecord | None:
        partition = self._partition(call_id)
        item = await self.ks.get(call_key(partition, call_id), shard_key=shard_key(partition))
        return _DECODER.decode(item.value) if item is not None else None

    async def due(
        self, partition: int, app: str, function: str, now_ms: int, *, limit: int = 100
    ) -> list[DueCall]:
        """Queued calls of one function in `partition`, due at `now_ms`, earliest first."""
        self._check_page(partition, limit)
        prefix = due_prefix(partition, app, function)
        page = await self.ks.scan(shard_key=shard_key(partition), prefix=prefix, limit=limit)
        calls = []
        for item in page.items:
            stamp, _, call_id = item.key[len(prefix) :].partition(b"/")
            if int(stamp, 16) > now_ms:
                break
            calls.append(
                DueCall(call_id.decode(), int(stamp, 16), _DUE.decode(item.value).deadline_ms)
            )
        return calls

    async def running(self, partition: int) -> list[RunningCall]:
        """Every running call of `partition` (bounded: a partition runs at most what its
        scheduler dispatched, paged through here)."""
        return [
            RunningCall(key[len(running_prefix(partition)) :].decode(), _RUNNING.decode(value))
            for key, value in await self._scan_all(partition, running_prefix(partition))
        ]

    async def _scan_all(self, partition: int, prefix: bytes) -> list[tuple[bytes, bytes]]:
        found: list[tuple[bytes, bytes]] = []
        cursor: bytes | None = None
        while True:
            page = await self.ks.scan(
                shard_key=shard_key(partition), prefix=prefix, limit=PAGE_MAX, cursor=cursor
            )
            found += [(item.key, item.value) for item in page.items]
            cursor = page.cursor
            if cursor is None:
                return found

    async def records(self, partition: int) -> AsyncIterator[CallRecord]:
        """Every call record of `partition`, page by page, in call-id order."""
        prefix = b"q/%d/call/" % partition
        cursor: bytes | None = None
        while True:
            page = await self.ks.scan(
                shard_key=shard_key(partition), prefix=prefix, limit=PAGE_MAX, cursor=cursor
            )
            for item in page.items:
                yield _DECODER.decode(item.value)
            cursor = page.cursor
            if cursor is None:
                return

    async def pending(self) -> bool:
        """Whether any call is queued or running. Per partition, one scan from the due
        index through the lease record to the running index: one read, so a call that
        moves from one index to the other (a reclaim, a retry) is not missed between
        two scans. (A page cut short by a long run of tombstones goes on in another
        read; a caller that must be sure asks twice.)"""
        for partition in range(self.partitions):
            due, running = b"q/%d/due/" % partition, running_prefix(partition)
            cursor: bytes | None = due
            while cursor is not None:
                page = await self.ks.scan(
                    shard_key=shard_key(partition), prefix=b"q/%d/" % partition,
                    cursor=cursor, limit=2,
                )  # fmt: skip
                if any(i.key.startswith((due, running)) for i in page.items):
                    return True
                cursor = page.cursor  # only the lease record, or tombstones, so far
        return False

    def _check_page(self, partition: int, limit: int) -> None:
        if not 0 <= partition < self.partitions or not 1 <= limit <= PAGE_MAX:
            raise InvalidArgument("partition or limit out of range")

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
                    limit=min(PAGE_MAX, limit - len(ids)),
                    cursor=cursor,
                )
                ids += [item.key[len(prefix) :].decode() for item in page.items]
                cursor = page.cursor
                if cursor is None:
                    break
        return ids[:limit]

    # ---------------------------------------------------------- partition leases

    async def lease(self, partition: int) -> PartitionLease:
        item = await self.ks.get(lease_key(partition), shard_key=shard_key(partition))
        return _LEASE.decode(item.value) if item is not None else PartitionLease()

    async def acquire(self, partition: int, owner: str, seen: PartitionLease) -> LeaseHold:
        """Takes the partition if its lease record is still `seen` (which the caller
        watched go unrenewed for a lease period on its own clock, or was free)."""

        async def take(tx: kv.Transaction) -> LeaseHold:
            current = await self._read_lease(tx, partition)
            if current != seen:
                raise LeaseLost(f"partition {partition} lease changed")
            token = current.token + 1
            await tx.put(
                lease_key(partition), _ENCODER.encode(PartitionLease(owner=owner, token=token))
            )
            return LeaseHold(partition, owner, token)

        return await self.ks.run_transaction(take, shard_key=shard_key(partition))

    async def renew(self, hold: LeaseHold) -> LeaseHold:
        """Raises the beat: one conditional write on the record as the holder last wrote
        it (nobody else writes a held record but a taker, whose write fails this one)."""
        mine = PartitionLease(owner=hold.owner, token=hold.token, beat=hold.beat)
        renewed = msgspec.structs.replace(mine, beat=hold.beat + 1)
        try:
            await self.ks.put(
                lease_key(hold.partition),
                _ENCODER.encode(renewed),
                if_value=_ENCODER.encode(mine),
                shard_key=shard_key(hold.partition),
            )
        except ConditionFailed:
            current = await self.lease(hold.partition)  # an earlier renewal's lost answer?
            if current.owner != hold.owner or current.token != hold.token:
                raise LeaseLost(
                    f"partition {hold.partition} is no longer held by {hold.owner}"
                ) from None
            return dataclasses.replace(hold, beat=current.beat)
        return dataclasses.replace(hold, beat=renewed.beat)

    async def release(self, hold: LeaseHold) -> None:
        async def free(tx: kv.Transaction) -> None:
            current = await self._check_lease(tx, hold)
            released = PartitionLease(owner=None, token=current.token, beat=current.beat + 1)
            await tx.put(lease_key(hold.partition), _ENCODER.encode(released))

        await self.ks.run_transaction(free, shard_key=shard_key(hold.partition))

    @staticmethod
    async def _read_lease(tx: kv.Transaction, partition: int) -> PartitionLease:
        item = await tx.get(lease_key(partition))
        return _LEASE.decode(item.value) if item is not None else PartitionLease()

    async def _check_lease(self, tx: kv.Transaction, hold: LeaseHold) -> PartitionLease:
        return _check_held(await tx.get(lease_key(hold.partition)), hold)

    # ------------------------------------------------------------------ transitions

    async def _transition_many(
        self,
        partition: int,
        changes: list[tuple[str, _Change]],
        *,
        hold: LeaseHold | None = None,
    ) -> list[CallRecord | StaleAttempt]:
        """Reads each call and writes its change's new record and index entries, all
        in one transaction of the partition's μshard (checking `hold` first, if given).
        A change that refuses leaves its call alone: its slot holds the `StaleAttempt`."""
        assert len(changes) <= CALLS_PER_TXN_MAX

        async def apply(tx: kv.Transaction) -> list[CallRecord | StaleAttempt]:
            # The lease and the calls in one request.
            keys = [call_key(partition, call_id) for call_id, _ in changes]
            if hold is None:
                items = await tx.get_many(keys)
            else:
                lease, *items = await tx.get_many([lease_key(partition), *keys])
                _check_held(lease, hold)
            done: list[CallRecord | StaleAttempt] = []
            for (call_id, change), item in zip(changes, items, strict=True):
                if item is None:
                    done.append(StaleAttempt(f"no call {call_id}"))
                    continue
                try:
                    new, drop, add = change(_DECODER.decode(item.value))
                except StaleAttempt as refused:
                    done.append(refused)
                    continue
                for key in drop:
                    await tx.delete(key)
                for key, value in add.items():
                    await tx.put(key, value)
                await tx.put(call_key(partition, call_id), _ENCODER.encode(new))
                done.append(new)
            return done

        return await self.ks.run_transaction(apply, shard_key=shard_key(partition))

    async def _transition(
        self, call_id: str, change: _Change, *, hold: LeaseHold | None = None
    ) -> CallRecord:
        partition = self._partition(call_id)
        if hold is not None and hold.partition != partition:
            raise InvalidArgument(f"call {call_id} is not in partition {hold.partition}")
        (done,) = await self._transition_many(partition, [(call_id, change)], hold=hold)
        if isinstance(done, StaleAttempt):
            if str(done).startswith("no call"):
                raise NotFound(str(done))
            raise done
        return done

    async def claim_many(
        self, hold: LeaseHold, claims: Sequence[tuple[str, int]], *, scheduler: str, now_ms: int
    ) -> list[CallRecord | StaleAttempt]:
        """Due QUEUED calls of the held partition → RUNNING, as their next attempt,
        each with a lease of the given ms (the scheduler reclaims it after that long)."""
        return await self._transition_many(
            hold.partition,
            [
                (call_id, _claim(hold.partition, lease_ms, scheduler, now_ms))
                for call_id, lease_ms in claims
            ],
            hold=hold,
        )

    async def claim(
        self, hold: LeaseHold, call_id: str, *, lease_ms: int, now_ms: int
    ) -> CallRecord:
        return await self._transition(
            call_id, _claim(hold.partition, lease_ms, hold.owner, now_ms), hold=hold
        )

    async def reclaim(
        self, hold: LeaseHold, call_id: str, *, attempt: int, now_ms: int
    ) -> CallRecord:
        """A RUNNING call whose lease the scheduler saw end (on its own clock) goes back
        to the queue (at-least-once); the attempt it was in can no longer finish it. An
        attempt whose lease ended is used up: after the last, the call is dead (a call
        that kills its worker every time must not run forever)."""

        def change(record: CallRecord) -> tuple[CallRecord, list[bytes], dict[bytes, bytes]]:
            _require_running(record, attempt)
            drop = [running_key(hold.partition, record.call_id)]
            if record.attempts_used >= record.attempts_max:
                dead = msgspec.structs.replace(
                    record,
                    state=CallState.DEAD,
                    error=f"lease expired on attempt {record.attempt}, the last",
                    finished_ms=now_ms,
                )
                return dead, drop, {dead_key(hold.partition, record.call_id): b""}
            new = msgspec.structs.replace(
                record, state=CallState.QUEUED, run_after_ms=now_ms, error="lease expired"
            )
            return new, drop, _due(hold.partition, new)

        return await self._transition(call_id, change, hold=hold)

    async def expire(self, hold: LeaseHold, call_id: str, *, now_ms: int) -> CallRecord:
        """A queued call past its deadline becomes EXPIRED: visible in the dead-letter
        set and replayable, never silently dropped."""

        def change(record: CallRecord) -> tuple[CallRecord, list[bytes], dict[bytes, bytes]]:
            deadline = record.deadline_ms
            if record.state is not CallState.QUEUED or deadline is None or deadline > now_ms:
                raise StaleAttempt(f"call {call_id} is {record.state.value}, not past a deadline")
            new = msgspec.structs.replace(
                record, state=CallState.EXPIRED, error="deadline passed", finished_ms=now_ms
            )
            drop = [due_key(hold.partition, record)]
            return new, drop, {dead_key(hold.partition, call_id): b""}

        return await self._transition(call_id, change, hold=hold)

    async def forget_done(self, hold: LeaseHold, *, before_ms: int, limit: int = 100) -> int:
        """Deletes up to `limit` calls of the held partition that succeeded before
        `before_ms` (record and index entry; their idempotency keys are free again).
        Returns how many."""
        prefix = done_prefix(hold.partition)
        page = await self.ks.scan(shard_key=shard_key(hold.partition), prefix=prefix, limit=limit)
        old = []
        for item in page.items:
            stamp, _, call_id = item.key[len(prefix) :].partition(b"/")
            if int(stamp, 16) >= before_ms:
                break
            old.append((item.key, call_key(hold.partition, call_id.decode())))
        if not old:
            return 0

        async def forget(tx: kv.Transaction) -> None:
            await self._check_lease(tx, hold)
            for index_key, record_key in old:
                await tx.delete(index_key)
                await tx.delete(record_key)

        await self.ks.run_transaction(forget, shard_key=shard_key(hold.partition))
        return len(old)

    async def finish_many(
        self,
        partition: int,
        outcomes: Sequence[Outcome],
        *,
        now_ms: int,
        jitter: Callable[[], float],
    ) -> list[CallRecord | StaleAttempt]:
        """What workers report, one transaction for many calls of one partition: each
        outcome applies only to the attempt it names."""
        return await self._transition_many(
            partition, [(o.call_id, _finish(partition, o, now_ms, jitter)) for o in outcomes]
        )

    async def complete(self, call_id: str, *, attempt: int, result: bytes) -> CallRecord:
        """RUNNING in `attempt` → SUCCEEDED; a later or earlier attempt changes nothing."""
        now_ms = int(time.time() * 1000)
        outcome = Succeeded(call_id, attempt, result)
        return await self._transition(
            call_id, _finish(self._partition(call_id), outcome, now_ms, lambda: 0.0)
        )

    async def fail(
        self,
        call_id: str,
        *,
        attempt: int,
        error: str,
        now_ms: int,
        jitter: float,
        retryable: bool = True,
    ) -> CallRecord:
        """RUNNING in `attempt` → QUEUED after a backoff, or DEAD after the last attempt."""
        outcome = Failed(call_id, attempt, error, retryable)
        return await self._transition(
            call_id, _finish(self._partition(call_id), outcome, now_ms, lambda: jitter)
        )

    async def replay(self, call_id: str, *, now_ms: int) -> CallRecord:
        """A dead-lettered or expired call goes back to the queue with a fresh set of
        attempts (and no deadline: the one it had has passed)."""
        partition = self._partition(call_id)

        def change(record: CallRecord) -> tuple[CallRecord, list[bytes], dict[bytes, bytes]]:
            if record.state not in (CallState.DEAD, CallState.EXPIRED):
                raise StaleAttempt(f"call {call_id} is {record.state.value}, not dead")
            new = msgspec.structs.replace(
                record,
                state=CallState.QUEUED,
                run_after_ms=now_ms,
                deadline_ms=None,
                attempts_max=record.attempts_used + record.attempts_max,
                finished_ms=None,
            )
            return new, [dead_key(partition, call_id)], _due(partition, new)

        return await self._transition(call_id, change)


def _check_held(item: kv.Item | None, hold: LeaseHold) -> PartitionLease:
    """The partition's lease as read, if `hold` still holds it; else `LeaseLost`."""
    current = _LEASE.decode(item.value) if item is not None else PartitionLease()
    if current.owner != hold.owner or current.token != hold.token:
        raise LeaseLost(f"partition {hold.partition} is no longer held by {hold.owner}")
    return current


def _due(partition: int, record: CallRecord) -> dict[bytes, bytes]:
    return {due_key(partition, record): _ENCODER.encode(DueEntry(record.deadline_ms))}


def _claim(partition: int, lease_ms: int, scheduler: str, now_ms: int) -> _Change:
    def change(record: CallRecord) -> tuple[CallRecord, list[bytes], dict[bytes, bytes]]:
        if record.state is not CallState.QUEUED or record.run_after_ms > now_ms:
            raise StaleAttempt(f"call {record.call_id} is {record.state.value}, not due")
        new = msgspec.structs.replace(
            record,
            state=CallState.RUNNING,
            attempt=record.attempt + 1,
            lease_ms=lease_ms,
            scheduler=scheduler,
        )
        entry = RunningEntry(record.app, record.function, new.attempt, lease_ms)
        add = {running_key(partition, record.call_id): _ENCODER.encode(entry)}
        return new, [due_key(partition, record)], add

    return change


def _finish(partition: int, outcome: Outcome, now_ms: int, jitter: Callable[[], float]) -> _Change:
    def change(record: CallRecord) -> tuple[CallRecord, list[bytes], dict[bytes, bytes]]:
        _require_running(record, outcome.attempt)
        drop = [running_key(partition, record.call_id)]
        match outcome:
            case Succeeded(result=result):
                new = msgspec.structs.replace(
                    record, state=CallState.SUCCEEDED, result=result, finished_ms=now_ms
                )
                return new, drop, {done_key(partition, now_ms, record.call_id): b""}
            case WasThrottled(retry_after_ms=retry_after_ms):
                new = msgspec.structs.replace(
                    record,
                    state=CallState.QUEUED,
                    throttled=record.throttled + 1,
                    run_after_ms=now_ms + retry_after_ms,
                    error="throttled downstream",
                )
                return new, drop, _due(partition, new)
            case NotStarted():
                new = msgspec.structs.replace(
                    record, state=CallState.QUEUED, throttled=record.throttled + 1
                )
                return new, drop, _due(partition, new)
            case Failed(error=error, retryable=retryable):
                if not retryable or record.attempts_used >= record.attempts_max:
                    dead = msgspec.structs.replace(
                        record, state=CallState.DEAD, error=error, finished_ms=now_ms
                    )
                    return dead, drop, {dead_key(partition, record.call_id): b""}
                run_after = now_ms + retry_delay_ms(record, jitter())
                new = msgspec.structs.replace(
                    record, state=CallState.QUEUED, run_after_ms=run_after, error=error
                )
                return new, drop, _due(partition, new)

    return change


def _require_running(record: CallRecord, attempt: int) -> None:
    if record.state is not CallState.RUNNING or record.attempt != attempt:
        raise StaleAttempt(
            f"call {record.call_id} is {record.state.value} in attempt {record.attempt}, "
            f"not running in attempt {attempt}"
        )


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _check_submission(s: Submission, partitions: int) -> None:
    for label, name in (("app", s.app), ("function", s.function)):
        if not isinstance(name, str) or not re.fullmatch(NAME, name):
            raise InvalidArgument(f"{label} name {name!r} is not a valid name")
    if not isinstance(s.args, bytes) or len(s.args) > ARGS_BYTES_MAX:
        raise InvalidArgument(f"args must be bytes of at most {ARGS_BYTES_MAX}")
    if s.idempotency_key is not None and (
        not isinstance(s.idempotency_key, str)
        or not 1 <= len(s.idempotency_key.encode()) <= IDEMPOTENCY_KEY_BYTES_MAX
    ):
        raise InvalidArgument(f"idempotency_key must be 1..{IDEMPOTENCY_KEY_BYTES_MAX} bytes")
    for label, value in (("run_after_ms", s.run_after_ms), ("deadline_ms", s.deadline_ms)):
        if value is not None and (not isinstance(value, int) or not 0 <= value < 2**63):
            raise InvalidArgument(f"{label} must be a wall-clock time in ms")
    if s.run_after_ms is not None and s.deadline_ms is not None and s.deadline_ms < s.run_after_ms:
        raise InvalidArgument("deadline_ms is before run_after_ms")
    if not s.partitions or not all(0 <= p < partitions for p in s.partitions):
        raise InvalidArgument(f"partitions must be a non-empty subset of 0..{partitions - 1}")
    if not 1 <= s.attempts_max <= 1000 or not 0 < s.backoff_ms <= s.backoff_max_ms:
        raise InvalidArgument("need 1 <= attempts_max <= 1000 and 0 < backoff_ms <= backoff_max_ms")
