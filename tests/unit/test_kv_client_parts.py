"""The kv client's pure parts: request ids, seeds, options, result mapping, the router,
and argument checks that must fail before anything is sent."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.core.errors import (
    ConditionFailed,
    InvalidArgument,
    LoomError,
    NotFound,
    TransactionConflict,
    Unavailable,
)
from loom.core.ids import Generation, NodeId, RequestId, Seq, ShardId, Version
from loom.host.requests import Consistency, Durability
from loom.kv import router as router_module
from loom.kv.client import Client, Keyspace, _RequestIds, _result, parse_seeds
from loom.kv.options import BOUNDED_MS_MAX, STRONG, bounded
from loom.kv.router import Address, Router
from loom.kvstate.commands import Applied, FailureReason, Rejected
from loom.runtime.codec import NodeMessage
from loom.shardmgr.routing import Keyspace as KeyspaceInfo
from loom.shardmgr.routing import (
    KeyspaceSpec,
    NodeInfo,
    NodeRoute,
    RoutingTable,
    ShardPlacement,
    ShardRoute,
    compact_ranges,
)

V1 = Version(Generation(1), Seq(7), 0)

# ------------------------------------------------------------------ _RequestIds


def test_request_floor_is_zero_when_no_request_is_open() -> None:
    assert _RequestIds().floor() == 0


def test_request_floor_is_the_smallest_unfinished_sequence() -> None:
    ids = _RequestIds()
    first, second, third = ids.open(), ids.open(), ids.open()
    assert [first.seq, second.seq, third.seq] == [1, 2, 3]
    assert first.client == second.client == ids.client
    assert ids.floor() == 1
    ids.finish(second)  # out of order: 1 is still open
    assert ids.floor() == 1
    ids.finish(first)  # 1 and 2 done: the floor jumps past both
    assert ids.floor() == 3
    ids.finish(third)
    assert ids.floor() == 0
    assert ids.open().seq == 4  # sequences are never reused
    assert ids.floor() == 4


def test_two_clients_have_different_client_ids() -> None:
    assert _RequestIds().client != _RequestIds().client


@settings(max_examples=50)
@given(st.integers(1, 300), st.randoms(use_true_random=False))
def test_request_floor_matches_a_model_for_any_finishing_order(
    count: int, rng: random.Random
) -> None:
    ids = _RequestIds()
    open_requests: list[RequestId] = []
    for _ in range(count):
        if open_requests and rng.random() < 0.45:
            request = open_requests.pop(rng.randrange(len(open_requests)))
            ids.finish(request)
        else:
            open_requests.append(ids.open())
        expected = min((r.seq for r in open_requests), default=0)
        assert ids.floor() == expected
    for request in rng.sample(open_requests, len(open_requests)):
        ids.finish(request)
    assert ids.floor() == 0


# ------------------------------------------------------------------ parse_seeds


@pytest.mark.parametrize(
    ("given_", "expected"),
    [
        ("127.0.0.1:7300", [("127.0.0.1", 7300)]),
        ("a:1,b:65535", [("a", 1), ("b", 65535)]),
        (" a:1 , b:2 ", [("a", 1), ("b", 2)]),
        (["a:1", "b:2"], [("a", 1), ("b", 2)]),
        (("host.example:80",), [("host.example", 80)]),
        ("::1:7300", [("::1", 7300)]),
    ],
)
def test_parse_seeds_reads_host_port_lists(
    given_: str | list[str], expected: list[Address]
) -> None:
    assert parse_seeds(given_) == expected


@pytest.mark.parametrize(
    "given_",
    [
        "",
        "host",
        "host:",
        ":7300",
        "host:0",
        "host:65536",
        "host:-1",
        "host:+1",
        "host:http",
        "host:1.5",
        "a:1,",
        "a:1,,b:2",
        [],
        [""],
        ["a:1", "b"],
    ],
)
def test_parse_seeds_rejects_what_is_not_host_port(given_: str | list[str]) -> None:
    with pytest.raises(InvalidArgument):
        parse_seeds(given_)


def test_parse_seeds_rejects_a_port_of_non_ascii_digits() -> None:
    with pytest.raises(InvalidArgument):
        parse_seeds("host:²")


# ------------------------------------------------------------------ options.bounded


@pytest.mark.parametrize("ms", [1, 0.5, 50, 1e-3, BOUNDED_MS_MAX])
def test_bounded_accepts_positive_finite_bounds(ms: float) -> None:
    consistency = bounded(ms)
    assert consistency.kind is Consistency.BOUNDED
    assert consistency.bound_ms == ms
    assert isinstance(consistency.bound_ms, float)


@pytest.mark.parametrize(
    "ms",
    [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, BOUNDED_MS_MAX + 1, 10**30, "50", None, b"1"],
)
def test_bounded_rejects_bounds_that_are_not_positive_finite_numbers(ms: Any) -> None:
    with pytest.raises(InvalidArgument):
        bounded(ms)


# ------------------------------------------------------------------ _result


def test_result_passes_an_applied_result_through() -> None:
    applied = Applied(version=V1, counter=3)
    assert _result(applied) is applied


def rejected(reason: FailureReason, current: Version | None = None) -> Rejected:
    return Rejected(reason=reason, message=f"because {reason}", current=current)


@pytest.mark.parametrize(
    ("reason", "error"),
    [
        ("condition", ConditionFailed),
        ("conflict", TransactionConflict),
        ("epoch", TransactionConflict),
        ("horizon", TransactionConflict),
        ("invalid", InvalidArgument),
    ],
)
def test_result_raises_the_typed_error_a_rejection_means(
    reason: FailureReason, error: type[LoomError]
) -> None:
    with pytest.raises(error, match=f"because {reason}") as raised:
        _result(rejected(reason))
    assert type(raised.value) is error


def test_result_of_a_failed_condition_names_the_current_version() -> None:
    with pytest.raises(ConditionFailed, match=r"current version 1:7\.0"):
        _result(rejected("condition", V1))


def test_transaction_conflicts_are_retryable_and_failed_conditions_are_not() -> None:
    assert TransactionConflict.retryable
    assert not ConditionFailed.retryable
    assert not InvalidArgument.retryable


# ------------------------------------------------------------------ routing tables


def node_route(name: str, *, region: str = "", alive: bool = True, port: int = 7000) -> NodeRoute:
    return NodeRoute(
        info=NodeInfo(node=NodeId(name), host=f"{name}.test", port=port, region=region),
        alive=alive,
    )


def table(
    version: tuple[int, int],
    *,
    nodes: tuple[NodeRoute, ...] = (),
    shards: tuple[ShardRoute, ...] = (),
    keyspaces: tuple[KeyspaceInfo, ...] = (),
    manager: str = "",
) -> RoutingTable:
    return RoutingTable(
        version=version, keyspaces=keyspaces, shards=shards, nodes=nodes, manager=manager
    )


def shard_route(
    shard: int,
    primary: str,
    acceptors: tuple[str, ...],
    followers: tuple[str, ...] = (),
    keyspace: str = "ks",
) -> ShardRoute:
    return ShardRoute(
        shard=ShardId(shard),
        keyspace=keyspace,
        epoch=1,
        primary=NodeId(primary),
        acceptors=tuple(NodeId(a) for a in acceptors),
        followers=tuple(NodeId(f) for f in followers),
        ready=True,
    )


async def never_fetch(address: Address) -> RoutingTable:
    raise AssertionError(f"unexpected fetch from {address}")


def router(*, region: str | None = None, seeds: tuple[Address, ...] = (("seed", 1),)) -> Router:
    return Router(seeds, never_fetch, region=region)


# ------------------------------------------------------------------ Router.install


def test_install_keeps_a_newer_table_over_an_older_one() -> None:
    r = router()
    newer = table((1, 5), nodes=(node_route("a"),))
    r.install(newer)
    r.install(table((1, 4), nodes=(node_route("b"),)))
    assert r.table is newer
    assert r.address(NodeId("a")) == ("a.test", 7000)
    assert r.address(NodeId("b")) is None


def test_install_replaces_the_table_with_a_newer_change_of_the_same_term() -> None:
    r = router()
    r.install(table((1, 5), nodes=(node_route("a"),)))
    r.install(table((1, 6), nodes=(node_route("b"),)))
    assert r.table.version == (1, 6)
    assert r.address(NodeId("a")) is None
    assert r.address(NodeId("b")) == ("b.test", 7000)


def test_install_takes_a_table_from_a_newer_term_whatever_its_counter() -> None:
    r = router()
    r.install(table((1, 900), shards=(shard_route(1, "a", ("a",)),)))
    r.install(table((2, 0), shards=(shard_route(2, "b", ("b",)),)))
    assert r.table.version == (2, 0)
    assert r.shard(ShardId(1)) is None
    assert r.primary(ShardId(2)) == NodeId("b")
    r.install(table((1, 901), shards=(shard_route(1, "a", ("a",)),)))  # the deposed term
    assert r.table.version == (2, 0)
    assert r.primary(ShardId(1)) is None


def test_install_indexes_keyspaces_by_name() -> None:
    r = router()
    assert not r.has_keyspace("ks")
    r.install(client_table())
    assert r.has_keyspace("ks")
    assert r.keyspace("ks").spec.shards == 2
    with pytest.raises(NotFound, match="no keyspace 'other'"):
        r.keyspace("other")


# ------------------------------------------------------------------ Router.nearest


def nearest_router(region: str | None, *, dead: tuple[str, ...] = ()) -> Router:
    r = router(region=region)
    regions = {"p": "us", "a1": "eu", "a2": "ap", "f1": "eu", "f2": "sa"}
    r.install(
        table(
            (1, 1),
            nodes=tuple(node_route(n, region=g, alive=n not in dead) for n, g in regions.items()),
            shards=(shard_route(1, "p", ("p", "a1", "a2"), ("f1", "f2")),),
        )
    )
    return r


def test_nearest_prefers_a_live_replica_in_the_clients_region() -> None:
    assert nearest_router("ap").nearest(ShardId(1)) == NodeId("a2")
    assert nearest_router("sa").nearest(ShardId(1)) == NodeId("f2")  # followers count too
    assert nearest_router("us").nearest(ShardId(1)) == NodeId("p")
    for _ in range(20):  # two local members: either one, never a remote one
        assert nearest_router("eu").nearest(ShardId(1)) in {NodeId("a1"), NodeId("f1")}
    assert nearest_router("eu", dead=("a1",)).nearest(ShardId(1)) == NodeId("f1")


def test_nearest_falls_back_to_the_live_primary_outside_the_clients_region() -> None:
    assert nearest_router("mars").nearest(ShardId(1)) == NodeId("p")
    assert nearest_router(None).nearest(ShardId(1)) == NodeId("p")
    assert nearest_router("ap", dead=("a2",)).nearest(ShardId(1)) == NodeId("p")


def test_nearest_falls_back_to_any_live_member_when_the_primary_is_down() -> None:
    assert nearest_router(None, dead=("p",)).nearest(ShardId(1)) == NodeId("a1")
    assert nearest_router("mars", dead=("p", "a1", "a2")).nearest(ShardId(1)) == NodeId("f1")


def test_nearest_names_the_primary_when_no_member_is_alive() -> None:
    everyone = ("p", "a1", "a2", "f1", "f2")
    assert nearest_router("eu", dead=everyone).nearest(ShardId(1)) == NodeId("p")


def test_nearest_of_an_unknown_shard_is_none() -> None:
    assert nearest_router("eu").nearest(ShardId(99)) is None


def test_nearest_ignores_members_missing_from_the_node_list() -> None:
    r = router(region="eu")
    r.install(
        table(
            (1, 1),
            nodes=(node_route("p", region="us"),),
            shards=(shard_route(1, "p", ("p", "ghost")),),
        )
    )
    assert r.nearest(ShardId(1)) == NodeId("p")


# ------------------------------------------------------------------ Router.manager


@pytest.mark.parametrize(
    ("manager", "expected"),
    [
        ("127.0.0.1:7300", ("127.0.0.1", 7300)),
        ("sm.example:1", ("sm.example", 1)),
        ("::1:7300", ("::1", 7300)),
        ("", None),
        ("host", None),
        ("host:", None),
        (":7300", None),
        ("host:port", None),
        ("host:-1", None),
    ],
)
def test_manager_parses_the_tables_manager_field(
    manager: str, expected: tuple[str, int] | None
) -> None:
    r = router()
    assert r.manager() is None
    r.install(table((1, 1), manager=manager))
    assert r.manager() == expected


def test_manager_of_a_table_with_a_non_ascii_digit_port_is_none() -> None:
    r = router()
    r.install(table((1, 1), manager="sm:²"))
    assert r.manager() is None


# ------------------------------------------------------------------ Router.refresh


class FakeFetch:
    """Answers (or fails) per address; counts calls; can hold every fetch at a gate."""

    def __init__(self, answers: dict[Address, RoutingTable | LoomError]) -> None:
        self.answers = answers
        self.calls: list[Address] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, address: Address) -> RoutingTable:
        self.calls.append(address)
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers.get(address, Unavailable("connection refused"))
        if isinstance(answer, LoomError):
            raise answer
        return answer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Replaces the router module's `time` (not the event loop's) with a manual clock."""
    fake = FakeClock()
    monkeypatch.setattr(router_module, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


A: Address = ("a", 1)
B: Address = ("b", 2)
C: Address = ("c", 3)


def run(coroutine: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coroutine)


def test_ten_concurrent_refreshes_cause_one_fetch(clock: FakeClock) -> None:
    fetch = FakeFetch({A: table((1, 1))})
    r = Router([A, B], fetch, region=None)

    async def scenario() -> None:
        fetch.gate = asyncio.Event()
        refreshes = [asyncio.create_task(r.refresh()) for _ in range(10)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        fetch.gate.set()
        await asyncio.gather(*refreshes)

    run(scenario())
    assert fetch.calls == [A]
    assert r.table.version == (1, 1)


def test_concurrent_refreshes_share_one_failure(clock: FakeClock) -> None:
    fetch = FakeFetch({})
    r = Router([A, B], fetch, region=None)

    async def scenario() -> None:
        fetch.gate = asyncio.Event()
        refreshes = [asyncio.create_task(r.refresh(force=True)) for _ in range(10)]
        await asyncio.sleep(0)
        fetch.gate.set()
        results = await asyncio.gather(*refreshes, return_exceptions=True)
        assert all(isinstance(result, Unavailable) for result in results)

    run(scenario())
    assert fetch.calls == [A, B]


def test_refresh_is_skipped_while_the_table_is_fresh_unless_forced(clock: FakeClock) -> None:
    fetch = FakeFetch({A: table((1, 1))})
    r = Router([A], fetch, region=None)

    async def scenario() -> None:
        await r.refresh()
        assert len(fetch.calls) == 1
        clock.now += router_module.REFRESH_INTERVAL_MIN_S / 2
        await r.refresh()
        assert len(fetch.calls) == 1
        await r.refresh(force=True)
        assert len(fetch.calls) == 2
        clock.now += 2 * router_module.REFRESH_INTERVAL_MIN_S
        await r.refresh()
        assert len(fetch.calls) == 3

    run(scenario())


def test_refresh_falls_back_to_the_next_seed_when_one_fails(clock: FakeClock) -> None:
    fetch = FakeFetch({A: Unavailable("a is down"), B: table((3, 1)), C: table((9, 9))})
    r = Router([A, B, C], fetch, region=None)
    run(r.refresh())
    assert fetch.calls == [A, B]
    assert r.table.version == (3, 1)


def test_refresh_asks_known_live_nodes_after_the_seeds(clock: FakeClock) -> None:
    fetch = FakeFetch({("live.test", 7001): table((2, 0))})
    r = Router([A], fetch, region=None)
    r.install(
        table(
            (1, 0),
            nodes=(
                node_route("dead", alive=False, port=7000),
                node_route("live", port=7001),
                NodeRoute(info=NodeInfo(node=NodeId("seed"), host="a", port=1), alive=True),
            ),
        )
    )
    run(r.refresh())
    assert fetch.calls == [A, ("live.test", 7001)]  # the seed once, the dead node never
    assert r.table.version == (2, 0)


def test_refresh_raises_unavailable_naming_every_failure(clock: FakeClock) -> None:
    fetch = FakeFetch(
        {A: Unavailable("boom a"), B: Unavailable("boom b"), C: InvalidArgument("c?")}
    )
    r = Router([A, B, C], fetch, region=None)
    with pytest.raises(Unavailable) as raised:
        run(r.refresh())
    message = str(raised.value)
    assert "a:1: boom a" in message
    assert "b:2: boom b" in message
    assert "c:3: c?" in message
    assert fetch.calls == [A, B, C]
    assert r.table.version == (0, 0)


def test_refresh_keeps_the_cached_table_when_a_seed_answers_an_older_one(
    clock: FakeClock,
) -> None:
    fetch = FakeFetch({A: table((1, 1))})
    r = Router([A], fetch, region=None)
    r.install(table((2, 0), manager="sm:1"))
    run(r.refresh())
    assert r.table.version == (2, 0)
    assert r.manager() == ("sm", 1)


# ------------------------------------------------------------------ argument checks


def client_table() -> RoutingTable:
    spec = KeyspaceSpec(name="ks", shards=2, replication=1, ushards=64)
    ids = [ShardId(1), ShardId(2)]
    keyspace = KeyspaceInfo(
        spec=spec,
        placements=tuple(ShardPlacement(s, (NodeId("n1"),)) for s in ids),
        ranges=compact_ranges(spec.ushards, ids),
    )
    return table(
        (1, 1),
        keyspaces=(keyspace,),
        shards=tuple(shard_route(s, "n1", ("n1",)) for s in ids),
        nodes=(node_route("n1"),),
    )


class NetworkUsed(AssertionError):
    pass


@pytest.fixture
def keyspace(monkeypatch: pytest.MonkeyPatch) -> Keyspace:
    """A handle on "ks" of a client that knows its routing and may not send anything."""

    async def no_call(
        self: Client, address: Address, message: NodeMessage, *, timeout_s: float
    ) -> NodeMessage:
        raise NetworkUsed(f"a call to {address}: {type(message).__name__}")

    monkeypatch.setattr(Client, "_call", no_call)
    client = Client([("seed.test", 1)], timeout_s=1)
    client.router.install(client_table())
    return client.keyspace("ks")


def check(call: Callable[[], Awaitable[object]]) -> None:
    """`call` must raise InvalidArgument without reaching the network."""

    async def scenario() -> None:
        with pytest.raises(InvalidArgument):
            await call()

    asyncio.run(scenario())


def reaches_network(call: Callable[[], Awaitable[object]]) -> None:
    async def scenario() -> None:
        with pytest.raises(NetworkUsed):
            await call()

    asyncio.run(scenario())


KEY_MAX = b"k" * 4096
VALUE_MAX = b"v" * (1 << 20)


def test_valid_arguments_do_reach_the_network(keyspace: Keyspace) -> None:
    # The control for every test below: the fake network is where valid requests end.
    ks = keyspace
    reaches_network(lambda: ks.put(KEY_MAX, VALUE_MAX, ttl_s=1, shard_key=KEY_MAX))
    reaches_network(lambda: ks.get(KEY_MAX, consistency=bounded(5)))
    reaches_network(lambda: ks.delete(b"k"))
    reaches_network(lambda: ks.increment(b"k", 2**63 - 1))
    reaches_network(lambda: ks.increment(b"k", -(2**63)))
    reaches_network(lambda: ks.scan(shard_key=b"s", limit=1))
    reaches_network(lambda: ks.scan(shard_key=b"s", limit=10_000, cursor=KEY_MAX))

    async def txn_read() -> None:
        tx = ks.transaction(shard_key=b"s")
        await tx.put(KEY_MAX, VALUE_MAX)
        await tx.get(b"other")

    reaches_network(txn_read)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"key": "k"}, id="key-str"),
        pytest.param({"key": bytearray(b"k")}, id="key-bytearray"),
        pytest.param({"key": b"k" * 4097}, id="key-too-long"),
        pytest.param({"value": "v"}, id="value-str"),
        pytest.param({"value": b"v" * ((1 << 20) + 1)}, id="value-too-long"),
        pytest.param({"shard_key": "s"}, id="shard-key-str"),
        pytest.param({"shard_key": b"s" * 4097}, id="shard-key-too-long"),
        pytest.param({"ttl_s": 0}, id="ttl-zero"),
        pytest.param({"ttl_s": -1.5}, id="ttl-negative"),
        pytest.param({"ttl_s": math.nan}, id="ttl-nan"),
        pytest.param({"ttl_s": math.inf}, id="ttl-inf"),
        pytest.param({"ttl_s": 10 * 365 * 24 * 3600 + 1}, id="ttl-too-long"),
        pytest.param({"ttl_s": "60"}, id="ttl-str"),
        pytest.param({"if_value": b"v" * ((1 << 20) + 1)}, id="if-value-too-long"),
        pytest.param({"if_version": 7}, id="if-version-int"),
        pytest.param({"durability": "quorum"}, id="durability-str"),
    ],
)
def test_put_rejects_bad_arguments_before_sending(keyspace: Keyspace, bad: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"key": b"k", "value": b"v", **bad}
    check(lambda: keyspace.put(**arguments))


def test_put_accepts_both_durabilities(keyspace: Keyspace) -> None:
    for durability in Durability:
        reaches_network(partial(keyspace.put, b"k", b"v", durability=durability))


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"key": "k"}, id="key-str"),
        pytest.param({"key": b"k" * 4097}, id="key-too-long"),
        pytest.param({"shard_key": "s"}, id="shard-key-str"),
        pytest.param({"consistency": "strong"}, id="consistency-str"),
        pytest.param({"consistency": Consistency.STRONG}, id="consistency-enum"),
    ],
)
def test_get_rejects_bad_arguments_before_sending(keyspace: Keyspace, bad: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"key": b"k", **bad}
    check(lambda: keyspace.get(**arguments))


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"key": "k"}, id="key-str"),
        pytest.param({"key": b"k" * 4097}, id="key-too-long"),
        pytest.param({"shard_key": 1}, id="shard-key-int"),
    ],
)
def test_delete_rejects_bad_arguments_before_sending(
    keyspace: Keyspace, bad: dict[str, Any]
) -> None:
    arguments: dict[str, Any] = {"key": b"k", **bad}
    check(lambda: keyspace.delete(**arguments))


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"key": "k"}, id="key-str"),
        pytest.param({"key": b"k" * 4097}, id="key-too-long"),
        pytest.param({"delta": 1.0}, id="delta-float"),
        pytest.param({"delta": "1"}, id="delta-str"),
        pytest.param({"delta": None}, id="delta-none"),
        pytest.param({"delta": 2**63}, id="delta-over-int64"),
        pytest.param({"delta": -(2**63) - 1}, id="delta-under-int64"),
        pytest.param({"shard_key": "s"}, id="shard-key-str"),
    ],
)
def test_increment_rejects_bad_arguments_before_sending(
    keyspace: Keyspace, bad: dict[str, Any]
) -> None:
    arguments: dict[str, Any] = {"key": b"k", **bad}
    check(lambda: keyspace.increment(**arguments))


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"shard_key": "s"}, id="shard-key-str"),
        pytest.param({"shard_key": b"s" * 4097}, id="shard-key-too-long"),
        pytest.param({"prefix": "p"}, id="prefix-str"),
        pytest.param({"prefix": b"p" * 4097}, id="prefix-too-long"),
        pytest.param({"cursor": "c"}, id="cursor-str"),
        pytest.param({"cursor": b"c" * 4097}, id="cursor-too-long"),
        pytest.param({"limit": 0}, id="limit-0"),
        pytest.param({"limit": -1}, id="limit-negative"),
        pytest.param({"limit": 10_001}, id="limit-10001"),
        pytest.param({"limit": 10.0}, id="limit-float"),
        pytest.param({"limit": "10"}, id="limit-str"),
    ],
)
def test_scan_rejects_bad_arguments_before_sending(keyspace: Keyspace, bad: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"shard_key": b"s", **bad}
    check(lambda: keyspace.scan(**arguments))


@pytest.mark.parametrize("consistency", ["strong", Consistency.STRONG, None])
def test_scan_rejects_a_consistency_that_is_not_a_read_consistency(
    keyspace: Keyspace, consistency: Any
) -> None:
    check(lambda: keyspace.scan(shard_key=b"s", consistency=consistency))


def test_transaction_rejects_a_shard_key_that_is_not_bytes(keyspace: Keyspace) -> None:
    with pytest.raises(InvalidArgument):
        keyspace.transaction(shard_key="s")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        keyspace.transaction(shard_key=b"s" * 4097)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param("k", b"v", id="key-str"),
        pytest.param(b"k" * 4097, b"v", id="key-too-long"),
        pytest.param(b"k", "v", id="value-str"),
        pytest.param(b"k", b"v" * ((1 << 20) + 1), id="value-too-long"),
        pytest.param(b"k", None, id="value-none"),
    ],
)
def test_transaction_put_rejects_bad_arguments_before_sending(
    keyspace: Keyspace, key: Any, value: Any
) -> None:
    tx = keyspace.transaction(shard_key=b"s")
    check(lambda: tx.put(key, value))


@pytest.mark.parametrize("key", ["k", b"k" * 4097, None], ids=["str", "too-long", "none"])
def test_transaction_get_rejects_bad_keys_before_sending(keyspace: Keyspace, key: Any) -> None:
    tx = keyspace.transaction(shard_key=b"s")
    check(lambda: tx.get(key))
    check(lambda: tx.delete(key))


def test_a_finished_transaction_refuses_reads_and_writes(keyspace: Keyspace) -> None:
    tx = keyspace.transaction(shard_key=b"s")

    async def finish() -> None:
        await tx.commit()  # nothing buffered: finishes without sending

    asyncio.run(finish())
    check(lambda: tx.get(b"k"))
    check(lambda: tx.put(b"k", b"v"))
    check(lambda: tx.delete(b"k"))


def test_a_transaction_left_by_an_exception_is_finished(keyspace: Keyspace) -> None:
    tx = keyspace.transaction(shard_key=b"s")

    async def fail_inside() -> None:
        with pytest.raises(KeyError):
            async with tx:
                await tx.put(b"k", b"v")
                raise KeyError("user code failed")

    asyncio.run(fail_inside())
    check(lambda: tx.put(b"k", b"v"))


def test_run_transaction_rejects_bad_attempt_counts(keyspace: Keyspace) -> None:
    async def body(tx: object) -> None:
        raise AssertionError("must not run")

    attempts: Any
    for attempts in (0, -1, 1001, 2.0):
        check(partial(keyspace.run_transaction, body, shard_key=b"s", attempts_max=attempts))


def test_strong_is_the_default_read_consistency() -> None:
    assert STRONG.kind is Consistency.STRONG
    assert STRONG.bound_ms is None
