"""The functions the launch runs (`loom worker loom.demo.app:app`).

- `copy_follow_graph(user)`: reads whom the user followed in the old app, writes the
  follow edges into `threads_graph` in one transaction of the user's μshard (a
  conditional write: a retry finds them there), and adds one follower to each
  followee's counter in `threads_counters` exactly once (`ctx.once`, marker and
  increment in one transaction), so counters equal edges whatever is retried. The
  counter is the sum of `FOLLOWER_SLOTS` slots (a celebrity's is very hot).
- `notify([follower, celebrity])`: batched; writes one notification per call into
  `threads_notifications` (if absent: idempotent). Rate-limited, and that keyspace's
  quota pushes back through its AIMD controller.
"""

from __future__ import annotations

import asyncio

import msgspec

from loom import kv
from loom.functions import App, Batch, Context, Retry

GRAPH = "threads_graph"
COUNTERS = "threads_counters"
NOTIFICATIONS = "threads_notifications"
LEGACY = "legacy_graph"
COUNTER_PARALLELISM = 16
FOLLOWER_SLOTS = 16

app = App("threads")
retry = Retry(attempts_max=10, backoff_s=0.2, backoff_max_s=5)


def following_key(user: int) -> bytes:
    return b"following/%d" % user


def edge_prefix(user: int) -> bytes:
    return b"follows/%d/" % user


def user_shard(user: int) -> bytes:
    return b"user:%d" % user


def followers_key(user: int, slot: int) -> bytes:
    # Keys name their entity: other shard keys may share the μshard. A celebrity's
    # counter is bumped by a third of all sign-ups: it is split in slots, so concurrent
    # increments (optimistic transactions) rarely touch the same key.
    return b"followers/%d/%d" % (user, slot)


def follower_slot(follower: int) -> int:
    return follower % FOLLOWER_SLOTS


def likes_key(post: int) -> bytes:
    return b"likes/%d" % post


def post_shard(post: int) -> bytes:
    return b"post:%d" % post


def notification_key(follower: int, celebrity: int) -> bytes:
    return b"notif/%d/%d" % (follower, celebrity)


@app.function(
    retries=retry,
    timeout_s=60,
    concurrency_max=48,
    downstream=(f"kv:{GRAPH}", f"kv:{COUNTERS}"),
)
async def copy_follow_graph(ctx: Context, user: int) -> int:
    legacy = await ctx.kv.keyspace(LEGACY).get(following_key(user), shard_key=user_shard(user))
    followees: list[int] = msgspec.msgpack.decode(legacy.value) if legacy else []

    async def write_edges(tx: kv.Transaction) -> None:
        marker = await tx.get(edge_prefix(user) + b"done")
        if marker is not None:
            return  # a retry: the edges are in
        for followee in followees:
            await tx.put(edge_prefix(user) + b"%d" % followee, b"")
        await tx.put(edge_prefix(user) + b"done", b"%d" % len(followees))

    await ctx.kv.keyspace(GRAPH).run_transaction(write_edges, shard_key=user_shard(user))

    gate = asyncio.Semaphore(COUNTER_PARALLELISM)

    async def count_follower(followee: int) -> None:
        async def increment(tx: kv.Transaction) -> int:
            key = followers_key(followee, follower_slot(user))
            item = await tx.get(key)
            count = int(item.value) + 1 if item else 1
            await tx.put(key, b"%d" % count)
            return count

        async with gate:
            await ctx.once(COUNTERS, user_shard(followee), f"count-{followee}", increment)

    await asyncio.gather(*(count_follower(f) for f in followees))
    return len(followees)


@app.function(
    retries=retry,
    timeout_s=60,
    rate_limit_per_s=400,
    batch=Batch(size_max=20, wait_ms=50),
    downstream=(f"kv:{NOTIFICATIONS}",),
)
async def notify(ctx: Context, pairs: list[list[int]]) -> list[bool]:
    ks = ctx.kv.keyspace(NOTIFICATIONS)

    async def deliver(follower: int, celebrity: int) -> bool:
        try:
            await ks.put(
                notification_key(follower, celebrity),
                b"joined",
                if_absent=True,
                shard_key=user_shard(follower),
            )
        except kv.ConditionFailed:
            return False  # delivered by an earlier attempt
        return True

    return list(await asyncio.gather(*(deliver(f, c) for f, c in pairs)))
