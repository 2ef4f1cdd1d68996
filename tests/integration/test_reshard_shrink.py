"""Shrinking keyspaces with real runtimes on 127.0.0.1 (a shard manager and three nodes in
one process, real sockets and RocksDB).

- 2 → 8 → 3 p-shards under a concurrent workload (puts, conditional writes, increments,
  STRONG reads from several clients): no client-visible error, and the wall-clock
  history is linearizable per key (the simulator's checker, loom.sim.checkers); the
  retired p-shards are gone from the manager and the nodes; each moved μshard's
  longest write pause was measured.
- A manager that stops after the moves and before the retirement (and one that stops
  after taking the p-shards out of the keyspace, before dropping them) is resumed by
  the next one.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path
from typing import Any

import pytest

from loom import kv
from loom.core.errors import ConditionFailed, InvalidArgument, LoomError, Unavailable
from loom.core.ids import NodeId, ShardId
from loom.runtime.codec import ReshardReport
from loom.runtime.manager import ManagerRuntime
from loom.runtime.metastore_file import FileMetastore
from loom.runtime.node import NodeRuntime
from loom.shardmgr.routing import compact_ranges
from loom.sim.checkers.linearizability import check_history
from loom.sim.history import ANY, Operation

from .test_reshard import NAMES, PARAMS, SM_PARAMS, wait_for

USHARDS = 32
REGISTERS = tuple(b"reg-%d" % i for i in range(12))
COUNTERS = (b"count-a", b"count-b")
WORKERS = 4


class History:
    """Operations as the clients saw them, on one wall clock (this process's)."""

    def __init__(self) -> None:
        self.ops: list[Operation] = []
        self.errors: list[str] = []
        self.ids = itertools.count(1)
        self.values = itertools.count(1)

    def now_ms(self) -> float:
        return time.monotonic() * 1000


async def work(name: str, ks: kv.Keyspace, history: History, stop: asyncio.Event) -> None:
    """Puts, conditional puts (on the value this worker last read), increments and
    STRONG reads on a few keys, back to back, until `stop`."""
    rng = random.Random(name)
    seen: dict[bytes, bytes | None] = {}
    while not stop.is_set():
        await asyncio.sleep(0)  # a call that fails at once must not starve the loop
        choice = rng.random()
        key = rng.choice(COUNTERS if choice < 0.15 else REGISTERS)
        invoked = history.now_ms()
        fields: dict[str, object] = {}
        try:
            if choice < 0.15:
                total = await ks.increment(key, 1)
                fields = {"kind": "increment", "delta": 1, "output": total}
            elif choice < 0.5:
                item = await ks.get(key)  # STRONG, the default
                seen[key] = item.value if item is not None else None
                fields = {"kind": "read", "output": seen[key]}
            else:
                value = b"%s-%d" % (name.encode(), next(history.values))
                expect = seen.get(key)
                conditional = choice < 0.75 and expect is not None
                fields = {"kind": "write", "value": value, "expect": ANY}
                if conditional:
                    fields["expect"] = expect
                    try:
                        await ks.put(key, value, if_value=expect)
                    except ConditionFailed:
                        fields["outcome"] = "failed"
                else:
                    await ks.put(key, value)
        except LoomError as error:
            history.errors.append(f"{name} {key!r}: {type(error).__name__}: {error}")
            continue
        outcome = fields.pop("outcome", "ok")
        history.ops.append(
            Operation(
                op_id=next(history.ids),
                client=name,
                key=key,
                invoked_ms=invoked,
                completed_ms=history.now_ms(),
                outcome=outcome,  # type: ignore[arg-type]
                **fields,  # type: ignore[arg-type]
            )
        )


def print_pauses(label: str, report: ReshardReport) -> None:
    longest = ", ".join(f"μshard {u}: {ms:.0f} ms" for u, ms in report.pauses[:5])
    print(f"{label}: {len(report.pauses)} μshards moved; longest write pauses: {longest}")


class Cluster:
    """A manager (replaceable: `restart`) and three nodes; `close` stops what runs."""

    def __init__(self, tmp: Path, **settings: Any) -> None:
        (tmp / "sm").mkdir()
        self.tmp, self.settings = tmp, settings
        self.manager = self._manager()
        self.port = 0
        self.nodes = {n: NodeRuntime(node=n, data_dir=tmp / n, params=PARAMS) for n in NAMES}
        self.clients: list[kv.Client] = []

    def _manager(self, port: int = 0) -> ManagerRuntime:
        metastore = FileMetastore(self.tmp / "sm" / "metastore.json")
        return ManagerRuntime(metastore=metastore, params=SM_PARAMS, port=port, **self.settings)

    async def start(self) -> None:
        await self.manager.start()
        self.port = self.manager.port
        for node in self.nodes.values():
            await node.start()
            node.connect_manager("127.0.0.1", self.manager.port)
        await wait_for(lambda: set(NAMES) <= set(self.manager.infos))

    async def client(self) -> kv.Client:
        client = await kv.connect(f"127.0.0.1:{self.manager.port}", timeout_s=15)
        self.clients.append(client)
        return client

    def new_manager(self) -> ManagerRuntime:
        """The next manager on the same port and metastore (call after closing one)."""
        self.manager = self._manager(self.port)
        return self.manager

    def hosting(self, shards: set[ShardId]) -> set[NodeId]:
        return {n for n, node in self.nodes.items() if shards & set(node.hosts)}

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for node in self.nodes.values():
            await node.close()
        await self.manager.close()


def test_a_keyspace_reshards_2_to_8_to_3_under_a_workload_linearizably(tmp_path: Path) -> None:
    asyncio.run(grow_and_shrink(tmp_path))


async def grow_and_shrink(tmp: Path) -> None:
    cluster = Cluster(tmp, reshard_parallelism=4)
    try:
        await cluster.start()
        admin = await cluster.client()
        before = await admin.create_keyspace("ks", shards=2, replication=3, ushards=USHARDS)
        history = History()
        stop = asyncio.Event()
        workers = [
            asyncio.create_task(
                work(f"w{i}", (await cluster.client()).keyspace("ks"), history, stop)
            )
            for i in range(WORKERS)
        ]
        await asyncio.sleep(0.5)
        reports: list[ReshardReport] = []
        grown = await admin.reshard_keyspace("ks", shards=8, report=reports.append)
        shrunk = await admin.reshard_keyspace("ks", shards=3, report=reports.append)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)

        assert history.errors == [], history.errors[:10]
        verdict = check_history(history.ops)
        print(f"{len(history.ops)} operations: {verdict.summary()}")
        assert verdict.is_linearizable, verdict.summary()
        assert sum(op.kind == "write" and op.expect is not ANY for op in history.ops) > 0
        assert len(grown.shards()) == 8 and grown.shards()[:2] == before.shards()
        assert shrunk.shards() == grown.shards()[:3] and not shrunk.retiring
        assert shrunk.spec.shards == 3
        assert shrunk.ranges == compact_ranges(USHARDS, shrunk.shards())
        retired = set(grown.shards()[3:])
        assert not retired & set(cluster.manager.core.shards)
        await wait_for(lambda: not cluster.hosting(retired))
        # Each reshard measured a pause for every μshard it moved.
        assert len(reports) == 2
        for label, report in zip(("2 → 8", "8 → 3"), reports, strict=True):
            print_pauses(label, report)
            assert report.moves_left == 0 and report.retiring == ()
            assert report.pauses and all(ms > 0 for _, ms in report.pauses)
        moved = sum(1 for u in range(USHARDS) if grown.shard_of(u) != shrunk.shard_of(u))
        assert len(reports[1].pauses) == moved
    finally:
        await cluster.close()


def test_a_shrink_interrupted_before_the_retirement_is_finished_by_the_next_manager(
    tmp_path: Path,
) -> None:
    asyncio.run(interrupted_shrink(tmp_path))


async def interrupted_shrink(tmp: Path) -> None:
    cluster = Cluster(tmp)
    try:
        await cluster.start()
        client = await cluster.client()
        created = await client.create_keyspace("ks", shards=3, replication=3, ushards=8)
        ks = client.keyspace("ks")
        for i in range(20):
            await ks.put(b"k%d" % i, b"v%d" % i)
        for bad in (0, 9):  # below 1, above the μshard count
            with pytest.raises(InvalidArgument):
                await client.reshard_keyspace("ks", shards=bad)

        # 1. The moves end, but this manager stops before it retires anything.
        async def not_yet(_name: str) -> bool:
            return False

        first = cluster.manager
        first.resharder.finish = not_yet
        await client.reshard_keyspace("ks", shards=1, wait=False)
        await wait_for(lambda: first.resharder.pending("ks") == 0)
        assert first.keyspaces["ks"].retiring == created.shards()[1:]
        # The same shrink again answers the record; another reshard waits for it.
        again = await client.reshard_keyspace("ks", shards=1, wait=False)
        assert again.retiring == created.shards()[1:]
        with pytest.raises(InvalidArgument):
            await client.reshard_keyspace("ks", shards=2, wait=False)
        assert len(first.keyspaces["ks"].placements) == 3
        await first.close()

        # 2. The next one takes the p-shards out of the keyspace and stops before it
        # drops them on the nodes.
        async def crash(_shards: tuple[ShardId, ...]) -> None:
            raise Unavailable("the manager stops here")

        second = cluster.new_manager()
        second.drop_shards = crash  # type: ignore[method-assign,assignment]
        await second.start()
        await wait_for(lambda: len(second.keyspaces["ks"].placements) == 1)
        assert second.keyspaces["ks"].retiring == created.shards()[1:]
        await second.close()

        # 3. The third one drops them and finishes.
        third = cluster.new_manager()
        await third.start()
        await wait_for(lambda: not third.keyspaces["ks"].retiring)
        retired = set(created.shards()[1:])
        assert not retired & set(third.core.shards)
        await wait_for(lambda: not cluster.hosting(retired))
        assert third.keyspaces["ks"].shards() == created.shards()[:1]
        for i in range(20):
            item = await ks.get(b"k%d" % i)
            assert item is not None and item.value == b"v%d" % i
        await ks.put(b"k0", b"after")
    finally:
        await cluster.close()
