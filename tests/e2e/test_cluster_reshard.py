"""Live resharding with real processes: `loom keyspace reshard ks --shards 4` grows a
keyspace from 2 to 4 p-shards while writers keep writing — no client-visible error,
every acknowledged write readable afterwards; also with a node killed (-9) and
restarted in the middle, and followed by a shrink to 1 p-shard (`--shards 1`), which
retires the other three."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from loom import kv
from loom.runtime.localcluster import LocalCluster
from loom.shardmgr.routing import compact_ranges

from .harness import Writer

USHARDS = 64


def loom_reshard(address: str, shards: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "loom.cli.main", "keyspace", "reshard", "ks"),
            *("--shards", str(shards), "-c", address),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=150,
    )


async def scenario(cluster: LocalCluster, *, kill_a_node: bool, shrink_to: int = 0) -> None:
    cluster.start_manager()
    for name in ("n1", "n2", "n3"):
        cluster.start_node(name)
    async with kv.connect(cluster.manager_address, timeout_s=30) as client:
        await client.create_keyspace("ks", shards=2, replication=3, ushards=USHARDS)
        writer = Writer(client.keyspace("ks"))
        tasks = [asyncio.create_task(writer.run(f"w{i}")) for i in range(4)]
        try:
            await asyncio.sleep(0.5)
            reshard = asyncio.create_task(
                asyncio.to_thread(loom_reshard, cluster.manager_address, 4)
            )
            if kill_a_node:
                await asyncio.sleep(1.0)
                cluster.kill("n2")
                await asyncio.sleep(1.0)
                cluster.restart("n2")
            done = await reshard
            assert done.returncode == 0, done.stderr[-2000:]
            assert "4 p-shards, resharded" in done.stdout
            assert "longest write pauses: μshard" in done.stdout
            if shrink_to:
                shrunk = await asyncio.to_thread(loom_reshard, cluster.manager_address, shrink_to)
                assert shrunk.returncode == 0, shrunk.stderr[-2000:]
                assert f"{shrink_to} p-shards, resharded" in shrunk.stdout
                print(shrunk.stdout.splitlines()[-1])
            await asyncio.sleep(0.5)
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        assert writer.errors == []
        assert len(writer.acked) > 50
        table = await client.routing()
        (keyspace,) = table.keyspaces
        assert len(keyspace.shards()) == (shrink_to or 4)
        assert keyspace.ranges == compact_ranges(USHARDS, keyspace.shards())
        # A shrink's retired p-shards are gone from the cluster.
        assert {s.shard for s in table.shards} == set(keyspace.shards())
        ks = writer.ks
        for start in range(0, len(writer.acked), 200):
            chunk = writer.acked[start : start + 200]
            items = await asyncio.gather(*(ks.get(k) for k in chunk))
            assert [i.value if i else None for i in items] == chunk


@pytest.mark.timeout(240)
def test_a_keyspace_reshards_from_2_to_4_under_writers_with_real_processes(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster, kill_a_node=False))
    finally:
        cluster.stop()


@pytest.mark.timeout(240)
def test_a_reshard_survives_a_node_killed_and_restarted_in_the_middle(tmp_path: Path) -> None:
    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster, kill_a_node=True))
    finally:
        cluster.stop()


@pytest.mark.timeout(240)
def test_a_keyspace_grows_to_4_then_shrinks_to_1_under_writers_with_the_cli(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster, kill_a_node=False, shrink_to=1))
    finally:
        cluster.stop()
