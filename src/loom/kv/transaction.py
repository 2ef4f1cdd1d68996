"""Optimistic, serializable transactions within one μshard (DESIGN §5).

Reads go to the p-shard's primary; the first one fixes the snapshot (the replica's
applied seq) and the epoch. A later read that finds a record newer than the snapshot,
or another epoch, means the snapshot is gone: `TransactionConflict` at once. Keys read
as absent are in the read set too. Writes are buffered and sent at commit as one
`TxnCommit` (read set + write set + snapshot); apply rejects it if any key read
changed after the snapshot. A commit whose answer is lost raises `OutcomeUnknown` (from the client).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from loom.core.errors import InvalidArgument, TransactionConflict
from loom.core.ids import Epoch, Generation, RequestId, RequestSeq, Seq, UShard, Version
from loom.core.limits import DEFAULT_LIMITS
from loom.host.requests import KeyRead, ReadReply
from loom.kv.options import STRONG
from loom.kvstate.commands import TxnCommit, TxnRead, TxnWrite
from loom.kvstate.reads import Item

if TYPE_CHECKING:
    from loom.kv.keyspace import Keyspace

SNAPSHOT_INDEX_MAX = 2**31 - 1
_PENDING = Version(Generation(0), Seq(0), 0)  # version of a value written in this txn


class Transaction:
    def __init__(self, keyspace: Keyspace, shard_key: bytes) -> None:
        self.keyspace = keyspace
        self.shard_key = shard_key
        self._ushard: UShard | None = None
        self._reads: dict[bytes, Version | None] = {}
        self._writes: dict[bytes, bytes | None] = {}
        self._snapshot: Seq | None = None
        # The μshard's generation where the snapshot was read: versions compare as
        # (generation, seq), and a μshard that moved since is a conflict.
        self._generation = Generation(0)
        self._epoch = Epoch(0)
        self._finished = False

    async def __aenter__(self) -> Transaction:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            await self.commit()
        self._finished = True

    async def _ushard_of_txn(self) -> UShard:
        if self._ushard is None:
            self._ushard = await self.keyspace._ushard(self.shard_key, None)
        return self._ushard

    def _check_open(self, key: object) -> bytes:
        if self._finished:
            raise InvalidArgument("the transaction is finished")
        if not isinstance(key, bytes) or len(key) > DEFAULT_LIMITS.key_bytes_max:
            raise InvalidArgument(f"key must be bytes of at most {DEFAULT_LIMITS.key_bytes_max}")
        return key

    async def get(self, key: bytes) -> Item | None:
        """The key at the transaction's snapshot (or as this transaction wrote it)."""
        (item,) = await self.get_many([key])
        return item

    async def get_many(self, keys: Sequence[bytes]) -> list[Item | None]:
        """`get` of each key, in order, with one request for the keys this transaction
        has not written (one per `Limits.read_keys_max` keys)."""
        checked = [self._check_open(key) for key in keys]
        fresh = list(dict.fromkeys(k for k in checked if k not in self._writes))
        if len(self._reads.keys() | fresh) > DEFAULT_LIMITS.txn_reads_max:
            raise InvalidArgument(f"a transaction reads at most {DEFAULT_LIMITS.txn_reads_max}")
        read: dict[bytes, Item | None] = {}
        step = DEFAULT_LIMITS.read_keys_max
        for chunk in (fresh[i : i + step] for i in range(0, len(fresh), step)):
            ushard = await self._ushard_of_txn()
            reply = await self.keyspace._read(ushard, chunk[0], STRONG, also=tuple(chunk[1:]))
            for key, got in zip(chunk, reply.reads(), strict=True):
                read[key] = self._accept(reply, key, got)
        return [self._written(key) if key in self._writes else read[key] for key in checked]

    def _written(self, key: bytes) -> Item | None:
        value = self._writes[key]
        return None if value is None else Item(key=key, value=value, version=_PENDING)

    def _accept(self, reply: ReadReply, key: bytes, got: KeyRead) -> Item | None:
        """Checks one key's read against the snapshot (the first read fixes it) and
        adds it to the read set."""
        if self._snapshot is None:
            self._snapshot, self._epoch = reply.applied_seq, reply.epoch
            self._generation = reply.generation
        version = got.record_version
        moved = (
            reply.epoch != self._epoch
            or reply.generation != self._generation
            or reply.applied_seq < self._snapshot
        )
        newer = version is not None and (version.generation, version.seq) > (
            self._generation,
            self._snapshot,
        )
        if moved or newer:
            # Another epoch, a replica behind the snapshot, or a newer record: the
            # snapshot cannot be read any more.
            raise TransactionConflict(f"{key!r} changed after the transaction's snapshot")
        self._reads[key] = version
        return got.item

    async def put(self, key: bytes, value: bytes) -> None:
        key = self._check_open(key)
        if not isinstance(value, bytes) or len(value) > DEFAULT_LIMITS.value_bytes_max:
            raise InvalidArgument(
                f"value must be bytes of at most {DEFAULT_LIMITS.value_bytes_max}"
            )
        self._buffer(key, value)

    async def delete(self, key: bytes) -> None:
        self._buffer(self._check_open(key), None)

    def _buffer(self, key: bytes, value: bytes | None) -> None:
        if key not in self._writes and len(self._writes) >= DEFAULT_LIMITS.txn_writes_max:
            raise InvalidArgument(f"a transaction writes at most {DEFAULT_LIMITS.txn_writes_max}")
        self._writes[key] = value

    async def commit(self) -> None:
        """Commit the buffered writes (a read-only transaction has nothing to send: its
        reads were checked against the snapshot as they came)."""
        if self._finished:
            return
        self._finished = True
        if not self._writes:
            return
        ushard = await self._ushard_of_txn()
        if self._snapshot is None:
            # Blind writes: snapshot at the primary's current state.
            reply = await self.keyspace._read(ushard, next(iter(self._writes)), STRONG)
            self._snapshot, self._epoch = reply.applied_seq, reply.epoch
            self._generation = reply.generation
        snapshot = Version(self._generation, self._snapshot, SNAPSHOT_INDEX_MAX)
        reads = tuple(TxnRead(key, version) for key, version in sorted(self._reads.items()))
        writes = tuple(TxnWrite(key, value) for key, value in sorted(self._writes.items()))
        epoch = self._epoch

        def make(request: RequestId, floor: RequestSeq) -> TxnCommit:
            return TxnCommit(
                request=request,
                ushard=ushard,
                snapshot=snapshot,
                epoch=epoch,
                reads=reads,
                writes=writes,
                client_floor=floor,
            )

        await self.keyspace.client.write(self.keyspace.name, ushard, make)
