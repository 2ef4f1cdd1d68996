"""What the shard manager keeps in its metastore besides epochs: keyspaces and the
p-shard id counter. Synchronous; the manager calls it off the event loop.

Keys:
- `keyspaces/{name}`  → `KeyspaceRecord` (msgpack)
- `meta/next_shard`   → the next unallocated p-shard id (decimal)
- `meta/next_move`    → the next unallocated μshard move id (decimal)
- `shards/{id}/epoch` → the shard's `ShardRecord` (written by the manager's epoch CAS)

Crash safety of the multi-step operations (each step is one compare-and-swap):
- create: allocate ids → store the keyspace record (with its placements) → create the
  shards. A manager that restarts creates the shards of a stored keyspace that have no
  shard record yet.
- drop: mark the record `dropping` → drop each shard (core, shard record, nodes) →
  delete the record. A manager that restarts finishes a drop it finds marked.
"""

from __future__ import annotations

import msgspec

from loom.core.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from loom.core.ids import ShardId
from loom.shardmgr.metastore import Metastore
from loom.shardmgr.routing import Keyspace, Quota

KEYSPACES = "keyspaces/"
NEXT_SHARD = "meta/next_shard"
NEXT_MOVE = "meta/next_move"
CAS_ATTEMPTS_MAX = 16


class KeyspaceRecord(msgspec.Struct, frozen=True, kw_only=True):
    keyspace: Keyspace
    dropping: bool = False


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(KeyspaceRecord)


def shard_record_key(shard: int) -> str:
    """Where a shard's record lives; its epoch is compare-and-swapped there."""
    return f"shards/{shard}/epoch"


class Catalog:
    def __init__(self, metastore: Metastore) -> None:
        self.metastore = metastore

    def keyspaces(self) -> list[KeyspaceRecord]:
        return [_DECODER.decode(value) for _, value, _ in self.metastore.list(KEYSPACES)]

    def next_shard(self) -> int:
        current = self.metastore.get(NEXT_SHARD)
        return int(current[0]) if current else 1

    def allocate_shards(self, count: int) -> list[ShardId]:
        """`count` fresh p-shard ids, never handed out before (CAS on the counter)."""
        first = self._allocate(NEXT_SHARD, count, "shard ids")
        return [ShardId(first + i) for i in range(count)]

    def allocate_move_ids(self, count: int) -> int:
        """The first of `count` fresh μshard move ids: above every id handed out before,
        across manager restarts (the kv state refuses a move id it has seen)."""
        return self._allocate(NEXT_MOVE, count, "move ids")

    def _allocate(self, key: str, count: int, what: str) -> int:
        current = self.metastore.get(key)
        for _ in range(CAS_ATTEMPTS_MAX):
            first = int(current[0]) if current else 1
            revision = current[1] if current else None
            result = self.metastore.compare_and_swap(key, revision, str(first + count).encode())
            if result.ok:
                return first
            current = result.current
        raise Unavailable(f"could not allocate {what}: the metastore is contended")

    def create(self, record: KeyspaceRecord) -> KeyspaceRecord:
        """Stores a new keyspace; the existing record if one with this name exists
        with the same spec; `InvalidArgument` if it exists with another spec."""
        key = KEYSPACES + record.keyspace.name
        result = self.metastore.compare_and_swap(key, None, _ENCODER.encode(record))
        if result.ok:
            return record
        assert result.current is not None
        existing = _DECODER.decode(result.current[0])
        if existing.dropping:
            raise Unavailable(f"keyspace {record.keyspace.name!r} is being dropped; retry")
        if existing.keyspace.tenant != record.keyspace.tenant:
            raise PermissionDenied(
                f"keyspace {record.keyspace.name!r} exists and belongs to another tenant"
            )
        if existing.keyspace.spec != record.keyspace.spec:
            raise InvalidArgument(
                f"keyspace {record.keyspace.name!r} exists with another spec: "
                f"{msgspec.to_builtins(existing.keyspace.spec)}"
            )
        return existing

    def replace(self, name: str, expected: Keyspace, keyspace: Keyspace) -> None:
        """Stores `keyspace` over `expected` (a reshard, a new mapping version): one
        compare-and-swap; `Unavailable` if the record changed meanwhile."""
        key = KEYSPACES + name
        current = self.metastore.get(key)
        if current is None:
            raise NotFound(f"no keyspace {name!r}")
        record = _DECODER.decode(current[0])
        if record.dropping or record.keyspace != expected:
            raise Unavailable(f"keyspace {name!r} changed meanwhile; retry")
        new = _ENCODER.encode(KeyspaceRecord(keyspace=keyspace))
        if not self.metastore.compare_and_swap(key, current[1], new).ok:
            raise Unavailable(f"keyspace {name!r} changed meanwhile; retry")

    def set_quota(self, name: str, quota: Quota) -> KeyspaceRecord:
        """Replaces the keyspace's quota (one compare-and-swap of its record)."""
        key = KEYSPACES + name
        for _ in range(CAS_ATTEMPTS_MAX):
            current = self.metastore.get(key)
            if current is None:
                raise NotFound(f"no keyspace {name!r}")
            record = _DECODER.decode(current[0])
            if record.dropping:
                raise NotFound(f"keyspace {name!r} is being dropped")
            keyspace = msgspec.structs.replace(record.keyspace, quota=quota)
            updated = KeyspaceRecord(keyspace=keyspace)
            result = self.metastore.compare_and_swap(key, current[1], _ENCODER.encode(updated))
            if result.ok:
                return updated
        raise Unavailable(f"keyspace {name!r} is contended; retry")

    def mark_dropping(self, name: str) -> KeyspaceRecord:
        key = KEYSPACES + name
        current = self.metastore.get(key)
        if current is None:
            raise NotFound(f"no keyspace {name!r}")
        record = _DECODER.decode(current[0])
        if record.dropping:
            return record
        dropping = KeyspaceRecord(keyspace=record.keyspace, dropping=True)
        result = self.metastore.compare_and_swap(key, current[1], _ENCODER.encode(dropping))
        if not result.ok:
            raise Unavailable(f"keyspace {name!r} changed meanwhile; retry")
        return dropping

    def delete(self, name: str) -> None:
        key = KEYSPACES + name
        current = self.metastore.get(key)
        if current is not None:
            self.metastore.delete(key, current[1])

    def delete_shard_record(self, shard: ShardId) -> None:
        key = shard_record_key(shard)
        current = self.metastore.get(key)
        if current is not None:
            self.metastore.delete(key, current[1])
