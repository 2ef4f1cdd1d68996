"""An in-memory store with loom kv's client interface, as much of it as the functions
platform uses, failing the way loom kv fails: requests take time, some are refused
(`Unavailable`), some writes apply but their answer is lost (`OutcomeUnknown`), and
now and then the whole store is unavailable for a while (a failover). Transactions are
optimistic and serializable, checked at commit like loom kv's.

It stands in for loom kv so the simulation can run the real scheduler and worker code
in virtual time; loom kv's own behaviour under faults is the subject of `loom sim`.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loom.core.errors import (
    ConditionFailed,
    InvalidArgument,
    OutcomeUnknown,
    TransactionConflict,
    Unavailable,
)
from loom.core.ids import Generation, Seq, Version
from loom.kv.options import Page
from loom.kvstate.reads import Item

T = TypeVar("T")
_PENDING = Version(Generation(0), Seq(0), 0)  # a value written in the transaction


@dataclass(slots=True)
class StoreFaults:
    latency_s: tuple[float, float] = (0.001, 0.02)
    refuse: float = 0.0  # share of requests refused
    lose_answer: float = 0.0  # share of writes applied whose answer is lost
    outage_until: float = 0.0  # the store is unavailable until this virtual time


@dataclass(slots=True)
class SimStore:
    rng: random.Random
    faults: StoreFaults = field(default_factory=StoreFaults)
    data: dict[bytes, Item] = field(default_factory=dict)
    seq: int = 0
    keyspaces: set[str] = field(default_factory=set)

    def _version(self) -> Version:
        self.seq += 1
        return Version(Generation(0), Seq(self.seq), 0)

    async def request(self, *, write: bool) -> None:
        """A request's trip to the store and the faults on the way."""
        await asyncio.sleep(self.rng.uniform(*self.faults.latency_s))
        loop = asyncio.get_running_loop()
        if loop.time() < self.faults.outage_until:
            await asyncio.sleep(0.5)
            raise Unavailable("simulated failover: no primary")
        if self.rng.random() < self.faults.refuse:
            raise Unavailable("simulated refusal")

    def answer_lost(self) -> bool:
        return self.rng.random() < self.faults.lose_answer


class SimClient:
    """One process's client: `paused` stops its requests from leaving (SIGSTOP)."""

    def __init__(self, store: SimStore) -> None:
        self.store = store
        self.running = asyncio.Event()
        self.running.set()
        self.throttled_requests: collections.Counter[str] = collections.Counter()
        self.closed = False

    async def gate(self) -> None:
        if self.closed:
            raise Unavailable("client closed")
        await self.running.wait()

    def keyspace(self, name: str) -> SimKeyspace:
        return SimKeyspace(self, name)

    async def create_tenant(self, name: str, **_: Any) -> None:
        await self.gate()

    async def create_keyspace(self, name: str, **_: Any) -> None:
        await self.gate()
        self.store.keyspaces.add(name)

    async def close(self) -> None:
        self.closed = True


class SimKeyspace:
    def __init__(self, client: SimClient, name: str) -> None:
        self.client = client
        self.store = client.store
        self.name = name

    def _key(self, key: bytes) -> bytes:
        return self.name.encode() + b"\x00" + key

    async def _start(self, *, write: bool) -> None:
        await self.client.gate()
        await self.store.request(write=write)
        await self.client.gate()  # paused while the request was out

    async def get(self, key: bytes, *, shard_key: bytes | None = None, **_: Any) -> Item | None:
        await self._start(write=False)
        item = self.store.data.get(self._key(key))
        return None if item is None else Item(key=key, value=item.value, version=item.version)

    async def put(
        self,
        key: bytes,
        value: bytes,
        *,
        shard_key: bytes | None = None,
        if_absent: bool = False,
        if_value: bytes | None = None,
        **_: Any,
    ) -> Version:
        await self._start(write=True)
        current = self.store.data.get(self._key(key))
        if if_absent and current is not None:
            raise ConditionFailed("if_absent: the key exists")
        if if_value is not None and (current is None or current.value != if_value):
            raise ConditionFailed("if_value: the key's value differs")
        version = self.store._version()
        self.store.data[self._key(key)] = Item(key=key, value=value, version=version)
        if self.store.answer_lost():
            raise OutcomeUnknown("simulated lost answer")
        return version

    async def delete(self, key: bytes, *, shard_key: bytes | None = None, **_: Any) -> None:
        await self._start(write=True)
        self.store.data.pop(self._key(key), None)

    async def scan(
        self,
        *,
        shard_key: bytes,
        prefix: bytes = b"",
        limit: int = 100,
        cursor: bytes | None = None,
        **_: Any,
    ) -> Page:
        await self._start(write=False)
        if not 1 <= limit <= 10_000:
            raise InvalidArgument("limit out of range")
        full = self._key(prefix)
        after = self._key(cursor) if cursor is not None else b""
        keys = sorted(k for k in self.store.data if k.startswith(full) and k > after)
        chosen = keys[:limit]
        items = [self.store.data[k] for k in chosen]
        items = [Item(key=i.key, value=i.value, version=i.version) for i in items]
        next_cursor = items[-1].key if len(keys) > limit else None
        return Page(items=items, cursor=next_cursor)

    async def run_transaction(
        self,
        fn: Callable[[SimTransaction], Awaitable[T]],
        *,
        shard_key: bytes,
        attempts_max: int = 10,
    ) -> T:
        for attempt in range(attempts_max):
            tx = SimTransaction(self)
            result = await fn(tx)
            try:
                await tx.commit()
            except TransactionConflict:
                if attempt == attempts_max - 1:
                    raise
                await asyncio.sleep(self.store.rng.uniform(0, 0.01 * 2**attempt))
                continue
            return result
        raise AssertionError("unreachable")


class SimTransaction:
    def __init__(self, keyspace: SimKeyspace) -> None:
        self.keyspace = keyspace
        self.reads: dict[bytes, Version | None] = {}
        self.writes: dict[bytes, bytes | None] = {}

    async def get(self, key: bytes) -> Item | None:
        (item,) = await self.get_many([key])
        return item

    async def get_many(self, keys: Sequence[bytes]) -> list[Item | None]:
        """Like loom kv's: the keys not written here in one request."""
        fresh = [key for key in keys if key not in self.writes]
        if fresh:
            await self.keyspace._start(write=False)
        read: dict[bytes, Item | None] = {}
        for key in fresh:
            stored = self.keyspace.store.data.get(self.keyspace._key(key))
            item = (
                None
                if stored is None
                else Item(key=key, value=stored.value, version=stored.version)
            )
            read[key] = item
            self.reads[key] = None if item is None else item.version
        return [self._written(key) if key in self.writes else read[key] for key in keys]

    def _written(self, key: bytes) -> Item | None:
        value = self.writes[key]
        return None if value is None else Item(key=key, value=value, version=_PENDING)

    async def put(self, key: bytes, value: bytes) -> None:
        self.writes[key] = value

    async def delete(self, key: bytes) -> None:
        self.writes[key] = None

    async def commit(self) -> None:
        if not self.writes:
            return
        ks = self.keyspace
        await ks._start(write=True)
        data = ks.store.data
        for key, version in self.reads.items():
            current = data.get(ks._key(key))
            if (None if current is None else current.version) != version:
                raise TransactionConflict(f"{key!r} changed after the transaction's snapshot")
        version = ks.store._version()
        for key, value in self.writes.items():
            if value is None:
                data.pop(ks._key(key), None)
            else:
                data[ks._key(key)] = Item(key=key, value=value, version=version)
        if ks.store.answer_lost():
            raise OutcomeUnknown("simulated lost answer to a commit")
