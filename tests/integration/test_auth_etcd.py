"""`loom sm --auth --etcd …`: a manager that leads only after an election (it starts as
a standby) still prints the admin token it makes when it first leads — once."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from loom import kv
from loom.runtime.localcluster import LocalCluster

from .etcd_cluster import EtcdCluster

TOKEN = re.compile(r"admin token: (loom_\S+)")


@pytest.mark.timeout(120)
def test_an_elected_manager_prints_the_admin_token_it_made(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    endpoints = ",".join(e.removeprefix("http://") for e in etcd.endpoints)
    cluster = LocalCluster(data_dir=tmp_path, auth=True)
    try:
        cluster.start_manager("sm1", etcd=endpoints)
        assert cluster.admin_token is None  # not leading yet when it said it listens
        stdout = cluster.processes["sm1"].stdout
        assert stdout is not None
        match = TOKEN.search(stdout.readline())  # printed once elected
        assert match is not None
        token = match.group(1)

        async def use() -> None:
            async with kv.connect(cluster.manager_address, token=token) as admin:
                assert [t.name for t in await admin.tenants()] == ["admin"]

        asyncio.run(use())
    finally:
        cluster.stop()
