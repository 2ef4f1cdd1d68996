"""The etcd peer of `loom bench kv`: a real 3-member etcd cluster on 127.0.0.1 takes a
short YCSB run through the harness without errors, and is gone after stop."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from loom.benchmarks import ycsb
from loom.benchmarks.etcd_peer import EtcdCluster, EtcdDriver, EtcdDrivers

RECORDS = 200


def require_etcd() -> None:
    # Never skip: a missing peer is a broken setup, and it must be seen.
    if shutil.which("etcd") is None:
        pytest.fail(
            "etcd is not installed: `make test` installs Debian's etcd-server "
            "(apt-get install etcd-server)"
        )
    if importlib.util.find_spec("aetcd") is None:
        pytest.fail("the etcd client is not installed: pip install -e '.[bench]'")


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def scenario(tmp: Path) -> tuple[ycsb.Stats, tuple[int, ...], bytes | None]:
    async with EtcdCluster(tmp) as cluster:
        pids = cluster.pids
        assert len(pids) == 3
        assert all(is_running(pid) for pid in pids)
        drivers = await EtcdDrivers.for_cluster(cluster, "spread")
        await ycsb.load(drivers, RECORDS, 100, 8, seed=1)
        stats = await ycsb.run(
            drivers,
            ycsb.WORKLOADS["A"],
            clients=4,
            duration_s=1.0,
            records=RECORDS,
            value_bytes=100,
            seed=1,
            warmup_s=0.2,
        )
        leader = await EtcdDriver.connect(await cluster.leader())
        try:
            stored = await leader.get(ycsb.key_of(RECORDS - 1))
        finally:
            await leader.close()
    return stats, pids, stored


@pytest.mark.timeout(60)
def test_a_real_three_member_etcd_cluster_runs_workload_a_and_stops(tmp_path: Path) -> None:
    require_etcd()
    stats, pids, stored = asyncio.run(scenario(tmp_path))
    assert stats.ops > 0
    assert stats.reads > 0
    assert stats.updates > 0
    assert stats.errors == 0, stats.error_samples
    assert stored is not None
    assert len(stored) == 100
    assert not any(is_running(pid) for pid in pids)
    assert (tmp_path / "m1.log").stat().st_size > 0
