"""DurableQ's partition leases: how schedulers own partitions (see `loom.functions.queue`).

A partition's lease record (`PartitionLease`) names its holder; `token` grows with
every new holder and fences out the old one, `beat` grows with every renewal. Rules:
a lease is taken only from the record the taker saw, and renewed only by a write
conditional on the holder's own record; a release, and every write a scheduler makes
to calls (`queue_transitions`), checks its `LeaseHold` in the same transaction
(`_check_held`). A lease that moved on answers `LeaseLost`, and nothing is written.
"""

from __future__ import annotations

import dataclasses

import msgspec

from loom import kv
from loom.core.errors import ConditionFailed
from loom.functions.queue_reads import QueueReads
from loom.functions.queue_records import (
    _ENCODER,
    _LEASE,
    LeaseHold,
    PartitionLease,
    lease_key,
    shard_key,
)


class LeaseLost(ConditionFailed):
    """The scheduler no longer holds the partition: its write changes nothing."""


class PartitionLeases(QueueReads):
    """The partition leases of `DurableQueue` (its base, after the lookups)."""

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


def _check_held(item: kv.Item | None, hold: LeaseHold) -> PartitionLease:
    """The partition's lease as read, if `hold` still holds it; else `LeaseLost`."""
    current = _LEASE.decode(item.value) if item is not None else PartitionLease()
    if current.owner != hold.owner or current.token != hold.token:
        raise LeaseLost(f"partition {hold.partition} is no longer held by {hold.owner}")
    return current
