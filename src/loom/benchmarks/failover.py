"""`loom bench failover`: kill the primary of a 3-node cluster of real processes while a
client writes, and measure how long until writes succeed again; count acknowledged
writes that are gone afterwards (there must be none)."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from loom.core.errors import LoomError
from loom.core.ids import ClientId, NodeId, RequestId, RequestSeq, ShardId, UShard
from loom.host.requests import Consistency, ReadReply, ReadRequest, WriteReply, WriteRequest
from loom.kvstate.commands import Applied, Put, encode_command
from loom.runtime.codec import ClientAnswer, ClientCall, CreateShard, decode, encode
from loom.runtime.localcluster import LocalCluster
from loom.runtime.rpc import RpcClient

SHARD = ShardId(0)
NODES = ("n1", "n2", "n3")
RECOVERY_DEADLINE_S = 30.0
WRITES_BEFORE_KILL = 50


async def _ask(port: int, request: WriteRequest | ReadRequest) -> object:
    async with await RpcClient.connect("127.0.0.1", port) as client:
        body = await client.call(encode(ClientCall(shard=SHARD, request=request)), timeout_s=2)
    answer = decode(body)
    return answer.reply if isinstance(answer, ClientAnswer) else None


async def _write(ports: dict[str, int], seq: int) -> str:
    """Writes key k<seq>, trying nodes until one (the primary) acknowledges it."""
    put = Put(
        request=RequestId(ClientId("bench"), RequestSeq(seq)),
        ushard=UShard(seq % 4096),
        key=b"k%d" % seq,
        value=b"v%d" % seq,
    )
    request = WriteRequest(token=seq, command=encode_command(put))
    async with asyncio.timeout(RECOVERY_DEADLINE_S):
        while True:
            for name, port in sorted(ports.items()):
                try:
                    reply = await _ask(port, request)
                except LoomError:
                    continue
                if isinstance(reply, WriteReply) and isinstance(reply.result, Applied):
                    return name
            await asyncio.sleep(0.01)


async def _is_stored(port: int, seq: int) -> bool:
    request = ReadRequest(
        token=seq, ushard=UShard(seq % 4096), key=b"k%d" % seq, consistency=Consistency.STRONG
    )
    reply = await _ask(port, request)
    return isinstance(reply, ReadReply) and reply.item is not None


async def _trial(data_dir: Path, lease_ms: float) -> tuple[float, int]:
    cluster = LocalCluster(data_dir=data_dir, lease_ms=lease_ms)
    try:
        sm_port = cluster.start_manager()
        for name in NODES:
            cluster.start_node(name)
        create = CreateShard(shard=SHARD, acceptors=tuple(NodeId(n) for n in NODES))
        async with asyncio.timeout(RECOVERY_DEADLINE_S):
            while True:
                try:
                    async with await RpcClient.connect("127.0.0.1", sm_port) as admin:
                        await admin.call(encode(create), timeout_s=2)
                    break
                except LoomError:
                    await asyncio.sleep(0.05)
        node_ports = {n: cluster.ports[n] for n in NODES}
        primary = ""
        for seq in range(1, WRITES_BEFORE_KILL + 1):
            primary = await _write(node_ports, seq)
        cluster.kill(primary)
        del node_ports[primary]
        killed_at = time.monotonic()
        survivor = await _write(node_ports, WRITES_BEFORE_KILL + 1)
        recovered_s = time.monotonic() - killed_at
        port = node_ports[survivor]
        lost = 0
        for seq in range(1, WRITES_BEFORE_KILL + 2):
            if not await _is_stored(port, seq):
                lost += 1
        return recovered_s, lost
    finally:
        cluster.stop()


async def run_failover(*, trials: int, lease_ms: float) -> dict[str, object]:
    results = []
    for _ in range(trials):
        with tempfile.TemporaryDirectory(prefix="loom-failover-") as tmp:
            results.append(await _trial(Path(tmp), lease_ms))
    times = [round(t, 3) for t, _ in results]
    return {
        "trials_s": times,
        "median_s": round(statistics.median(times), 3),
        "max_s": max(times),
        "lost_writes": sum(lost for _, lost in results),
        "lease_ms": lease_ms,
    }
