"""The `loom` CLI against real processes: `loom keyspace …`, `loom kv …` and
`loom status --json`, as a person (or a script) would use them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loom.runtime.localcluster import LocalCluster


def loom(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loom.cli.main", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


@pytest.mark.timeout(180)
def test_keyspaces_keys_and_status_from_the_command_line(tmp_path: Path) -> None:
    cluster = LocalCluster(data_dir=tmp_path)
    try:
        cluster.start_manager()
        for index, name in enumerate(("n1", "n2", "n3")):
            cluster.start_node(name, region="abc"[index])
        at = ("-c", cluster.manager_address)

        created = loom("keyspace", "create", "users", "--shards", "2", *at)
        assert "2 p-shards ready" in created.stdout
        assert loom("kv", "put", "users", "alice", "hello", *at).stdout.strip()
        assert loom("kv", "get", "users", "alice", *at).stdout == "hello\n"
        missing = loom("kv", "get", "users", "bob", *at, check=False)
        assert missing.returncode == 1
        assert "not found" in missing.stderr
        assert loom("kv", "incr", "users", "visits", "3", *at).stdout == "3\n"
        assert loom("kv", "incr", "users", "visits", *at).stdout == "4\n"
        for key in ("u1/a", "u1/b", "u1/c"):
            loom("kv", "put", "users", key, key.upper(), "--shard-key", "u1", *at)
        scan = loom("kv", "scan", "users", "--shard-key", "u1", "--prefix", "u1/", "--json", *at)
        assert [i["key"] for i in json.loads(scan.stdout)] == ["u1/a", "u1/b", "u1/c"]
        conflict = loom("kv", "put", "users", "alice", "again", "--if-absent", *at, check=False)
        assert conflict.returncode != 0
        assert "ConditionFailed" in conflict.stderr
        bounded = loom("kv", "get", "users", "alice", "--consistency", "bounded:200", *at)
        assert bounded.stdout == "hello\n"
        bad = loom("kv", "get", "users", "alice", "--consistency", "soon", *at, check=False)
        assert bad.returncode == 2

        listed = json.loads(loom("keyspace", "list", "--json", *at).stdout)
        assert [k["name"] for k in listed] == ["users"]
        described = json.loads(loom("keyspace", "describe", "users", "--json", *at).stdout)
        assert [s["ushards"] for s in described["shards"]] == [[0, 2047], [2048, 4095]]
        regions_of = {n: r for n, r in zip(("n1", "n2", "n3"), "abc", strict=True)}
        for shard in described["shards"]:
            # Placement spreads each p-shard's replicas over the three regions.
            assert sorted(regions_of[a] for a in shard["acceptors"]) == ["a", "b", "c"]

        status = json.loads(loom("status", "--json", *at).stdout)
        nodes = {n["id"]: n for n in status["nodes"]}
        assert set(nodes) == {"n1", "n2", "n3"}
        for name, node in nodes.items():
            assert node["alive"] is True
            assert node["pid"] == cluster.pid(name)
            assert node["region"] == regions_of[name]
            assert node["address"] == f"127.0.0.1:{cluster.ports[name]}"
        assert len(status["shards"]) == 2
        for shard in status["shards"]:
            assert shard["keyspace"] == "users"
            assert sorted(shard["members"]) == ["n1", "n2", "n3"]
            assert shard["primary"] in shard["members"]
            assert shard["epoch"] >= 1
            assert shard["applied_seq"] >= 1

        dropped = loom("keyspace", "drop", "users", "--yes", *at)
        assert "dropped" in dropped.stdout
        gone = loom("kv", "get", "users", "alice", *at, check=False)
        assert "NotFound" in gone.stderr
    finally:
        cluster.stop()
