"""A node on 127.0.0.1 that has not heard from a shard manager yet: without auth it says
it has no routing table; started with `--auth` it serves no client and no table until a
table with auth arrives (it must not be the open door while the manager is away)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from loom.core.ids import NodeId, ShardId, UShard
from loom.host.requests import ErrorCode, ErrorReply, ReadRequest
from loom.paxos.params import ReplicaParams
from loom.runtime.codec import ClientAnswer, ClientCall, Failure, RoutingRequest, decode, encode
from loom.runtime.node import NodeRuntime
from loom.runtime.rpc import RpcClient

READ = ReadRequest(token=1, ushard=UShard(0), key=b"k")


async def ask(port: int, message: ClientCall | RoutingRequest) -> object:
    async with await RpcClient.connect("127.0.0.1", port) as rpc:
        return decode(await rpc.call(encode(message), timeout_s=5))


async def scenario(tmp: Path) -> None:
    open_node = NodeRuntime(node=NodeId("n1"), data_dir=tmp / "n1", params=ReplicaParams())
    closed_node = NodeRuntime(
        node=NodeId("n2"), data_dir=tmp / "n2", params=ReplicaParams(), auth=True
    )
    for node in (open_node, closed_node):
        await node.start()
    try:
        no_table = await ask(open_node.port, RoutingRequest())
        assert isinstance(no_table, Failure) and no_table.kind == "unavailable", no_table

        refused = await ask(closed_node.port, RoutingRequest(auth="loom_anything"))
        assert isinstance(refused, Failure) and refused.kind == "permission", refused
        answer = await ask(closed_node.port, ClientCall(shard=ShardId(1), request=READ))
        assert isinstance(answer, ClientAnswer) and isinstance(answer.reply, ErrorReply)
        assert answer.reply.code is ErrorCode.NOT_READY
    finally:
        for node in (open_node, closed_node):
            await node.close()


def test_a_node_without_a_routing_table_serves_no_table_and_with_auth_no_client(
    tmp_path: Path,
) -> None:
    asyncio.run(scenario(tmp_path))
