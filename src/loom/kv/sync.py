"""The blocking twin of the asyncio client, for code without an event loop.

One background thread runs an event loop (uvloop when installed) with the asyncio
`Client`; every method submits a coroutine to it and waits. A `SyncClient` may be
shared by threads. Close it (or use `with`) to stop the thread.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import random
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from loom.core.errors import InvalidArgument, TransactionConflict
from loom.core.ids import Version
from loom.host.requests import Durability
from loom.kv.client import Client, connect
from loom.kv.keyspace import Keyspace
from loom.kv.options import QUORUM, STRONG, Page, ReadConsistency
from loom.kv.retries import BACKOFF_BASE_S, BACKOFF_MAX_S
from loom.kv.transaction import Transaction
from loom.kv.transport import DEFAULT_TIMEOUT_S
from loom.kvstate.reads import Item
from loom.runtime.codec import ReshardReport, StatusReply, TokenInfo, TokenReply
from loom.runtime.tls import TlsConfig
from loom.shardmgr.routing import Keyspace as KeyspaceInfo
from loom.shardmgr.routing import RoutingTable
from loom.shardmgr.tenancy import Tenant

T = TypeVar("T")
JOIN_TIMEOUT_S = 10.0


class _LoopThread:
    def __init__(self) -> None:
        if importlib.util.find_spec("uvloop") is not None:
            self.loop: asyncio.AbstractEventLoop = importlib.import_module(
                "uvloop"
            ).new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="loom-kv", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise InvalidArgument("a blocking loom call from inside the client's own loop")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=JOIN_TIMEOUT_S)
        if not self.thread.is_alive():
            self.loop.close()


class SyncClient:
    def __init__(self, runner: _LoopThread, client: Client) -> None:
        self._runner = runner
        self.client = client

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._runner.run(self.client.close())
        finally:
            self._runner.stop()

    def create_keyspace(
        self,
        name: str,
        *,
        shards: int = 1,
        replication: int = 3,
        ushards: int = 4096,
        tier: str = "wildcard",
        regions: Sequence[str] = (),
        tenant: str | None = None,
        mapping: str = "compact",
    ) -> KeyspaceInfo:
        return self._runner.run(
            self.client.create_keyspace(
                name,
                shards=shards,
                replication=replication,
                ushards=ushards,
                tier=tier,
                regions=regions,
                tenant=tenant,
                mapping=mapping,
            )
        )

    def reshard_keyspace(
        self,
        name: str,
        *,
        shards: int,
        wait: bool = True,
        progress: Callable[[int, int], None] | None = None,
        report: Callable[[ReshardReport], None] | None = None,
    ) -> KeyspaceInfo:
        return self._runner.run(
            self.client.reshard_keyspace(
                name, shards=shards, wait=wait, progress=progress, report=report
            )
        )

    def transfer_primary(self, shard: int, to: str) -> tuple[str, int]:
        return self._runner.run(self.client.transfer_primary(shard, to))

    def set_keyspace_tier(
        self,
        name: str,
        tier: str,
        *,
        wait: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> KeyspaceInfo:
        return self._runner.run(
            self.client.set_keyspace_tier(name, tier, wait=wait, progress=progress)
        )

    def reshard_status(self, name: str) -> ReshardReport:
        return self._runner.run(self.client.reshard_status(name))

    def create_tenant(self, name: str, *, weight: int = 1) -> Tenant:
        return self._runner.run(self.client.create_tenant(name, weight=weight))

    def tenants(self) -> list[Tenant]:
        return self._runner.run(self.client.tenants())

    def create_token(self, tenant: str, *, admin: bool = False) -> TokenReply:
        return self._runner.run(self.client.create_token(tenant, admin=admin))

    def tokens(self) -> list[TokenInfo]:
        return self._runner.run(self.client.tokens())

    def revoke_token(self, token_id: str) -> None:
        self._runner.run(self.client.revoke_token(token_id))

    def drop_keyspace(self, name: str) -> None:
        self._runner.run(self.client.drop_keyspace(name))

    def set_quota(
        self,
        name: str,
        *,
        reads_per_s: float | None = None,
        writes_per_s: float | None = None,
        bytes_max: int | None = None,
    ) -> KeyspaceInfo:
        return self._runner.run(
            self.client.set_quota(
                name, reads_per_s=reads_per_s, writes_per_s=writes_per_s, bytes_max=bytes_max
            )
        )

    def keyspaces(self) -> list[KeyspaceInfo]:
        return self._runner.run(self.client.keyspaces())

    def routing(self) -> RoutingTable:
        return self._runner.run(self.client.routing())

    def status(self) -> StatusReply:
        return self._runner.run(self.client.status())

    def keyspace(self, name: str) -> SyncKeyspace:
        return SyncKeyspace(self._runner, self.client.keyspace(name))


class SyncKeyspace:
    def __init__(self, runner: _LoopThread, keyspace: Keyspace) -> None:
        self._runner = runner
        self.keyspace = keyspace

    def put(
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
        return self._runner.run(
            self.keyspace.put(
                key,
                value,
                shard_key=shard_key,
                durability=durability,
                if_absent=if_absent,
                if_version=if_version,
                if_value=if_value,
                ttl_s=ttl_s,
            )
        )

    def get(
        self, key: bytes, *, shard_key: bytes | None = None, consistency: ReadConsistency = STRONG
    ) -> Item | None:
        return self._runner.run(
            self.keyspace.get(key, shard_key=shard_key, consistency=consistency)
        )

    def get_many(
        self,
        keys: Sequence[bytes],
        *,
        shard_key: bytes | None = None,
        consistency: ReadConsistency = STRONG,
    ) -> list[Item | None]:
        return self._runner.run(
            self.keyspace.get_many(keys, shard_key=shard_key, consistency=consistency)
        )

    def delete(
        self,
        key: bytes,
        *,
        shard_key: bytes | None = None,
        if_exists: bool = False,
        if_version: Version | None = None,
    ) -> bool:
        return self._runner.run(
            self.keyspace.delete(
                key, shard_key=shard_key, if_exists=if_exists, if_version=if_version
            )
        )

    def increment(self, key: bytes, delta: int = 1, *, shard_key: bytes | None = None) -> int:
        return self._runner.run(self.keyspace.increment(key, delta, shard_key=shard_key))

    def scan(
        self,
        *,
        shard_key: bytes,
        prefix: bytes = b"",
        limit: int = 100,
        cursor: bytes | None = None,
        consistency: ReadConsistency = STRONG,
    ) -> Page:
        return self._runner.run(
            self.keyspace.scan(
                shard_key=shard_key,
                prefix=prefix,
                limit=limit,
                cursor=cursor,
                consistency=consistency,
            )
        )

    def transaction(self, *, shard_key: bytes) -> SyncTransaction:
        return SyncTransaction(self._runner, self.keyspace.transaction(shard_key=shard_key))

    def run_transaction(
        self, fn: Callable[[SyncTransaction], T], *, shard_key: bytes, attempts_max: int = 10
    ) -> T:
        """`fn(tx)` then commit, again on `TransactionConflict` (see the async twin)."""
        if not isinstance(attempts_max, int) or not 1 <= attempts_max <= 1000:
            raise InvalidArgument("attempts_max must be 1..1000")
        for attempt in range(1, attempts_max + 1):
            tx = self.transaction(shard_key=shard_key)
            try:
                result = fn(tx)
                tx.commit()
            except TransactionConflict:
                if attempt == attempts_max:
                    raise
                time.sleep(random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)))
                continue
            return result
        raise AssertionError("unreachable")


class SyncTransaction:
    def __init__(self, runner: _LoopThread, tx: Transaction) -> None:
        self._runner = runner
        self.tx = tx

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._runner.run(self.tx.__aexit__(kind, error, tb))

    def get(self, key: bytes) -> Item | None:
        return self._runner.run(self.tx.get(key))

    def get_many(self, keys: Sequence[bytes]) -> list[Item | None]:
        return self._runner.run(self.tx.get_many(keys))

    def put(self, key: bytes, value: bytes) -> None:
        self._runner.run(self.tx.put(key, value))

    def delete(self, key: bytes) -> None:
        self._runner.run(self.tx.delete(key))

    def commit(self) -> None:
        self._runner.run(self.tx.commit())


def connect_sync(
    address: str | Sequence[str],
    *,
    token: str | None = None,
    region: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    tls: TlsConfig | None = None,
) -> SyncClient:
    """The blocking `connect`: returns a connected `SyncClient`."""
    runner = _LoopThread()

    async def start() -> Client:
        return await connect(address, token=token, region=region, timeout_s=timeout_s, tls=tls)

    try:
        client = runner.run(start())
    except BaseException:
        runner.stop()
        raise
    return SyncClient(runner, client)
