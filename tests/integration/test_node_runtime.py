"""Three node runtimes on 127.0.0.1 (real sockets, RocksDB, storage threads) replicate
one shard: a QUORUM write is acknowledged, read back STRONG at the primary and seen by
every replica. The shard manager process is not wired in yet: the test assigns."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from loom.core.ids import (
    ClientId,
    Epoch,
    NodeId,
    RequestId,
    RequestSeq,
    ShardId,
    UShard,
)
from loom.host.requests import Consistency, ReadReply, ReadRequest, WriteReply, WriteRequest
from loom.kvstate.commands import Applied, Put, encode_command
from loom.paxos.messages import Config
from loom.paxos.params import ReplicaParams
from loom.paxos.replica import Assignment
from loom.runtime.codec import ClientAnswer, ClientCall, decode, encode
from loom.runtime.node import NodeRuntime, load_incarnation
from loom.runtime.rpc import RpcClient

SHARD = ShardId(0)
PARAMS = ReplicaParams(lease_ms=300.0, heartbeat_interval_ms=30.0, probe_interval_ms=30.0)
NAMES = [NodeId("n1"), NodeId("n2"), NodeId("n3")]


async def wait_for(condition: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    """Polls a condition with a deadline (the state lives in another thread)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - no event to wait on across the thread
            await asyncio.sleep(0.01)


async def call(client: RpcClient, request: WriteRequest | ReadRequest) -> object:
    body = await client.call(encode(ClientCall(shard=SHARD, request=request)), timeout_s=10)
    answer = decode(body)
    assert isinstance(answer, ClientAnswer)
    return answer.reply


async def scenario(tmp: Path) -> None:
    nodes = [NodeRuntime(node=n, data_dir=tmp / n, params=PARAMS) for n in NAMES]
    for node in nodes:
        await node.start()
    try:
        peers = {node.node: ("127.0.0.1", node.port) for node in nodes}
        for node in nodes:
            node.connect_peers(peers)
        primary = nodes[0]
        assignment = Assignment(
            epoch=Epoch(1),
            primary=NAMES[0],
            primary_incarnation=primary.incarnation,
            config=Config(Epoch(1), tuple(NAMES), ()),
        )
        for node in nodes:
            node.assign(SHARD, assignment)

        def activated() -> bool:
            host = primary.hosts.get(SHARD)
            return (
                host is not None and host.replica.lead is not None and host.replica.lead.activated
            )

        await wait_for(activated)
        client = await RpcClient.connect("127.0.0.1", primary.port)
        try:
            put = Put(
                request=RequestId(ClientId("test"), RequestSeq(1)),
                ushard=UShard(7),
                key=b"k",
                value=b"v1",
            )
            wrote = await call(client, WriteRequest(token=1, command=encode_command(put)))
            assert isinstance(wrote, WriteReply)
            assert isinstance(wrote.result, Applied)
            read = await call(
                client,
                ReadRequest(token=2, ushard=UShard(7), key=b"k", consistency=Consistency.STRONG),
            )
            assert isinstance(read, ReadReply)
            assert read.item is not None
            assert read.item.value == b"v1"
            target = wrote.result.version.seq
            await wait_for(
                lambda: all(
                    SHARD in n.hosts and n.hosts[SHARD].replica.applied_seq >= target for n in nodes
                )
            )
        finally:
            await client.close()
    finally:
        for node in nodes:
            await node.close()


def test_three_node_runtimes_replicate_a_quorum_write(tmp_path: Path) -> None:
    asyncio.run(scenario(tmp_path))


def test_a_data_directory_keeps_its_incarnation_and_a_wiped_one_gets_a_new_one(
    tmp_path: Path,
) -> None:
    first = load_incarnation(tmp_path)
    assert load_incarnation(tmp_path) == first
    (tmp_path / "INCARNATION").unlink()
    assert load_incarnation(tmp_path) != first
