"""Akkio placement with the latency matrix on, with real processes on 127.0.0.1 (a shard
manager in region a, nodes n1/n2/n3 in regions a/b/c): a μshard read mostly from region
b moves to the p-shard whose primary is in b, clients see no error during the move, and
afterwards `bounded(ms)` reads from b are answered by the node in b; a p-shard whose
accesses come mostly from b gets its primary handed to its replica in b."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from loom import kv
from loom.core.errors import LoomError
from loom.core.hashing import ushard_of
from loom.core.ids import ShardId
from loom.runtime.localcluster import LocalCluster
from loom.shardmgr.routing import RoutingTable

MATRIX = "a-b=20,a-c=30,b-c=25"
REGIONS = {"n1": "a", "n2": "b", "n3": "c"}
KEYSPACE = "near"
USHARDS = 6
MOVE_DEADLINE_S = 40.0
SM_ARGS = (
    *("--akkio-period", "0.5", "--akkio-accesses-min", "5", "--akkio-dwell", "60"),
    *("--balance-cooldown", "2"),
)


def owner(table: RoutingTable, ushard: int) -> ShardId:
    keyspace = next(k for k in table.keyspaces if k.name == KEYSPACE)
    return keyspace.shard_of(ushard)


def primary_region(table: RoutingTable, ushard: int) -> str:
    route = next(s for s in table.shards if s.shard == owner(table, ushard))
    return next(n.info.region for n in table.nodes if n.info.node == route.primary)


def moved_to_b(table: RoutingTable, ushard: int, source: ShardId) -> bool:
    """Moved off its first p-shard (not just a failover of it) to a primary in b."""
    return owner(table, ushard) != source and primary_region(table, ushard) == "b"


async def traffic(
    ks: kv.Keyspace,
    key: bytes,
    writes: bool,
    stop: asyncio.Event,
    errors: list[str],
    *,
    pause_s: float = 0.0,
) -> dict[bytes, bytes]:
    """Reads (and writes) of `key` until `stop`, `pause_s` apart; the last acknowledged
    write."""
    acked: dict[bytes, bytes] = {}
    for index in range(10**9):
        if stop.is_set():
            return acked
        try:
            if writes and index % 3 == 0:
                await ks.put(key, b"%d" % index)
                acked[key] = b"%d" % index
            else:
                await ks.get(key)
        except LoomError as error:
            errors.append(f"{type(error).__name__}: {error}")
        await asyncio.sleep(pause_s)
    return acked


def key_of(ushard: int) -> bytes:
    return next(k for k in (b"k%d" % i for i in range(10_000)) if ushard_of(k, USHARDS) == ushard)


async def scenario(cluster: LocalCluster) -> None:
    address = cluster.manager_address
    async with (
        kv.connect(address, region="b", latency=MATRIX, timeout_s=20.0) as in_b,
        kv.connect(address, region="a", latency=MATRIX, timeout_s=20.0) as in_a,
    ):
        await in_b.create_keyspace(KEYSPACE, shards=3, ushards=USHARDS, mapping="akkio")
        table = await in_b.routing()
        ushard = next(u for u in range(USHARDS) if primary_region(table, u) != "b")
        source = owner(table, ushard)
        key = key_of(ushard)
        # Another μshard of the same p-shard, busy from region a: the p-shard as a whole
        # has no home region, so it is this μshard that must move, not the primary.
        other = key_of(next(u for u in range(USHARDS) if u != ushard and owner(table, u) == source))
        errors: list[str] = []
        stop = asyncio.Event()
        ks_in_a = in_a.keyspace(KEYSPACE)
        tasks = [
            asyncio.create_task(traffic(in_b.keyspace(KEYSPACE), key, True, stop, errors)),
            # Region a reads the μshard now and then (a minority), and its neighbour a lot.
            asyncio.create_task(traffic(ks_in_a, key, False, stop, errors, pause_s=0.5)),
            asyncio.create_task(traffic(ks_in_a, other, True, stop, errors)),
        ]
        deadline = time.monotonic() + MOVE_DEADLINE_S
        try:
            while not moved_to_b(await in_b.routing(), ushard, source):
                assert time.monotonic() < deadline, "the μshard did not move to region b"
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # traffic goes on across the mapping change
        finally:
            stop.set()
            results = await asyncio.gather(*tasks)
        assert errors == []
        acked = results[0]
        ks_b = in_b.keyspace(KEYSPACE)
        item = await ks_b.get(key)
        assert item is not None and item.value == acked[key]
        # The keyspace record says akkio, and the mapping moved only this μshard's owner.
        info = next(k for k in (await in_b.routing()).keyspaces if k.name == KEYSPACE)
        assert info.spec.mapping == "akkio" and info.mapping_version > 1
        await in_b.router.refresh(force=True)
        for _ in range(10):
            await ks_b.get(key, consistency=kv.bounded(200))
            assert in_b.answered_by == "n2"  # the node in region b


def run_on_three_regions(tmp_path: Path, body) -> None:  # type: ignore[no-untyped-def]
    cluster = LocalCluster(data_dir=tmp_path, lease_ms=500.0, latency=MATRIX, manager_region="a")
    try:
        cluster.start_manager(extra=SM_ARGS)
        for name, region in REGIONS.items():
            cluster.start_node(name, region=region)
        asyncio.run(body(cluster))
    finally:
        with contextlib.suppress(Exception):
            cluster.stop()


@pytest.mark.timeout(90)
def test_a_ushard_read_mostly_from_b_moves_to_a_primary_in_b_without_client_errors(
    tmp_path: Path,
) -> None:
    run_on_three_regions(tmp_path, scenario)


async def primary_goes_home(cluster: LocalCluster) -> None:
    async with kv.connect(cluster.manager_address, region="b", latency=MATRIX) as in_b:
        # One p-shard, so no μshard can move: only its primary can come to b.
        await in_b.create_keyspace(KEYSPACE, shards=1, ushards=USHARDS, mapping="akkio")
        table = await in_b.routing()
        if primary_region(table, 0) == "b":  # placed in b already: hand it away first
            await in_b.transfer_primary(owner(table, 0), "n1")
        errors: list[str] = []
        stop = asyncio.Event()
        task = asyncio.create_task(traffic(in_b.keyspace(KEYSPACE), key_of(0), True, stop, errors))
        deadline = time.monotonic() + MOVE_DEADLINE_S
        try:
            while primary_region(await in_b.routing(), 0) != "b":
                assert time.monotonic() < deadline, "the primary did not come to region b"
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            acked = await task
        assert errors == []
        item = await in_b.keyspace(KEYSPACE).get(key_of(0))
        assert item is not None and item.value == acked[key_of(0)]


@pytest.mark.timeout(90)
def test_a_p_shard_used_mostly_from_b_gets_its_primary_in_b_without_client_errors(
    tmp_path: Path,
) -> None:
    run_on_three_regions(tmp_path, primary_goes_home)
