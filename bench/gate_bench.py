"""What the node's per-request tenancy checks cost: the token check (`AuthGate`) and the
quota check (`QuotaGate`) that every client call passes on the event loop before it is
queued (ADR 0008). A measurement, never a test.

    .venv/bin/python -m bench.gate_bench [--requests 200000]

A routing table with one 8-p-shard keyspace owned by a tenant, 1 000 token grants, and
quotas far above what the loop offers (every request admitted: the common case). Also
one SHA-256 of a secret, the cost of the first request with a token a node has not
seen.
"""

from __future__ import annotations

import argparse
import time

from loom.core.ids import NodeId, ShardId, UShard
from loom.host.requests import ReadRequest
from loom.runtime.auth_gate import AuthGate
from loom.runtime.quota_gate import QuotaGate
from loom.shardmgr.routing import (
    Keyspace,
    KeyspaceSpec,
    Quota,
    RoutingTable,
    ShardPlacement,
    ShardRoute,
    compact_ranges,
)
from loom.shardmgr.tenancy import TokenGrant, digest

NODE = NodeId("a")
GRANTS = 1000


def _table() -> RoutingTable:
    shards = [ShardId(i) for i in range(1, 9)]
    keyspace = Keyspace(
        spec=KeyspaceSpec(name="ks", shards=len(shards)),
        placements=tuple(ShardPlacement(s, (NODE,)) for s in shards),
        ranges=compact_ranges(4096, shards),
        tenant="acme",
        quota=Quota(reads_per_s=1e9, writes_per_s=1e9),
    )
    return RoutingTable(
        version=(1, 1),
        keyspaces=(keyspace,),
        shards=tuple(
            ShardRoute(shard=s, keyspace="ks", epoch=1, primary=NODE, acceptors=(NODE,))
            for s in shards
        ),
        nodes=(),
        auth=True,
        tokens=tuple(TokenGrant(digest=digest(f"loom_{i}"), tenant="acme") for i in range(GRANTS)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    count = max(1, parser.parse_args().requests)
    table = _table()
    auth = AuthGate(required=True)
    auth.on_routing(table)
    quotas = QuotaGate(NODE)
    quotas.on_routing(table, time.monotonic() * 1000)
    read = ReadRequest(token=1, ushard=UShard(0), key=b"k")
    secret = "loom_7"
    began = time.perf_counter()
    for _ in range(count):
        refused = auth.check(ShardId(1), read, secret) or quotas.check(
            ShardId(1), read, time.monotonic() * 1000
        )
        assert refused is None
    per_request_us = (time.perf_counter() - began) / count * 1e6
    began = time.perf_counter()
    for i in range(10_000):
        digest(f"loom_unseen_{i}")
    per_digest_us = (time.perf_counter() - began) / 10_000 * 1e6
    print(f"token + quota check: {per_request_us:.2f} µs per request ({count} requests)")
    print(f"first sight of a token (one SHA-256): {per_digest_us:.2f} µs")


if __name__ == "__main__":
    main()
