"""Several shard managers, as real processes: an etcd-backed pair fails over when its
leader is killed (the data path never stops), and two managers that both believe they
lead (sharing one file metastore, no election) still never hand out one epoch twice."""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from pathlib import Path

import pytest

from loom import kv
from loom.runtime.localcluster import LocalCluster

from .etcd_cluster import EtcdCluster

NODES = ("n1", "n2", "n3")
ASSIGNED = re.compile(r"p-shard (\d+) epoch (\d+) primary (\S+) acceptors (\S+)")


async def leader_name(client: kv.Client, cluster: LocalCluster) -> str:
    table = await client.routing()
    (name,) = [m for m in cluster.managers if f"127.0.0.1:{cluster.ports.get(m)}" == table.manager]
    return name


async def put_all(ks: kv.Keyspace, prefix: str, count: int) -> list[bytes]:
    keys = [f"{prefix}:{i}".encode() for i in range(count)]
    for key in keys:
        await ks.put(key, key)
    return keys


async def assert_all_there(ks: kv.Keyspace, keys: list[bytes]) -> None:
    items = await asyncio.gather(*(ks.get(k) for k in keys))
    assert [i.value if i else None for i in items] == keys


@pytest.mark.timeout(180)
def test_an_etcd_backed_manager_pair_fails_over(tmp_path: Path, etcd: EtcdCluster) -> None:
    endpoints = ",".join(e.removeprefix("http://") for e in etcd.endpoints)

    async def scenario(cluster: LocalCluster) -> None:
        cluster.start_manager("sm1", etcd=endpoints)
        cluster.start_manager("sm2", etcd=endpoints)
        for name in NODES:
            cluster.start_node(name)
        async with kv.connect(cluster.manager_address, timeout_s=30) as client:
            await client.create_keyspace("ks", shards=2, replication=3)
            ks = client.keyspace("ks")
            keys = await put_all(ks, "before", 20)
            leader = await leader_name(client, cluster)
            cluster.kill(leader)  # its etcd lease expires; the standby takes over
            killed_at = time.monotonic()
            keys += await put_all(ks, "no-leader", 20)  # the data path does not wait
            await client.create_keyspace("other", shards=1, replication=3)  # needs a leader
            took_over_s = time.monotonic() - killed_at
            survivor = await leader_name(client, cluster)
            assert survivor != leader
            # The new leader manages failover: kill the primary of a p-shard of "ks".
            table = await client.routing()
            route = next(s for s in table.shards if s.keyspace == "ks")
            cluster.kill(route.primary)
            keys += await put_all(ks, "after", 40)
            await assert_all_there(ks, keys)
            assert took_over_s < 20, took_over_s

    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()


@pytest.mark.timeout(180)
def test_two_managers_that_both_lead_never_hand_out_one_epoch_twice(tmp_path: Path) -> None:
    shared = tmp_path / "shared-metastore"

    async def scenario(cluster: LocalCluster) -> None:
        cluster.start_manager("sm1", data=shared)
        for name in NODES:
            cluster.start_node(name)
        async with kv.connect(cluster.manager_address, timeout_s=30) as client:
            await client.create_keyspace("ks", shards=1, replication=3)
            ks = client.keyspace("ks")
            keys = await put_all(ks, "before", 10)
            # A second manager on the same metastore: it loads the keyspace and acts on
            # it too. The nodes report to sm1 only, so restart them towards both.
            cluster.start_manager("sm2", data=shared)
            for name in NODES:
                cluster.stop([name])
                cluster.commands[name][cluster.commands[name].index("--sm") + 1] = (
                    cluster.manager_address
                )
                cluster.restart(name)
            await assert_all_there(ks, keys)
            primary = (await client.routing()).shards[0].primary
            cluster.kill(primary)  # both managers fail over at once
            await asyncio.sleep(6)  # several failure detections and activation timeouts
            cluster.stop(["sm2"])  # let one manager settle the shard
            keys += await put_all(ks, "after", 10)
            await assert_all_there(ks, keys)

    cluster = LocalCluster(data_dir=tmp_path)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()
    announced: dict[tuple[int, int], set[tuple[str, str]]] = defaultdict(set)
    for name in NODES:
        for match in ASSIGNED.finditer((tmp_path / "logs" / f"{name}.log").read_text()):
            shard, epoch, primary, acceptors = match.groups()
            announced[int(shard), int(epoch)].add((primary, acceptors))
    assert len(announced) >= 2, announced  # the failover happened
    twice = {k: v for k, v in announced.items() if len(v) > 1}
    assert not twice, f"one epoch with two assignments: {twice}"
