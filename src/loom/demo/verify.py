"""After the launch: nothing lost, nothing done twice — each check counts what it saw."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from loom import kv
from loom.demo import app as demo_app
from loom.demo.graph import LegacyGraph
from loom.demo.model import Check
from loom.functions.queue import DurableQueue

FEED = "threads_feed"
OTHER = "other_product"
PARALLEL = 64
T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True, slots=True)
class Expectations:
    graph: LegacyGraph
    signed_up: set[int]
    notifications: set[tuple[int, int]]
    likes_acked: dict[int, int]
    likes_unknown: dict[int, int]  # increments whose answer was lost: may or may not be in
    other_acked: set[bytes]


async def _each(items: Iterable[T], read: Callable[[T], Awaitable[U]]) -> list[U]:
    gate = asyncio.Semaphore(PARALLEL)

    async def one(item: T) -> U:
        async with gate:
            return await read(item)

    return list(await asyncio.gather(*(one(item) for item in items)))


async def verify(client: kv.Client, expected: Expectations) -> list[Check]:
    return [
        await _edges(client, expected),
        await _counters(client, expected),
        await _notifications(client, expected),
        await _acknowledged(client, expected),
        await _dead_letters(client),
    ]


async def _edges(client: kv.Client, expected: Expectations) -> Check:
    graph = client.keyspace(demo_app.GRAPH)

    async def edges_of(user: int) -> set[int]:
        prefix = demo_app.edge_prefix(user)
        page = await graph.scan(shard_key=demo_app.user_shard(user), prefix=prefix, limit=10_000)
        keys = [item.key[len(prefix) :] for item in page.items]
        return {int(k) for k in keys if k != b"done"}

    users = sorted(expected.signed_up)
    found = await _each(users, edges_of)
    missing = extra = total = 0
    for user, edges in zip(users, found, strict=True):
        want = set(expected.graph.following[user])
        total += len(want)
        missing += len(want - edges)
        extra += len(edges - want)
    return Check(
        name="every follow edge copied exactly once",
        passed=missing == 0 and extra == 0,
        detail=f"{total:,} edges of {len(users):,} users: {missing} missing, {extra} unexpected",
    )


async def _counters(client: kv.Client, expected: Expectations) -> Check:
    counters = client.keyspace(demo_app.COUNTERS)
    want: Counter[int] = Counter()
    for user in expected.signed_up:
        want.update(expected.graph.following[user])

    async def count_of(user: int) -> int:
        page = await counters.scan(
            shard_key=demo_app.user_shard(user),
            prefix=b"followers/%d/" % user,
            limit=demo_app.FOLLOWER_SLOTS,
        )
        return sum(int(item.value) for item in page.items)

    followees = sorted(want)
    found = await _each(followees, count_of)
    wrong = [(u, n, want[u]) for u, n in zip(followees, found, strict=True) if n != want[u]]
    detail = f"{len(followees):,} counters, {sum(want.values()):,} follows: {len(wrong)} wrong"
    if wrong:
        user, got, should = wrong[0]
        detail += f" (e.g. user {user}: {got}, not {should})"
    return Check(name="every follower counter equals its edges", passed=not wrong, detail=detail)


async def _notifications(client: kv.Client, expected: Expectations) -> Check:
    notes = client.keyspace(demo_app.NOTIFICATIONS)

    async def delivered(pair: tuple[int, int]) -> bool:
        follower, celebrity = pair
        key = demo_app.notification_key(follower, celebrity)
        return await notes.get(key, shard_key=demo_app.user_shard(follower)) is not None

    found = await _each(sorted(expected.notifications), delivered)
    missing = found.count(False)
    return Check(
        name="every notification delivered",
        passed=missing == 0,
        detail=f"{len(found):,} notifications: {missing} missing",
    )


async def _acknowledged(client: kv.Client, expected: Expectations) -> Check:
    counters = client.keyspace(demo_app.COUNTERS)
    posts = sorted(set(expected.likes_acked) | set(expected.likes_unknown))

    async def likes_of(post: int) -> int:
        item = await counters.get(demo_app.likes_key(post), shard_key=demo_app.post_shard(post))
        return kv.counter_value(item.value) if item else 0

    likes = await _each(posts, likes_of)
    lost_likes = 0
    for post, value in zip(posts, likes, strict=True):
        acked = expected.likes_acked.get(post, 0)
        lost_likes += max(0, acked - value)
        # More than acked + unknown would be a write applied twice.
        lost_likes += max(0, value - acked - expected.likes_unknown.get(post, 0))
    other = client.keyspace(OTHER)
    present = await _each(sorted(expected.other_acked), other.get)
    lost_other = sum(1 for item in present if item is None)
    feed = client.keyspace(FEED)
    users = sorted(expected.signed_up)
    feeds = await _each(users, lambda u: feed.get(b"feed/%d" % u, shard_key=demo_app.user_shard(u)))
    lost_feeds = sum(1 for item in feeds if item is None)
    acked = sum(expected.likes_acked.values()) + len(expected.other_acked) + len(users)
    lost = lost_likes + lost_other + lost_feeds
    return Check(
        name="no acknowledged write lost",
        passed=lost == 0,
        detail=(
            f"{acked:,} acknowledged writes checked: {lost} lost "
            f"(likes {lost_likes}, other product {lost_other}, feeds {lost_feeds})"
        ),
    )


async def _dead_letters(client: kv.Client) -> Check:
    queue = await DurableQueue.open(client)
    dead = await queue.dead_letters(limit=1000)
    return Check(
        name="no call dead-lettered",
        passed=not dead,
        detail=f"{len(dead)} dead-lettered" + (f" (e.g. {dead[0]})" if dead else ""),
    )
