"""Live resharding with real runtimes on 127.0.0.1 (a shard manager and three nodes in
one process, real sockets and RocksDB): a keyspace grows from 2 to 4 p-shards while a
writer keeps writing; the writer sees no error, every acknowledged write is there
afterwards, and each μshard ends on the p-shard of the compact mapping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from loom import kv
from loom.core.errors import LoomError
from loom.core.ids import NodeId
from loom.paxos.params import ReplicaParams
from loom.runtime.manager import ManagerRuntime
from loom.runtime.metastore_file import FileMetastore
from loom.runtime.node import NodeRuntime
from loom.shardmgr.core import SmParams
from loom.shardmgr.routing import compact_ranges

PARAMS = ReplicaParams(lease_ms=300.0, heartbeat_interval_ms=30.0, probe_interval_ms=30.0)
SM_PARAMS = SmParams(failure_timeout_ms=1000.0, announce_interval_ms=200.0)
NAMES = (NodeId("n1"), NodeId("n2"), NodeId("n3"))
USHARDS = 32
KEYS = tuple(b"key-%d" % i for i in range(40))


async def wait_for(condition: Callable[[], bool], *, timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the state lives in other tasks
            await asyncio.sleep(0.02)


async def write_until(
    ks: kv.Keyspace, stop: asyncio.Event, acked: dict[bytes, bytes], errors: list[str]
) -> int:
    """Puts to every key in turn, and increments one counter, until `stop`."""
    round_no = 0
    counter = 0
    while not stop.is_set():
        round_no += 1
        for key in KEYS:
            value = b"%d" % round_no
            try:
                await ks.put(key, value)
                acked[key] = value
                await ks.increment(b"counter", 1)
                counter += 1
            except LoomError as error:
                errors.append(f"{key!r}: {type(error).__name__}: {error}")
    return counter


def test_a_keyspace_reshards_from_2_to_4_pshards_under_writes_without_errors(
    tmp_path: Path,
) -> None:
    asyncio.run(scenario(tmp_path))


async def scenario(tmp: Path) -> None:
    (tmp / "sm").mkdir()
    manager = ManagerRuntime(
        metastore=FileMetastore(tmp / "sm" / "metastore.json"),
        params=SM_PARAMS,
        reshard_parallelism=4,
    )
    await manager.start()
    nodes = {n: NodeRuntime(node=n, data_dir=tmp / n, params=PARAMS) for n in NAMES}
    client: kv.Client | None = None
    try:
        for node in nodes.values():
            await node.start()
            node.connect_manager("127.0.0.1", manager.port)
        await wait_for(lambda: set(NAMES) <= set(manager.infos))
        client = await kv.connect(f"127.0.0.1:{manager.port}", timeout_s=15)
        before = await client.create_keyspace("ks", shards=2, replication=3, ushards=USHARDS)
        ks = client.keyspace("ks")
        acked: dict[bytes, bytes] = {}
        errors: list[str] = []
        stop = asyncio.Event()
        writer = asyncio.create_task(write_until(ks, stop, acked, errors))
        await asyncio.sleep(0.5)
        reports: list[tuple[int, int]] = []
        after = await client.reshard_keyspace(
            "ks", shards=4, progress=lambda done, total: reports.append((done, total))
        )
        await asyncio.sleep(0.3)
        stop.set()
        increments = await writer

        assert errors == []
        assert len(after.shards()) == 4 and after.shards()[:2] == before.shards()
        assert after.ranges == compact_ranges(USHARDS, after.shards())
        assert after.mapping_version > before.mapping_version
        assert reports and reports[-1] == (USHARDS, USHARDS)
        for key, value in sorted(acked.items()):
            item = await ks.get(key)
            assert item is not None and item.value == value, key
        counter = await ks.get(b"counter")
        assert counter is not None and int.from_bytes(counter.value, "big") == increments
        assert increments > 0
        # The new p-shards serve the μshards they received.
        moved = {after.shard_of(u) for u in range(USHARDS)}
        assert moved == set(after.shards())
        assert manager.resharder.pending("ks") == 0
    finally:
        if client is not None:
            await client.close()
        for node in nodes.values():
            await node.close()
        await manager.close()


def test_a_keyspace_reshards_again_after_the_manager_restarts(tmp_path: Path) -> None:
    """Move ids come from the metastore, so a restarted manager's moves are above every
    earlier one (the replicas refuse a move id they have seen)."""
    asyncio.run(restart_scenario(tmp_path))


async def restart_scenario(tmp: Path) -> None:
    (tmp / "sm").mkdir()

    def new_manager(port: int = 0) -> ManagerRuntime:
        metastore = FileMetastore(tmp / "sm" / "metastore.json")
        return ManagerRuntime(metastore=metastore, params=SM_PARAMS, port=port)

    manager = new_manager()
    await manager.start()
    nodes = {n: NodeRuntime(node=n, data_dir=tmp / n, params=PARAMS) for n in NAMES}
    client: kv.Client | None = None
    try:
        for node in nodes.values():
            await node.start()
            node.connect_manager("127.0.0.1", manager.port)
        await wait_for(lambda: set(NAMES) <= set(manager.infos))
        client = await kv.connect(f"127.0.0.1:{manager.port}", timeout_s=15)
        await client.create_keyspace("ks", shards=1, replication=3, ushards=8)
        ks = client.keyspace("ks")
        for key in KEYS[:10]:
            await ks.put(key, b"v1-" + key)
        first = await client.reshard_keyspace("ks", shards=2)
        port = manager.port
        await manager.close()
        manager = new_manager(port)
        await manager.start()
        await wait_for(lambda: set(NAMES) <= set(manager.infos))
        assert manager.keyspaces["ks"].ranges == first.ranges  # the mapping was stored
        second = await client.reshard_keyspace("ks", shards=3)
        assert second.ranges == compact_ranges(8, second.shards())
        for key in KEYS[:10]:
            item = await ks.get(key)
            assert item is not None and item.value == b"v1-" + key
            await ks.put(key, b"v2")
    finally:
        if client is not None:
            await client.close()
        for node in nodes.values():
            await node.close()
        await manager.close()


def test_a_reshard_resumes_after_the_manager_restarts_in_the_middle(tmp_path: Path) -> None:
    """The mover's work is stored before it acts: a new manager on the same metastore
    finishes the moves under way and the plan, while a writer sees no error."""
    asyncio.run(resume_scenario(tmp_path))


async def resume_scenario(tmp: Path) -> None:
    (tmp / "sm").mkdir()

    def new_manager(port: int = 0) -> ManagerRuntime:
        metastore = FileMetastore(tmp / "sm" / "metastore.json")
        return ManagerRuntime(
            metastore=metastore, params=SM_PARAMS, port=port, reshard_parallelism=2
        )

    manager = new_manager()
    await manager.start()
    nodes = {n: NodeRuntime(node=n, data_dir=tmp / n, params=PARAMS) for n in NAMES}
    client: kv.Client | None = None
    try:
        for node in nodes.values():
            await node.start()
            node.connect_manager("127.0.0.1", manager.port)
        await wait_for(lambda: set(NAMES) <= set(manager.infos))
        client = await kv.connect(f"127.0.0.1:{manager.port}", timeout_s=15)
        before = await client.create_keyspace("ks", shards=2, replication=3, ushards=USHARDS)
        ks = client.keyspace("ks")
        acked: dict[bytes, bytes] = {}
        errors: list[str] = []
        stop = asyncio.Event()
        writer = asyncio.create_task(write_until(ks, stop, acked, errors))
        await client.reshard_keyspace("ks", shards=4, wait=False)
        first = manager
        await wait_for(lambda: first.keyspaces["ks"].mapping_version >= before.mapping_version + 3)
        assert first.resharder.pending("ks") > 0  # interrupted in the middle
        port = manager.port
        await manager.close()
        manager = new_manager(port)
        await manager.start()
        second = manager
        await wait_for(
            lambda: (
                second.keyspaces["ks"].ranges
                == compact_ranges(USHARDS, second.keyspaces["ks"].shards())
            ),
            timeout_s=60,
        )
        await asyncio.sleep(0.3)
        stop.set()
        await writer
        assert errors == []
        for key, value in sorted(acked.items()):
            item = await ks.get(key)
            assert item is not None and item.value == value, key
    finally:
        if client is not None:
            await client.close()
        for node in nodes.values():
            await node.close()
        await manager.close()
