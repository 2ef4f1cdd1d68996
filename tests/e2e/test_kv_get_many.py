"""Reading several keys in one request, on real processes: `Keyspace.get_many` answers
in order across μshards (one request per μshard), and a transaction's `get_many` reads
its snapshot like single gets do: a key written by someone else after it conflicts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from loom import kv
from loom.core.errors import InvalidArgument, TransactionConflict
from loom.core.limits import DEFAULT_LIMITS

from .harness import KEYSPACE, running_cluster


@pytest.mark.timeout(120)
def test_get_many_answers_in_order_and_a_transaction_reads_one_snapshot(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_cluster(tmp_path) as (cluster, client):
            ks = client.keyspace(KEYSPACE)
            keys = [b"user:%d" % i for i in range(300)]  # spread over many μshards
            await asyncio.gather(*(ks.put(k, k.upper()) for k in keys))
            asked = [*keys, b"absent", keys[5], b"absent:2"]
            items = await ks.get_many(asked)
            assert [i.value if i else None for i in items] == [
                *(k.upper() for k in keys),
                None,
                b"USER:5",
                None,
            ]
            singles = await asyncio.gather(*(ks.get(k) for k in keys[:10]))
            assert [i.version for i in items[:10] if i] == [s.version for s in singles if s]
            relaxed = await ks.get_many(keys[:20], consistency=kv.EVENTUAL)
            assert all(i is not None for i in relaxed)
            with pytest.raises(InvalidArgument, match="at most"):
                await ks.get_many([b"k"] * (DEFAULT_LIMITS.scan_items_max + 1))

            # One μshard, more keys than one request takes: several requests, one
            # snapshot.
            group = [b"g:%d" % i for i in range(DEFAULT_LIMITS.read_keys_max + 10)]
            async with ks.transaction(shard_key=b"g") as tx:
                for key in group:
                    await tx.put(key, b"1")
            async with ks.transaction(shard_key=b"g") as tx:
                await tx.put(b"g:new", b"mine")
                seen = await tx.get_many([b"g:new", *group, b"g:none"])
                assert [i.value if i else None for i in seen] == [
                    b"mine",
                    *[b"1"] * len(group),
                    None,
                ]

            tx = ks.transaction(shard_key=b"g")
            first, second = await tx.get_many([b"g:0", b"g:1"])
            assert first is not None and second is not None
            await ks.put(b"g:1", b"changed", shard_key=b"g")  # after the snapshot
            await tx.put(b"g:0", b"2")
            with pytest.raises(TransactionConflict):
                await tx.commit()
            assert (await ks.get(b"g:0", shard_key=b"g")).value == b"1"  # type: ignore[union-attr]
            await asyncio.to_thread(blocking_twin, cluster.manager_address)

    def blocking_twin(address: str) -> None:
        with kv.connect_sync(address) as client:
            ks = client.keyspace(KEYSPACE)
            assert [i.value if i else None for i in ks.get_many([b"user:1", b"no"])] == [
                b"USER:1",
                None,
            ]
            with ks.transaction(shard_key=b"g") as tx:
                assert [i.value if i else None for i in tx.get_many([b"g:1"])] == [b"changed"]

    asyncio.run(scenario())
