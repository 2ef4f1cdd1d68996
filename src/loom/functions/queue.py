"""DurableQ: the functions platform's queue, stored in loom kv (DESIGN §8).

Durable, idempotent submission; the due and running indexes; the call transitions;
the partition lease records schedulers own partitions by. Every transition is one
transaction of the call's μshard, conditional on the call's attempt number, so a
paused worker that wakes after losing its lease changes nothing; the transitions a
scheduler makes (claim, reclaim, expire) also check its partition lease in the same
transaction, so a paused scheduler that lost its partition changes nothing either.

A call id is `{partition}-{32 hex digits}`, so anyone holding the id finds the call.
The digits come from the idempotency key when there is one (xxh3-128 of app, function
and key), so a repeated key finds the same record: the same arguments return the
existing call; other arguments are `InvalidArgument`. Without a key they are random.
The partition is drawn among the ones the function's limits allot (`limits`), from
the same digits. The record keeps a digest of the arguments, not a second copy.

`DurableQueue` is built in layers, a module each, every one using only those above it:
- `queue_records`: the stored records, the key layout, call ids;
- `queue_changes`: what workers report, and the pure changes of one call record;
- `queue_reads`: the queue's state (client, partition count, keyspace) and lookups;
- `queue_leases`: the partition leases;
- `queue_transitions`: the transactions that apply the changes;
- this module: opening the queue, submission, `complete`, and every name other code
  imports from `loom.functions.queue` (`__all__`; import them from here).
Rule: of these modules, only this one reads the clock (`time`) or the OS's randomness
(`secrets`). The functions simulation replaces both in this module's namespace to
replay a seed exactly, so code that needs either belongs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from loom import kv
from loom.core.errors import ConditionFailed, InvalidArgument, NotFound, PermissionDenied
from loom.functions.queue_changes import (
    Failed,
    NotStarted,
    Outcome,
    StaleAttempt,
    Succeeded,
    WasThrottled,
    _finish,
    retry_delay_ms,
)
from loom.functions.queue_leases import LeaseLost
from loom.functions.queue_reads import DueCall, RunningCall
from loom.functions.queue_records import (
    _DECODER,
    _ENCODER,
    ARGS_BYTES_MAX,
    CALL_ID,
    CALLS_PER_TXN_MAX,
    IDEMPOTENCY_KEY_BYTES_MAX,
    KEYSPACE,
    META_SHARD_KEY,
    NAME,
    PAGE_MAX,
    PARTITIONS_DEFAULT,
    PARTITIONS_KEY,
    PARTITIONS_MAX,
    QUEUE_TENANT,
    CallRecord,
    CallState,
    Criticality,
    DueEntry,
    LeaseHold,
    PartitionLease,
    RunningEntry,
    call_key,
    dead_key,
    dead_prefix,
    decode_due,
    done_key,
    done_prefix,
    due_key,
    due_prefix,
    lease_key,
    partition_of,
    running_key,
    running_prefix,
    shard_key,
)
from loom.functions.queue_transitions import CallTransitions

__all__ = [
    "ARGS_BYTES_MAX",
    "CALLS_PER_TXN_MAX",
    "CALL_ID",
    "IDEMPOTENCY_KEY_BYTES_MAX",
    "KEYSPACE",
    "META_SHARD_KEY",
    "NAME",
    "PAGE_MAX",
    "PARTITIONS_DEFAULT",
    "PARTITIONS_KEY",
    "PARTITIONS_MAX",
    "QUEUE_TENANT",
    "CallRecord",
    "CallState",
    "Criticality",
    "DueCall",
    "DueEntry",
    "DurableQueue",
    "Failed",
    "LeaseHold",
    "LeaseLost",
    "NotStarted",
    "Outcome",
    "PartitionLease",
    "RunningCall",
    "RunningEntry",
    "StaleAttempt",
    "Submission",
    "Submitted",
    "Succeeded",
    "WasThrottled",
    "call_id_for",
    "call_key",
    "dead_key",
    "dead_prefix",
    "decode_due",
    "done_key",
    "done_prefix",
    "due_key",
    "due_prefix",
    "lease_key",
    "partition_of",
    "retry_delay_ms",
    "running_key",
    "running_prefix",
    "shard_key",
]


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


class DurableQueue(CallTransitions):
    """DurableQ in keyspace `__functions` of a loom kv cluster."""

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

    # ------------------------------------------------------------------ transitions

    async def complete(self, call_id: str, *, attempt: int, result: bytes) -> CallRecord:
        """RUNNING in `attempt` → SUCCEEDED; a later or earlier attempt changes nothing."""
        now_ms = int(time.time() * 1000)
        outcome = Succeeded(call_id, attempt, result)
        return await self._transition(
            call_id, _finish(self._partition(call_id), outcome, now_ms, lambda: 0.0)
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
