"""The placement commands as an operator runs them against real processes: `loom shard
transfer-primary` hands a primary over, `loom keyspace set-tier` moves a keyspace to a
dedicated tier with a progress bar and refuses a tier with too few nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loom.runtime.localcluster import LocalCluster

from .test_cli_cluster import loom


@pytest.mark.timeout(180)
def test_transfer_primary_and_set_tier_from_the_command_line(tmp_path: Path) -> None:
    cluster = LocalCluster(data_dir=tmp_path)
    try:
        cluster.start_manager()
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        for name in ("g1", "g2", "g3"):
            cluster.start_node(name, tier="gold")
        at = ("-c", cluster.manager_address)
        loom("keyspace", "create", "users", *at)
        loom("kv", "put", "users", "alice", "hello", *at)
        (shard,) = json.loads(loom("status", "--json", *at).stdout)["shards"]
        to = next(a for a in shard["acceptors"] if a != shard["primary"])

        moved = loom("shard", "transfer-primary", str(shard["id"]), "--to", to, *at)
        assert f"primary {to}" in moved.stdout
        refused = loom(
            "shard", "transfer-primary", str(shard["id"]), "--to", "g1", *at, check=False
        )
        assert refused.returncode != 0 and "InvalidArgument" in refused.stderr

        too_small = loom("keyspace", "set-tier", "users", "silver", *at, check=False)
        assert too_small.returncode != 0
        assert "tier 'silver' has 0 live node(s)" in too_small.stderr
        done = loom("keyspace", "set-tier", "users", "gold", *at)
        assert "tier gold (every replica on it)" in done.stdout
        status = json.loads(loom("status", "--json", *at).stdout)
        (shard,) = status["shards"]
        assert set(shard["acceptors"]) == {"g1", "g2", "g3"}
        assert shard["load_per_s"] >= 0
        tiers = {n["id"]: n["tier"] for n in status["nodes"]}
        assert tiers == {"n1": "wildcard", "n2": "wildcard", "n3": "wildcard"} | {
            g: "gold" for g in ("g1", "g2", "g3")
        }
        assert "gold" in loom("status", *at).stdout
        assert loom("kv", "get", "users", "alice", *at).stdout == "hello\n"
    finally:
        cluster.stop()
