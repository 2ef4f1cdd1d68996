"""Shared steps of the end-to-end tests: real `loom sm`/`loom node` processes on
127.0.0.1 (started and stopped by PID through `LocalCluster`), driven by the client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from loom import kv
from loom.core.errors import LoomError
from loom.core.ids import NodeId, ShardId
from loom.host.requests import ClientReply, ClientRequest
from loom.runtime.codec import ClientAnswer, ClientCall, decode, encode
from loom.runtime.localcluster import LocalCluster
from loom.runtime.rpc import RpcClient
from loom.shardmgr.routing import ShardRoute

NODES = ("n1", "n2", "n3")
KEYSPACE = "ks"


@asynccontextmanager
async def running_cluster(
    tmp: Path, *, lease_ms: float = 1000.0, node_args: tuple[str, ...] = ()
) -> AsyncIterator[tuple[LocalCluster, kv.Client]]:
    """A manager, three nodes and a client with keyspace `ks` (one p-shard) ready."""
    cluster = LocalCluster(data_dir=tmp, lease_ms=lease_ms, node_args=node_args)
    try:
        cluster.start_manager()
        for name in NODES:
            cluster.start_node(name)
        async with kv.connect(cluster.manager_address, timeout_s=20) as client:
            await client.create_keyspace(KEYSPACE, shards=1, replication=3)
            yield cluster, client
    finally:
        cluster.stop()


async def route(client: kv.Client) -> ShardRoute:
    table = await client.routing()
    (shard,) = [s for s in table.shards if s.keyspace == KEYSPACE]
    return shard


async def wait_until_healthy(client: kv.Client, *, timeout_s: float = 30.0) -> ShardRoute:
    """Until the shard's primary is active and every acceptor's node reports."""
    deadline = time.monotonic() + timeout_s
    while True:
        table = await client.routing()
        (shard,) = [s for s in table.shards if s.keyspace == KEYSPACE]
        alive = {n.info.node for n in table.nodes if n.alive}
        if shard.ready and set(shard.acceptors) <= alive:
            return shard
        assert time.monotonic() < deadline, f"not healthy: {shard}, alive {alive}"
        await asyncio.sleep(0.1)


async def wait_until_caught_up(
    client: kv.Client, node: NodeId, shard: ShardId, *, timeout_s: float = 30.0
) -> int:
    """Until `node` has applied everything the primary has committed; returns that seq."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await client.status()
        (state,) = [s for s in status.shards if s.shard == shard]
        commit = state.progress.get(state.primary, (0, 0))[1]
        applied = state.progress.get(node, (0, 0))[0]
        if commit > 0 and applied >= commit:
            return applied
        assert time.monotonic() < deadline, f"{node} stuck at {applied} < {commit}"
        await asyncio.sleep(0.1)


async def ask_node(port: int, shard: ShardId, request: ClientRequest) -> ClientReply:
    """One request straight to one node, bypassing the client's routing and retries."""
    async with await RpcClient.connect("127.0.0.1", port) as rpc:
        body = await rpc.call(encode(ClientCall(shard=shard, request=request)), timeout_s=5)
    answer = decode(body)
    assert isinstance(answer, ClientAnswer), answer
    return answer.reply


class Writer:
    """Writes distinct keys back to back; every error a client would see is counted."""

    def __init__(self, ks: kv.Keyspace) -> None:
        self.ks = ks
        self.acked: list[bytes] = []
        self.errors: list[str] = []

    async def run(self, name: str) -> None:
        for seq in range(10**9):
            key = f"{name}:{seq}".encode()
            try:
                await self.ks.put(key, key)
            except LoomError as error:
                self.errors.append(f"{type(error).__name__}: {error}")
                continue
            self.acked.append(key)
            await asyncio.sleep(0.005)
