"""Per-keyspace quotas: the token bucket, a node's admission, how a cluster-wide quota
is split among nodes, the quota check a node runs on a request, and the byte counter."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.core.errors import InvalidArgument
from loom.core.ids import ClientId, NodeId, RequestId, RequestSeq, ShardId, UShard
from loom.host.admission import BURST_S, Admission, KeyspaceLimits, TokenBucket
from loom.host.requests import ErrorCode, ReadRequest, WriteRequest
from loom.host.shard import shard_prefix
from loom.kv.client import Client
from loom.kvstate.commands import Delete, Put, encode_command
from loom.runtime.codec import SetQuota, decode, encode
from loom.runtime.quota_gate import QuotaGate
from loom.runtime.sizes import ShardSizes
from loom.shardmgr.quotas import node_share, node_shares
from loom.shardmgr.routing import (
    QUOTA_BYTES_MAX,
    QUOTA_RATE_MAX,
    Keyspace,
    KeyspaceSpec,
    Quota,
    RoutingTable,
    ShardPlacement,
    ShardRoute,
    compact_ranges,
)
from loom.shardmgr.tenancy import TOKEN_CHARS_MAX
from loom.storage.api import WriteBatch
from loom.storage.memory import MemoryStore

# ------------------------------------------------------------------ TokenBucket


def test_bucket_starts_full_and_refuses_past_its_burst() -> None:
    bucket = TokenBucket(100.0, now=0.0)
    taken = sum(1 for _ in range(200) if bucket.take(0.0) is None)
    assert taken == 100 * BURST_S


def test_refusal_says_how_long_until_a_token() -> None:
    bucket = TokenBucket(10.0, now=0.0)
    while bucket.take(0.0) is None:
        pass
    assert bucket.take(0.0) == 100  # one token every 100 ms
    assert bucket.take(60.0) == 40
    assert bucket.take(100.0) is None


def test_a_refused_request_takes_nothing() -> None:
    bucket = TokenBucket(10.0, now=0.0)
    while bucket.take(0.0) is None:
        pass
    for _ in range(50):
        assert bucket.take(50.0) is not None
    assert bucket.take(100.0) is None


def test_slow_rate_still_holds_one_token() -> None:
    bucket = TokenBucket(0.5, now=0.0)
    assert bucket.take(0.0) is None
    assert bucket.take(0.0) == 2000
    assert bucket.take(2000.0) is None


def test_clock_going_backwards_adds_no_tokens() -> None:
    bucket = TokenBucket(10.0, now=1000.0)
    while bucket.take(1000.0) is None:
        pass
    assert bucket.take(0.0) is not None
    assert bucket.take(1050.0) is not None


def test_reconfigure_keeps_tokens_so_repeated_pushes_give_no_new_burst() -> None:
    bucket = TokenBucket(100.0, now=0.0)
    while bucket.take(0.0) is None:
        pass
    bucket.reconfigure(100.0, 0.0)
    bucket.reconfigure(200.0, 0.0)
    assert bucket.take(0.0) is not None
    bucket.reconfigure(4.0, 10_000.0)  # full at the old size, capped at the new one
    assert bucket.tokens == pytest.approx(2.0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=10_000),
    gaps=st.lists(st.floats(min_value=0, max_value=50), min_size=1, max_size=400),
)
def test_admitted_count_never_exceeds_burst_plus_rate_times_elapsed(
    rate: float, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, now=0.0)
    now, admitted = 0.0, 0
    for gap in gaps:
        now += gap
        if bucket.take(now) is None:
            admitted += 1
    assert admitted <= math.floor(max(1.0, rate * BURST_S) + rate * now / 1000 + 1e-6)


# ------------------------------------------------------------------ Admission


def test_admission_throttles_writes_and_reads_separately() -> None:
    admission = Admission()
    admission.configure({"ks": KeyspaceLimits(writes_per_s=2.0)}, now=0.0)
    assert admission.admit_write("ks", 0.0, adds_data=True) is None
    refusal = admission.admit_write("ks", 0.0, adds_data=True)
    assert refusal is not None and refusal.retry_after_ms == 500
    assert "writes/s" in refusal.message
    assert all(admission.admit_read("ks", 0.0) is None for _ in range(1000))
    assert admission.admit_write("other", 0.0, adds_data=True) is None


def test_admission_refuses_growth_over_bytes_but_lets_deletes_through() -> None:
    admission = Admission()
    admission.configure({"ks": KeyspaceLimits(bytes_max=1000)}, now=0.0)
    admission.set_stored_bytes({"ks": 1000})
    assert admission.admit_write("ks", 0.0, adds_data=True) is None  # at, not over
    admission.set_stored_bytes({"ks": 1001})
    refusal = admission.admit_write("ks", 0.0, adds_data=True)
    assert refusal is not None and refusal.retry_after_ms is None
    assert admission.admit_write("ks", 0.0, adds_data=False) is None


def test_dropping_a_limit_from_the_configuration_stops_enforcing_it() -> None:
    admission = Admission()
    admission.configure({"ks": KeyspaceLimits(writes_per_s=1.0)}, now=0.0)
    assert admission.admit_write("ks", 0.0, adds_data=True) is None
    assert admission.admit_write("ks", 0.0, adds_data=True) is not None
    admission.configure({}, now=0.0)
    assert admission.admit_write("ks", 0.0, adds_data=True) is None


# ------------------------------------------------------------------ Quota.problem


@pytest.mark.parametrize(
    "quota",
    [
        Quota(reads_per_s=0.0),
        Quota(writes_per_s=-1.0),
        Quota(reads_per_s=math.inf),
        Quota(writes_per_s=math.nan),
        Quota(writes_per_s=QUOTA_RATE_MAX * 2),
        Quota(bytes_max=0),
        Quota(bytes_max=QUOTA_BYTES_MAX + 1),
    ],
)
def test_quota_outside_its_limits_is_refused(quota: Quota) -> None:
    assert quota.problem() is not None


def test_quota_within_limits_and_unlimited_are_fine() -> None:
    assert Quota().problem() is None and Quota().is_unlimited()
    assert Quota(reads_per_s=QUOTA_RATE_MAX, bytes_max=QUOTA_BYTES_MAX).problem() is None


def test_set_quota_message_round_trips() -> None:
    message = SetQuota(name="ks", quota=Quota(writes_per_s=5.0, bytes_max=10))
    assert decode(encode(message)) == message


# ------------------------------------------------------------------ splitting

A, B, C, D = (NodeId(n) for n in "abcd")


def keyspace(quota: Quota, shards: int = 4, name: str = "ks") -> Keyspace:
    ids = [ShardId(i + 1) for i in range(shards)]
    return Keyspace(
        spec=KeyspaceSpec(name=name, shards=shards),
        placements=tuple(ShardPlacement(s, (A, B, C)) for s in ids),
        ranges=compact_ranges(4096, ids),
        quota=quota,
    )


def routes(
    primaries: list[NodeId], followers: tuple[NodeId, ...] = ()
) -> dict[ShardId, ShardRoute]:
    return {
        ShardId(i + 1): ShardRoute(
            shard=ShardId(i + 1),
            keyspace="ks",
            epoch=1,
            primary=p,
            acceptors=(A, B, C),
            followers=followers,
        )
        for i, p in enumerate(primaries)
    }


def test_writes_split_by_primaries_held() -> None:
    ks = keyspace(Quota(writes_per_s=100.0))
    table = routes([A, A, A, B])
    assert node_share(ks, table, A).writes_per_s == 75.0
    assert node_share(ks, table, B).writes_per_s == 25.0


def test_a_replica_without_a_primary_keeps_one_shards_worth_of_writes() -> None:
    ks = keyspace(Quota(writes_per_s=100.0))
    assert node_share(ks, routes([A, A, A, B]), C).writes_per_s == 25.0


def test_node_without_replicas_gets_no_share() -> None:
    ks = keyspace(Quota(writes_per_s=100.0, reads_per_s=100.0, bytes_max=4000))
    share = node_share(ks, routes([A, A, B, B]), D)
    assert share.shards == () and share.writes_per_s == 0.0
    table = RoutingTable(
        version=(1, 1),
        keyspaces=(ks,),
        shards=tuple(routes([A, A, B, B]).values()),
        nodes=(),
    )
    assert "ks" not in node_shares(table, D)
    assert "ks" in node_shares(table, A)


def test_reads_and_bytes_split_by_replicas_held_followers_included() -> None:
    ks = keyspace(Quota(reads_per_s=100.0, bytes_max=4000))
    table = routes([A, B, A, B], followers=(D,))
    for node in (A, B, C, D):  # every node holds a replica of all 4 p-shards
        share = node_share(ks, table, node)
        assert share.reads_per_s == 100.0 and share.bytes_max == 4000
    without_d = {
        s: ShardRoute(shard=s, keyspace="ks", epoch=1, primary=A, acceptors=(A, B, C))
        for s in (ShardId(3), ShardId(4))
    }
    half = {**table, **without_d}
    share = node_share(ks, half, D)
    assert share.reads_per_s == 50.0 and share.bytes_max == 2000


def test_strong_reads_across_primaries_add_up_to_the_quota() -> None:
    ks = keyspace(Quota(reads_per_s=120.0, writes_per_s=120.0), shards=3)
    ids = [ShardId(1), ShardId(2), ShardId(3)]
    table = {
        s: ShardRoute(shard=s, keyspace="ks", epoch=1, primary=p, acceptors=(p,))
        for s, p in zip(ids, (A, B, C), strict=True)
    }
    assert sum(node_share(ks, table, n).writes_per_s or 0 for n in (A, B, C)) == 120.0
    assert sum(node_share(ks, table, n).reads_per_s or 0 for n in (A, B, C)) == 120.0


# ------------------------------------------------------------------ the node's gate


def gate_for(quota: Quota) -> QuotaGate:
    ks = keyspace(quota, shards=1)
    table = RoutingTable(
        version=(1, 1), keyspaces=(ks,), shards=tuple(routes([A]).values()), nodes=()
    )
    gate = QuotaGate(A)
    gate.on_routing(table, now=0.0)
    return gate


def write(token: int, command: Put | Delete) -> WriteRequest:
    return WriteRequest(token=token, command=encode_command(command))


def put(seq: int) -> Put:
    return Put(
        request=RequestId(ClientId("c"), RequestSeq(seq)), ushard=UShard(0), key=b"k", value=b"v"
    )


def test_gate_answers_throttled_with_a_hint_and_counts_it() -> None:
    gate = gate_for(Quota(writes_per_s=2.0, reads_per_s=1.0))
    assert gate.check(ShardId(1), write(1, put(1)), 0.0) is None
    refusal = gate.check(ShardId(1), write(2, put(2)), 0.0)
    assert refusal is not None and refusal.code is ErrorCode.THROTTLED
    assert refusal.token == 2 and refusal.retry_after_ms == 500
    read = ReadRequest(token=3, ushard=UShard(0), key=b"k")
    assert gate.check(ShardId(1), read, 0.0) is None
    refused_read = gate.check(ShardId(1), read, 0.0)
    assert refused_read is not None and refused_read.code is ErrorCode.THROTTLED
    assert gate.throttled == 2
    assert gate.check(ShardId(99), write(4, put(4)), 0.0) is None  # not in the table


def test_gate_measures_only_shards_of_keyspaces_with_a_bytes_quota() -> None:
    assert gate_for(Quota(writes_per_s=5.0)).measured_shards == frozenset()
    assert gate_for(Quota(bytes_max=100)).measured_shards == {ShardId(1)}


def test_gate_refuses_puts_over_bytes_but_not_deletes() -> None:
    gate = gate_for(Quota(bytes_max=100))
    gate.on_sizes({ShardId(1): 101})
    refusal = gate.check(ShardId(1), write(1, put(1)), 0.0)
    assert refusal is not None and refusal.code is ErrorCode.QUOTA_EXCEEDED
    delete = Delete(request=RequestId(ClientId("c"), RequestSeq(2)), ushard=UShard(0), key=b"k")
    assert gate.check(ShardId(1), write(2, delete), 0.0) is None
    gate.on_sizes({ShardId(1): 50})
    assert gate.check(ShardId(1), write(3, put(3)), 0.0) is None


# ------------------------------------------------------------------ byte counting


def store_with(items: dict[ShardId, int]) -> MemoryStore:
    store = MemoryStore()
    batch = WriteBatch()
    for shard, count in items.items():
        for i in range(count):
            batch.put(shard_prefix(shard) + b"Kd" + i.to_bytes(4, "big"), b"x" * 10)
        batch.put(shard_prefix(shard) + b"L" + b"\0" * 8, b"y" * 1000)  # the log: not counted
    store.write(batch, sync=True)
    return store


def test_sizes_count_the_kv_namespace_of_each_shard_within_a_budget() -> None:
    store = store_with({ShardId(1): 7000, ShardId(2): 10})
    sizes = ShardSizes()
    first = sizes.measure(store, [ShardId(1), ShardId(2)])
    assert ShardId(1) not in first  # 7000 items need two calls
    second = sizes.measure(store, [ShardId(1), ShardId(2)])
    per_item = 2 + 4 + 10  # key inside the shard prefix + value
    assert second == {ShardId(1): 7000 * per_item, ShardId(2): 10 * per_item}
    assert sizes.measure(store, [ShardId(2)]) == {ShardId(2): 10 * per_item}


# ------------------------------------------------------------------ client-side checks


@pytest.mark.parametrize(
    "limits",
    [
        {"writes_per_s": -1},
        {"reads_per_s": 0},
        {"reads_per_s": "10"},
        {"writes_per_s": math.inf},
        {"bytes_max": 1.5},
        {"bytes_max": True},
        {"bytes_max": 0},
    ],
)
def test_client_refuses_a_bad_quota_before_sending_it(limits: dict[str, object]) -> None:
    async def attempt() -> None:
        client = Client([("127.0.0.1", 1)])
        try:
            await client.set_quota("ks", **limits)  # type: ignore[arg-type]
        finally:
            await client.close()

    with pytest.raises(InvalidArgument):
        asyncio.run(attempt())


def test_client_refuses_an_empty_or_oversized_token() -> None:
    for token in ("", "x" * (TOKEN_CHARS_MAX + 1)):
        with pytest.raises(InvalidArgument):
            Client([("127.0.0.1", 1)], token=token)


def test_a_read_of_several_keys_takes_a_token_for_each() -> None:
    gate = gate_for(Quota(reads_per_s=10.0))  # a burst of 10 * BURST_S tokens
    tokens = int(10.0 * BURST_S)
    many = ReadRequest(token=1, ushard=UShard(0), key=b"a", also=(b"b",) * (tokens - 1))
    assert gate.check(ShardId(1), many, 0.0) is None
    refused = gate.check(ShardId(1), ReadRequest(token=2, ushard=UShard(0), key=b"k"), 0.0)
    assert refused is not None and refused.code is ErrorCode.THROTTLED


def test_a_count_over_the_buckets_capacity_waits_for_a_full_bucket_not_forever() -> None:
    bucket = TokenBucket(10.0, now=0.0)
    capacity = 10.0 * BURST_S
    assert bucket.take(0.0, count=1000) is None  # takes the whole bucket
    assert bucket.take(0.0, count=1000) == capacity * 100  # ms until it is full again
    assert bucket.take(capacity * 100, count=1000) is None
