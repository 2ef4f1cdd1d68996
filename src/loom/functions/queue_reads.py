"""DurableQ's state and its lookups (see `loom.functions.queue`).

`QueueReads` holds what every part of `DurableQueue` shares (the kv client, the
partition count, the `__functions` keyspace) and the reads: one call, the due and
running indexes, every record, the dead-letter set. Rules: reads write nothing; every
scan is bounded (`PAGE_MAX` a page); a call id must name a partition of this queue.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from loom import kv
from loom.core.errors import InvalidArgument
from loom.functions.queue_records import (
    _DECODER,
    _DUE,
    _RUNNING,
    KEYSPACE,
    PAGE_MAX,
    PARTITIONS_DEFAULT,
    PARTITIONS_MAX,
    CallRecord,
    RunningEntry,
    call_key,
    dead_prefix,
    due_prefix,
    partition_of,
    running_prefix,
    shard_key,
)


@dataclass(frozen=True, slots=True)
class DueCall:
    call_id: str
    run_after_ms: int
    deadline_ms: int | None


@dataclass(frozen=True, slots=True)
class RunningCall:
    call_id: str
    entry: RunningEntry


class QueueReads:
    """The lookups of `DurableQueue` (its base), and the state they share."""

    def __init__(self, client: kv.Client, *, partitions: int = PARTITIONS_DEFAULT) -> None:
        if not isinstance(partitions, int) or not 1 <= partitions <= PARTITIONS_MAX:
            raise InvalidArgument(f"partitions must be 1..{PARTITIONS_MAX}")
        self.client = client
        self.partitions = partitions
        self.ks = client.keyspace(KEYSPACE)

    def _partition(self, call_id: str) -> int:
        partition = partition_of(call_id)
        if partition >= self.partitions:
            raise InvalidArgument(f"call id {call_id!r} names partition {partition} of none")
        return partition

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
