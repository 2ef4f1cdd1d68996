"""`loom sm` and `loom node` as real processes on 127.0.0.1: a shard is placed, a QUORUM
write is acknowledged, the primary is killed with SIGKILL, and writes succeed again on
another node while the acknowledged write is still there."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from loom.core.ids import ClientId, NodeId, RequestId, RequestSeq, ShardId, UShard
from loom.host.requests import (
    Consistency,
    ErrorReply,
    ReadReply,
    ReadRequest,
    WriteReply,
    WriteRequest,
)
from loom.kvstate.commands import Applied, Put, encode_command
from loom.runtime.codec import ClientAnswer, ClientCall, CreateShard, decode, encode
from loom.runtime.localcluster import LocalCluster
from loom.runtime.rpc import RpcClient

SHARD = ShardId(0)


async def ask(port: int, request: WriteRequest | ReadRequest) -> object:
    async with await RpcClient.connect("127.0.0.1", port) as client:
        body = await client.call(encode(ClientCall(shard=SHARD, request=request)), timeout_s=5)
    answer = decode(body)
    assert isinstance(answer, ClientAnswer)
    return answer.reply


async def write_anywhere(ports: dict[str, int], seq: int, value: bytes) -> tuple[str, WriteReply]:
    """What a client library does: try the nodes until the primary accepts (deadline)."""
    put = Put(
        request=RequestId(ClientId("e2e"), RequestSeq(seq)), ushard=UShard(1), key=b"k", value=value
    )
    request = WriteRequest(token=seq, command=encode_command(put))
    async with asyncio.timeout(15):
        while True:
            for name, port in sorted(ports.items()):
                try:
                    reply = await ask(port, request)
                except Exception:  # noqa: BLE001 - a dead or busy node: try the next
                    continue
                if isinstance(reply, WriteReply) and isinstance(reply.result, Applied):
                    return name, reply
                assert isinstance(reply, ErrorReply | WriteReply), reply
            await asyncio.sleep(0.05)


async def scenario(tmp: Path) -> None:
    cluster = LocalCluster(data_dir=tmp, lease_ms=500.0)
    try:
        sm_port = cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        ports = {name: cluster.ports[name] for name in ("n1", "n2", "n3")}
        create = CreateShard(shard=SHARD, acceptors=(NodeId("n1"), NodeId("n2"), NodeId("n3")))
        async with asyncio.timeout(10):
            while True:  # the manager learns of the nodes from their first reports
                try:
                    async with await RpcClient.connect("127.0.0.1", sm_port) as admin:
                        await admin.call(encode(create), timeout_s=5)
                    break
                except Exception:  # noqa: BLE001 - nodes not known yet
                    await asyncio.sleep(0.1)

        primary, _ = await write_anywhere(ports, 1, b"before")
        cluster.kill(primary)
        del ports[primary]
        killed_at = time.monotonic()
        survivor, _ = await write_anywhere(ports, 2, b"after")
        recovered_s = time.monotonic() - killed_at
        assert survivor != primary
        assert recovered_s < 10, recovered_s
        read = await ask(
            ports[survivor],
            ReadRequest(token=3, ushard=UShard(1), key=b"k", consistency=Consistency.STRONG),
        )
        assert isinstance(read, ReadReply)
        assert read.item is not None
        assert read.item.value == b"after"

        status_run = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "loom.cli.main",
                "status",
                "--sm",
                f"127.0.0.1:{sm_port}",
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        status = json.loads(status_run.stdout)
        (shard,) = status["shards"]
        assert shard["primary"] == survivor
        assert shard["activated"] is True
        alive = {node["node"]: node["alive"] for node in status["nodes"]}
        assert alive[survivor] is True
    finally:
        cluster.stop()


def test_writes_resume_on_another_node_after_the_primary_is_killed(tmp_path: Path) -> None:
    asyncio.run(scenario(tmp_path))
