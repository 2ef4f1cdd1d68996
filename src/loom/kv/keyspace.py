"""`Keyspace`: reads and writes of one keyspace (put, get, get_many, delete, increment,
scan) and its transactions.

Rules: every argument is checked before anything is sent (`InvalidArgument`, nothing
reaches the network). A key's μshard is the stable hash of its shard key (the key
itself when none is given): keys sharing a shard key share a μshard, which scans and
transactions need. STRONG reads and scans go to the primary, relaxed ones to the
nearest replica, with this client's last write to the p-shard as their floor
(READ_YOUR_WRITES). Writes go through `Client.write`, which keeps one request id across
retries; `run_transaction` re-runs only on `TransactionConflict`, never on
`OutcomeUnknown`.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from loom.core.errors import InvalidArgument, TransactionConflict, Unavailable
from loom.core.hashing import ushard_of
from loom.core.ids import RequestId, RequestSeq, UShard, Version
from loom.core.limits import DEFAULT_LIMITS
from loom.host.requests import (
    ClientReply,
    ClientRequest,
    Consistency,
    Durability,
    ReadReply,
    ReadRequest,
    ScanReply,
    ScanRequest,
)
from loom.kv.arguments import (
    INT64,
    TTL_S_MAX,
    _check_bytes,
    _check_consistency,
    _check_key,
    _is_int,
    _is_number,
)
from loom.kv.options import QUORUM, STRONG, Page, ReadConsistency
from loom.kv.retries import BACKOFF_BASE_S, BACKOFF_MAX_S
from loom.kv.transaction import Transaction
from loom.kvstate.commands import Delete, Increment, Put
from loom.kvstate.reads import Item

if TYPE_CHECKING:
    from loom.kv.client import Client

T = TypeVar("T")


class Keyspace:
    """Reads and writes of one keyspace. Every method takes an optional `shard_key`:
    keys with the same shard key share a μshard (scans and transactions need that)."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    async def _ushard(self, key: bytes, shard_key: bytes | None) -> UShard:
        if not self.client.router.has_keyspace(self.name):
            await self.client.router.refresh(force=True)
        info = self.client.router.keyspace(self.name)
        routing_key = _check_key("shard_key", shard_key) if shard_key is not None else key
        return ushard_of(routing_key, info.spec.ushards)

    async def put(
        self,
        key: bytes,
        value: bytes,
        *,
        shard_key: bytes | None = None,
        durability: Durability = QUORUM,
        if_absent: bool = False,
        if_version: Version | None = None,
        if_value: bytes | None = None,
        ttl_s: float | None = None,
    ) -> Version:
        """Store `value` under `key`; returns the write's version. Conditions are checked
        on the server: `ConditionFailed` if one does not hold (nothing written)."""
        key = _check_key("key", key)
        value = _check_bytes("value", value, DEFAULT_LIMITS.value_bytes_max)
        if if_value is not None:
            _check_bytes("if_value", if_value, DEFAULT_LIMITS.value_bytes_max)
        if if_version is not None and not isinstance(if_version, Version):
            raise InvalidArgument("if_version must be a Version returned by put/get")
        if not isinstance(durability, Durability):
            raise InvalidArgument("durability must be kv.QUORUM or kv.FAST_ACK")
        ttl_ms = None
        if ttl_s is not None:
            if not _is_number(ttl_s) or not 0 < ttl_s <= TTL_S_MAX:
                raise InvalidArgument(f"ttl_s must be in (0, {TTL_S_MAX}], not {ttl_s!r}")
            ttl_ms = max(1, math.ceil(ttl_s * 1000))
        ushard = await self._ushard(key, shard_key)

        def make(request: RequestId, floor: RequestSeq) -> Put:
            return Put(
                request=request,
                ushard=ushard,
                key=key,
                value=value,
                if_absent=if_absent,
                if_version=if_version,
                if_value=if_value,
                ttl_ms=ttl_ms,
                client_floor=floor,
            )

        applied = await self.client.write(self.name, ushard, make, durability)
        return applied.version

    async def get(
        self, key: bytes, *, shard_key: bytes | None = None, consistency: ReadConsistency = STRONG
    ) -> Item | None:
        """The key's live value, or None."""
        key = _check_key("key", key)
        reply = await self._read(await self._ushard(key, shard_key), key, consistency)
        return reply.item

    async def get_many(
        self,
        keys: Sequence[bytes],
        *,
        shard_key: bytes | None = None,
        consistency: ReadConsistency = STRONG,
    ) -> list[Item | None]:
        """Each key's live value or None, in order. One request per μshard (and per
        `Limits.read_keys_max` keys), all sent at once; the keys of one request are read
        at one point, different requests' are not (a transaction reads one snapshot)."""
        if len(keys) > DEFAULT_LIMITS.scan_items_max:
            raise InvalidArgument(f"get_many takes at most {DEFAULT_LIMITS.scan_items_max} keys")
        checked = [_check_key("key", key) for key in keys]
        by_ushard: dict[UShard, list[bytes]] = {}
        for key in dict.fromkeys(checked):
            by_ushard.setdefault(await self._ushard(key, shard_key), []).append(key)
        step = DEFAULT_LIMITS.read_keys_max
        requests = [
            (ushard, group[i : i + step])
            for ushard, group in by_ushard.items()
            for i in range(0, len(group), step)
        ]
        replies = await asyncio.gather(
            *(self._read(u, chunk[0], consistency, also=tuple(chunk[1:])) for u, chunk in requests)
        )
        found = {
            key: got.item
            for (_, chunk), reply in zip(requests, replies, strict=True)
            for key, got in zip(chunk, reply.reads(), strict=True)
        }
        return [found[key] for key in checked]

    async def _read(
        self,
        ushard: UShard,
        key: bytes,
        consistency: ReadConsistency,
        *,
        also: tuple[bytes, ...] = (),
    ) -> ReadReply:
        reply = await self._read_like(
            ushard,
            consistency,
            lambda token, min_version: ReadRequest(
                token=token,
                ushard=ushard,
                key=key,
                consistency=consistency.kind,
                bound_ms=consistency.bound_ms,
                min_version=min_version,
                also=also,
            ),
        )
        if not isinstance(reply, ReadReply):
            raise Unavailable(f"a read was answered with {type(reply).__name__}")
        if len(reply.also) != len(also):
            raise Unavailable("the node does not read several keys in one request (too old)")
        return reply

    async def _read_like(
        self,
        ushard: UShard,
        consistency: ReadConsistency,
        build: Callable[[int, Version | None], ClientRequest],
    ) -> ClientReply:
        """A read or scan: STRONG at the primary, relaxed at the nearest replica; the
        client's last write to the p-shard is the floor for READ_YOUR_WRITES."""
        _check_consistency(consistency)
        min_version = self.client.written(self.name, ushard)
        return await self.client.request(
            self.name,
            ushard,
            lambda token: build(token, min_version),
            target="primary" if consistency.kind is Consistency.STRONG else "nearest",
            is_write=False,
        )

    async def delete(
        self,
        key: bytes,
        *,
        shard_key: bytes | None = None,
        if_exists: bool = False,
        if_version: Version | None = None,
        durability: Durability = QUORUM,
    ) -> bool:
        """Delete `key`; True if a live value was deleted. `if_exists`: `ConditionFailed`
        when there is none."""
        key = _check_key("key", key)
        ushard = await self._ushard(key, shard_key)

        def make(request: RequestId, floor: RequestSeq) -> Delete:
            return Delete(
                request=request,
                ushard=ushard,
                key=key,
                if_exists=if_exists,
                if_version=if_version,
                client_floor=floor,
            )

        applied = await self.client.write(self.name, ushard, make, durability)
        return applied.existed

    async def increment(self, key: bytes, delta: int = 1, *, shard_key: bytes | None = None) -> int:
        """Add `delta` to the 64-bit counter at `key` (absent: 0); returns the new value."""
        key = _check_key("key", key)
        if not _is_int(delta) or not -INT64 <= delta < INT64:
            raise InvalidArgument("delta must be a signed 64-bit integer")
        ushard = await self._ushard(key, shard_key)

        def make(request: RequestId, floor: RequestSeq) -> Increment:
            return Increment(
                request=request, ushard=ushard, key=key, delta=delta, client_floor=floor
            )

        applied = await self.client.write(self.name, ushard, make)
        assert applied.counter is not None
        return applied.counter

    async def scan(
        self,
        *,
        shard_key: bytes,
        prefix: bytes = b"",
        limit: int = 100,
        cursor: bytes | None = None,
        consistency: ReadConsistency = STRONG,
    ) -> Page:
        """Live items of `shard_key`'s μshard whose key starts with `prefix`, in key
        order, at most `limit` per page. Other shard keys may hash to the same μshard:
        give their keys a per-entity prefix (e.g. `user:1/`) and scan with it."""
        shard_key = _check_key("shard_key", shard_key)
        prefix = _check_key("prefix", prefix)
        if cursor is not None:
            _check_key("cursor", cursor)
        if not _is_int(limit) or not 1 <= limit <= DEFAULT_LIMITS.scan_items_max:
            raise InvalidArgument(f"limit must be 1..{DEFAULT_LIMITS.scan_items_max}")
        _check_consistency(consistency)
        ushard = await self._ushard(shard_key, None)
        reply = await self._read_like(
            ushard,
            consistency,
            lambda token, min_version: ScanRequest(
                token=token,
                ushard=ushard,
                prefix=prefix,
                start_after=cursor,
                limit=limit,
                consistency=consistency.kind,
                bound_ms=consistency.bound_ms,
                min_version=min_version,
            ),
        )
        if not isinstance(reply, ScanReply):
            raise Unavailable(f"a scan was answered with {type(reply).__name__}")
        return Page(items=list(reply.items), cursor=reply.cursor)

    def transaction(self, *, shard_key: bytes) -> Transaction:
        """An optimistic, serializable transaction over the keys of one μshard:
        `async with ks.transaction(shard_key=...) as tx:` commits on a clean exit."""
        return Transaction(self, _check_key("shard_key", shard_key))

    async def run_transaction(
        self,
        fn: Callable[[Transaction], Awaitable[T]],
        *,
        shard_key: bytes,
        attempts_max: int = 10,
    ) -> T:
        """Run `fn(tx)` and commit, again on `TransactionConflict` (up to `attempts_max`
        times, with backoff). A commit whose outcome is unknown raises `OutcomeUnknown`
        and is never re-run blindly."""
        if not isinstance(attempts_max, int) or not 1 <= attempts_max <= 1000:
            raise InvalidArgument("attempts_max must be 1..1000")
        for attempt in range(1, attempts_max + 1):
            tx = self.transaction(shard_key=shard_key)
            try:
                result = await fn(tx)
                await tx.commit()
            except TransactionConflict:
                if attempt == attempts_max:
                    raise
                ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)
                await asyncio.sleep(random.uniform(0, ceiling))
                continue
            return result
        raise AssertionError("unreachable")
