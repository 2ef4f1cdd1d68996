"""A steady mixed client workload for the placement tests (real processes): puts of new
keys, conditional creates, STRONG reads of acknowledged keys and counter increments,
from several tasks. Every error a client would see is kept, and so is every
acknowledged write, to be checked afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from loom import kv
from loom.core.errors import LoomError
from loom.runtime.localcluster import LocalCluster
from loom.shardmgr.routing import RoutingTable


class MixedWorkload:
    def __init__(self, ks: kv.Keyspace, *, tasks: int = 4) -> None:
        self.ks = ks
        self.tasks_wanted = tasks
        self.acked: dict[bytes, bytes] = {}
        self.increments = 0
        self.operations = 0
        self.errors: list[str] = []
        self.slowest_s = 0.0  # the longest one operation took (retries included)
        self.slow: list[str] = []  # operations that took over a second, for the report
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(f"w{i}")) for i in range(self.tasks_wanted)]

    async def stop(self) -> None:
        """Each task finishes the operation it is in (a cancelled increment might be
        applied without being counted here), then ends."""
        self._stopping = True
        try:
            async with asyncio.timeout(30):
                await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self, name: str) -> None:
        for seq in range(10**9):
            if self._stopping:
                return
            key = f"{name}:{seq}".encode()
            step = seq % 4
            started = time.monotonic()
            try:
                if step == 0:
                    await self.ks.put(key, key)
                    self.acked[key] = key
                elif step == 1:
                    await self.ks.put(key, key, if_absent=True)
                    self.acked[key] = key
                elif step == 2:
                    await self.ks.increment(b"counter", 1)
                    self.increments += 1
                else:
                    earlier = f"{name}:{seq - 3}".encode()
                    item = await self.ks.get(earlier)
                    if item is None or item.value != earlier:
                        self.errors.append(f"read {earlier!r}: {item!r}")
            except LoomError as error:
                self.errors.append(f"{key!r}: {type(error).__name__}: {error}")
                continue
            self.operations += 1
            took = time.monotonic() - started
            self.slowest_s = max(self.slowest_s, took)
            if took > 1.0:
                at = time.strftime("%H:%M:%S", time.gmtime(time.time() - took))
                self.slow.append(f"{at} {('put', 'create', 'incr', 'get')[step]} {took:.1f} s")
            await asyncio.sleep(0.002)

    async def check(self) -> None:
        """Every acknowledged write is there, and the counter counted each increment
        exactly once."""
        keys = sorted(self.acked)
        for start in range(0, len(keys), 200):
            chunk = keys[start : start + 200]
            items = await asyncio.gather(*(self.ks.get(k) for k in chunk))
            assert [i.value if i else None for i in items] == [self.acked[k] for k in chunk]
        assert await self.ks.increment(b"counter", 0) == self.increments


async def until(
    client: kv.Client, done: Callable[[RoutingTable], bool], *, timeout_s: float = 60.0
) -> RoutingTable:
    """Polls the routing table until `done(table)` with every p-shard ready."""
    deadline = time.monotonic() + timeout_s
    while True:
        table = await client.routing()
        if all(s.ready for s in table.shards) and done(table):
            return table
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)


def start_cluster(cluster: LocalCluster, nodes: dict[str, str]) -> None:
    """A manager and nodes `{name: tier}` ('' = the default tier)."""
    cluster.start_manager()
    for name, tier in nodes.items():
        cluster.start_node(name, tier=tier)


def run_scenario(tmp: Path, scenario: Callable[[LocalCluster], Coroutine[Any, Any, None]]) -> None:
    """Runs `scenario` on a fresh local cluster in `tmp`, stopping its processes after."""
    cluster = LocalCluster(data_dir=tmp)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()
