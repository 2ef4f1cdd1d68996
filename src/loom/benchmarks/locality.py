"""`loom bench locality`: Akkio placement makes remote μshards local (ADR 0013).

A local cluster of real processes in three regions (n1 in a, n2 in b, n3 in c; the
shard manager in a) with the latency matrix injected; one `mapping: akkio` keyspace of
three p-shards, whose primaries the placement spreads over the three nodes. A client in
region b reads μshards whose p-shard's primary is elsewhere:

1. before: p50/p99 of STRONG reads and of `bounded(ms)` reads from b (sequential), and
   the region of the node that answered each;
2. the client keeps reading and writing those μshards; the nodes count the accesses by
   region, the shard manager moves each μshard to the p-shard whose primary is in b
   (progress printed as they arrive);
3. after: the same measurements.

With a bound below the round trip from b to a remote primary, a replica in b cannot
prove it is fresh enough before the move; after it, the primary in b serves both.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from loom import kv
from loom.core.errors import LoomError
from loom.core.hashing import ushard_of
from loom.core.ids import NodeId, ShardId
from loom.kv.options import ReadConsistency
from loom.runtime.localcluster import LocalCluster
from loom.shardmgr.routing import RoutingTable

KEYSPACE = "locality"
MATRIX = "a-b=40,a-c=60,b-c=50"
REGIONS = {"n1": "a", "n2": "b", "n3": "c"}
CLIENT_REGION = "b"
USHARDS = 12
SAMPLES_DEFAULT = 100
SAMPLES_MAX = 10_000
BOUND_MS_DEFAULT = 50.0
MOVE_DEADLINE_S = 120.0
# The shard manager's Akkio settings for the benchmark: decide every second; a μshard
# moves once it has 50 decayed accesses (10 s half-life: about 3.5 accesses/s held),
# 2/3 of them from one region. The "before" reads are sequential and each takes a
# round trip of at least 80 ms to a remote primary, so they reach at most 12.5/s over
# all 8 μshards (≤ 23 decayed accesses each, whatever --samples): they cannot trigger
# a move. The loaders of the waiting phase (LOADERS concurrent) can.
SM_ARGS = ("--akkio-period", "1", "--akkio-accesses-min", "50")
LOADERS = 8  # concurrent readers/writers from b while waiting for the moves


def _percentile(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(percent / 100 * len(ordered)) - 1))
    return round(ordered[index], 2)


class _Bench:
    def __init__(self, client: kv.Client, keys: dict[int, bytes]) -> None:
        self.client = client
        self.ks = client.keyspace(KEYSPACE)
        self.keys = keys  # one key per μshard being measured
        self.errors = 0

    async def table(self) -> RoutingTable:
        await self.client.router.refresh(force=True)
        return self.client.router.table

    async def measure(self, consistency: ReadConsistency, samples: int) -> dict[str, object]:
        """Sequential reads of the keys in turn: latency percentiles and who answered."""
        table = await self.table()
        region_of = {n.info.node: n.info.region for n in table.nodes}
        latencies: list[float] = []
        served: Counter[str] = Counter()
        keys = sorted(self.keys.values())
        for index in range(samples):
            started = time.perf_counter()
            try:
                await self.ks.get(keys[index % len(keys)], consistency=consistency)
            except LoomError:
                self.errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            node = self.client.answered_by
            served[region_of.get(node, "?") if node is not None else "?"] += 1
        return {
            "consistency": str(consistency),
            "samples": len(latencies),
            "p50_ms": _percentile(latencies, 50) if latencies else None,
            "p99_ms": _percentile(latencies, 99) if latencies else None,
            "served_by_region": dict(sorted(served.items())),
        }

    async def load(self, stop: asyncio.Event, loader: int) -> None:
        """Until `stop`: every key in turn (starting at this loader's), one write in four."""
        keys = sorted(self.keys.values())
        for step in itertools.count():
            if stop.is_set():
                return
            key = keys[(loader + step) % len(keys)]
            try:
                if step % 4 == 0:
                    await self.ks.put(key, b"v%d" % step)
                else:
                    await self.ks.get(key)
            except LoomError:
                self.errors += 1

    async def local_count(self) -> int:
        """How many measured μshards sit on a p-shard whose primary is in b."""
        table = await self.table()
        return sum(1 for u in self.keys if _primary_region(table, u) == CLIENT_REGION)


def _primary_region(table: RoutingTable, ushard: int) -> str:
    keyspace = next(k for k in table.keyspaces if k.name == KEYSPACE)
    shard = keyspace.shard_of(ushard)
    route = next(s for s in table.shards if s.shard == shard)
    return next((n.info.region for n in table.nodes if n.info.node == route.primary), "")


async def run_locality_bench(
    *,
    samples: int = SAMPLES_DEFAULT,
    bound_ms: float = BOUND_MS_DEFAULT,
    progress: Callable[[str], None] = lambda _: None,
    data_dir: Path | None = None,
) -> dict[str, object]:
    """`data_dir`: keep the cluster's data and logs there (default: a temporary one)."""
    with tempfile.TemporaryDirectory(prefix="loom-locality-") as tmp:
        where = data_dir if data_dir is not None else Path(tmp)
        cluster = LocalCluster(data_dir=where, latency=MATRIX, manager_region="a")
        try:
            cluster.start_manager(extra=SM_ARGS)
            for name, region in REGIONS.items():
                cluster.start_node(name, region=region)
            progress(f"cluster up: nodes {REGIONS}, latency {MATRIX} (one-way ms)")
            return await _run(cluster, samples, bound_ms, progress)
        finally:
            cluster.stop()


async def _run(
    cluster: LocalCluster, samples: int, bound_ms: float, progress: Callable[[str], None]
) -> dict[str, object]:
    async with kv.connect(
        cluster.manager_address, region=CLIENT_REGION, latency=MATRIX, timeout_s=30.0
    ) as client:
        await client.create_keyspace(
            KEYSPACE, shards=3, replication=3, ushards=USHARDS, mapping="akkio"
        )
        table = await client.routing()
        remote = [u for u in range(USHARDS) if _primary_region(table, u) != CLIENT_REGION]
        keys = _keys_for(remote)
        bench = _Bench(client, keys)
        for key in keys.values():
            await bench.ks.put(key, b"initial")
        progress(f"{len(keys)} μshards on p-shards with a remote primary; measuring before")
        bounded = kv.bounded(bound_ms)
        before = {
            "strong": await bench.measure(kv.STRONG, samples),
            "bounded": await bench.measure(bounded, samples),
        }
        started = time.monotonic()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loaders = [loop.create_task(bench.load(stop, i)) for i in range(LOADERS)]
        try:
            local = await bench.local_count()
            progress(f"waiting for the shard manager to move them: {local}/{len(keys)} local")
            while local < len(keys):
                if time.monotonic() - started > MOVE_DEADLINE_S:
                    raise RuntimeError(f"only {local}/{len(keys)} μshards moved in time")
                await asyncio.sleep(0.5)
                now_local = await bench.local_count()
                if now_local != local:
                    elapsed = time.monotonic() - started
                    progress(f"  {now_local}/{len(keys)} local after {elapsed:.1f} s")
                local = now_local
        finally:
            stop.set()
            for loader in loaders:
                loader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loader
        moved_after_s = round(time.monotonic() - started, 1)
        progress("measuring after")
        after = {
            "strong": await bench.measure(kv.STRONG, samples),
            "bounded": await bench.measure(bounded, samples),
        }
        primaries = await _primaries(client)
    return {
        "latency": MATRIX,
        "client_region": CLIENT_REGION,
        "nodes": REGIONS,
        "bound_ms": bound_ms,
        "ushards_measured": len(keys),
        "moved_after_s": moved_after_s,
        "before": before,
        "after": after,
        "primaries": primaries,
        "client_errors": bench.errors,
    }


def _keys_for(ushards: list[int]) -> dict[int, bytes]:
    """One key per μshard (by the same stable hash the client uses)."""
    keys: dict[int, bytes] = {}
    for index in range(100_000):
        key = b"key-%d" % index
        ushard = ushard_of(key, USHARDS)
        if ushard in ushards and ushard not in keys:
            keys[ushard] = key
        if len(keys) == len(ushards):
            break
    return keys


async def _primaries(client: kv.Client) -> dict[str, str]:
    table = await client.routing()
    return {
        str(ShardId(s.shard)): str(NodeId(s.primary))
        for s in table.shards
        if s.keyspace == KEYSPACE
    }
