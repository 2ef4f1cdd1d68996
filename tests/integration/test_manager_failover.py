"""A shard manager and three node runtimes in one process on 127.0.0.1, driven through
the client library: a keyspace is placed, its epoch persisted by compare-and-swap
before it is announced, and the manager fails over when the primary's node stops; an
acknowledged QUORUM write survives and writes go on — also across a manager restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from loom import kv
from loom.core.ids import NodeId
from loom.paxos.params import ReplicaParams
from loom.runtime.manager import ManagerRuntime, decode_record, epoch_key
from loom.runtime.metastore_file import FileMetastore
from loom.runtime.node import NodeRuntime
from loom.shardmgr.core import SmParams

PARAMS = ReplicaParams(lease_ms=300.0, heartbeat_interval_ms=30.0, probe_interval_ms=30.0)
SM_PARAMS = SmParams(failure_timeout_ms=400.0, announce_interval_ms=200.0)
NAMES = (NodeId("n1"), NodeId("n2"), NodeId("n3"))


async def wait_for(condition: Callable[[], bool], *, timeout_s: float = 15.0) -> None:
    """Polls a condition with a deadline (the state lives in other tasks and threads)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - no event to wait on across the thread
            await asyncio.sleep(0.02)


def new_manager(tmp: Path, port: int = 0) -> ManagerRuntime:
    metastore = FileMetastore(tmp / "sm" / "metastore.json")
    return ManagerRuntime(metastore=metastore, params=SM_PARAMS, port=port)


async def scenario(tmp: Path, *, restart_manager: bool) -> None:
    (tmp / "sm").mkdir()
    manager = new_manager(tmp)
    await manager.start()
    nodes = {n: NodeRuntime(node=n, data_dir=tmp / n, params=PARAMS) for n in NAMES}
    client: kv.Client | None = None
    try:
        for node in nodes.values():
            await node.start()
            node.connect_manager("127.0.0.1", manager.port)
        await wait_for(lambda: set(NAMES) <= set(manager.infos))
        client = await kv.connect(f"127.0.0.1:{manager.port}", timeout_s=15)
        info = await client.create_keyspace("ks", shards=1, replication=3)
        (shard,) = info.shards()
        ks = client.keyspace("ks")
        await ks.put(b"k", b"before")
        assert manager.metastore.get(epoch_key(shard)) is not None
        first = manager.core.shards[shard].current.primary

        if restart_manager:
            # A new manager on the same metastore and address goes on from the record.
            port, epoch = manager.port, manager.core.shards[shard].current.epoch
            await manager.close()
            manager = new_manager(tmp, port)
            await manager.start()
            restored = manager.core.shards[shard]
            assert restored.current.epoch == epoch
            assert restored.activated
            assert "ks" in manager.keyspaces
            await wait_for(lambda: set(NAMES) <= set(manager.infos))

        await nodes.pop(first).close()  # the primary's node stops
        await ks.put(b"k2", b"after")  # the client finds the new primary by itself
        second = manager.core.shards[shard].current.primary
        assert second != first
        item = await ks.get(b"k")
        assert item is not None
        assert item.value == b"before"
        stored = manager.metastore.get(epoch_key(shard))
        assert stored is not None
        assert decode_record(stored[0]).assignment == manager.core.shards[shard].current
    finally:
        if client is not None:
            await client.close()
        for node in nodes.values():
            await node.close()
        await manager.close()


def test_manager_fails_over_when_the_primary_node_stops(tmp_path: Path) -> None:
    asyncio.run(scenario(tmp_path, restart_manager=False))


def test_a_restarted_manager_keeps_its_keyspaces_and_still_fails_over(tmp_path: Path) -> None:
    asyncio.run(scenario(tmp_path, restart_manager=True))
