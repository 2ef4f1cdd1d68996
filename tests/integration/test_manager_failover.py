"""A shard manager and three node runtimes on 127.0.0.1: the manager places a shard,
persists its epoch by compare-and-swap before announcing it, and fails over when the
primary's node stops; an acknowledged QUORUM write survives and writes go on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from loom.core.ids import ClientId, NodeId, RequestId, RequestSeq, ShardId, UShard
from loom.host.requests import Consistency, ReadReply, ReadRequest, WriteReply, WriteRequest
from loom.kvstate.commands import Applied, Put, encode_command
from loom.paxos.params import ReplicaParams
from loom.runtime.codec import ClientAnswer, ClientCall, CreateShard, decode, encode
from loom.runtime.manager import ManagerRuntime, decode_record, epoch_key
from loom.runtime.node import NodeRuntime
from loom.runtime.rpc import RpcClient
from loom.shardmgr.core import SmParams

SHARD = ShardId(0)
PARAMS = ReplicaParams(lease_ms=300.0, heartbeat_interval_ms=30.0, probe_interval_ms=30.0)
NAMES = (NodeId("n1"), NodeId("n2"), NodeId("n3"))


async def wait_for(condition: Callable[[], bool], *, timeout_s: float = 15.0) -> None:
    """Polls a condition with a deadline (the state lives in other tasks and threads)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - no event to wait on across the thread
            await asyncio.sleep(0.02)


async def write(node: NodeRuntime, seq: int, value: bytes) -> WriteReply:
    put = Put(
        request=RequestId(ClientId("test"), RequestSeq(seq)),
        ushard=UShard(3),
        key=b"k",
        value=value,
    )
    request = WriteRequest(token=seq, command=encode_command(put))
    async with await RpcClient.connect("127.0.0.1", node.port) as client:
        body = await client.call(encode(ClientCall(shard=SHARD, request=request)), timeout_s=10)
    answer = decode(body)
    assert isinstance(answer, ClientAnswer)
    assert isinstance(answer.reply, WriteReply), answer.reply
    return answer.reply


async def read(node: NodeRuntime) -> ReadReply:
    request = ReadRequest(token=99, ushard=UShard(3), key=b"k", consistency=Consistency.STRONG)
    async with await RpcClient.connect("127.0.0.1", node.port) as client:
        body = await client.call(encode(ClientCall(shard=SHARD, request=request)), timeout_s=10)
    answer = decode(body)
    assert isinstance(answer, ClientAnswer)
    assert isinstance(answer.reply, ReadReply), answer.reply
    return answer.reply


async def scenario(tmp: Path, *, restart_manager: bool) -> None:
    manager = ManagerRuntime(
        metastore_path=tmp / "sm" / "metastore.json",
        params=SmParams(failure_timeout_ms=400.0, announce_interval_ms=200.0),
    )
    (tmp / "sm").mkdir()
    await manager.start()
    nodes = {n: NodeRuntime(node=n, data_dir=tmp / n, params=PARAMS) for n in NAMES}
    try:
        for node in nodes.values():
            await node.start()
        for node in nodes.values():
            node.connect_manager("127.0.0.1", manager.port)  # peers come with assignments
        await wait_for(lambda: set(NAMES) <= set(manager.addresses))
        async with await RpcClient.connect("127.0.0.1", manager.port) as admin:
            await admin.call(encode(CreateShard(shard=SHARD, acceptors=NAMES)), timeout_s=5)

        def active_primary() -> NodeId | None:
            state = manager.core.shards.get(SHARD)
            return state.current.primary if state is not None and state.activated else None

        await wait_for(lambda: active_primary() is not None)
        first = active_primary()
        assert first is not None
        wrote = await write(nodes[first], 1, b"before")
        assert isinstance(wrote.result, Applied)
        assert manager.metastore.get(epoch_key(SHARD)) is not None

        if restart_manager:
            # A new manager on the same metastore and address goes on from the record.
            port, epoch = manager.port, manager.core.shards[SHARD].current.epoch
            await manager.close()
            manager = ManagerRuntime(
                metastore_path=tmp / "sm" / "metastore.json",
                params=SmParams(failure_timeout_ms=400.0, announce_interval_ms=200.0),
                port=port,
            )
            await manager.start()
            restored = manager.core.shards[SHARD]
            assert restored.current.epoch == epoch
            assert restored.activated
            await wait_for(lambda: set(NAMES) <= set(manager.addresses))

        await nodes.pop(first).close()  # the primary's node stops
        await wait_for(lambda: active_primary() not in (None, first))
        second = active_primary()
        assert second is not None
        seen = await read(nodes[second])
        assert seen.item is not None
        assert seen.item.value == b"before"
        again = await write(nodes[second], 2, b"after")
        assert isinstance(again.result, Applied)
        stored = manager.metastore.get(epoch_key(SHARD))
        assert stored is not None
        assert decode_record(stored[0]).assignment == manager.core.shards[SHARD].current
    finally:
        for node in nodes.values():
            await node.close()
        await manager.close()


def test_manager_fails_over_when_the_primary_node_stops(tmp_path: Path) -> None:
    asyncio.run(scenario(tmp_path, restart_manager=False))


def test_a_restarted_manager_keeps_its_shards_and_still_fails_over(tmp_path: Path) -> None:
    asyncio.run(scenario(tmp_path, restart_manager=True))
