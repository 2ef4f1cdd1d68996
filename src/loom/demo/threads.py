"""`loom demo threads`: a social app's launch, replayed on an embedded cluster.

1. An embedded cluster: a shard manager, nodes in three labelled regions, a scheduler
   and workers (real processes) in a scratch directory.
2. The app's keyspaces, each its own tenant — follow graph (a μshard per user),
   counters, feed state, notifications (with a tight writes quota) — and an "other
   product" tenant with steady traffic of its own.
3. An existing social graph to copy from (`graph`): power-law follower counts, a few
   celebrities; loaded into `legacy_graph`.
4. The launch: sign-ups ramp up steeply; each one writes the user's feed state and
   submits `copy_follow_graph` (idempotent); a celebrity's sign-up fans out `notify`
   calls to their followers. Likes (counters) and feed reads at mixed consistency
   hit the store meanwhile.
5. Midway, the follow graph reshards live from 2 to 8 p-shards; then a node holding
   primaries is killed with SIGKILL, and restarted later.
6. The queue drains; `verify` checks that nothing was lost or done twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from loom import kv
from loom.core.errors import LoomError, OutcomeUnknown
from loom.demo import app as demo_app
from loom.demo.graph import LegacyGraph, generate
from loom.demo.model import Check, DemoReport, Event, Sample
from loom.demo.verify import Expectations, verify
from loom.functions import registry
from loom.functions.queue import DurableQueue
from loom.runtime.localcluster import LocalCluster

FEED = "threads_feed"
OTHER = "other_product"
REGIONS = ("us", "eu", "ap")
NODES = 3
WORKERS = 2
WORKER_CONCURRENCY = 48
NOTIFICATIONS_WRITES_PER_S = 150.0
LIKE_POSTS = 200
OTHER_OPS_PER_S = 40
DRAIN_TIMEOUT_S = 240.0
RESHARD_AT = 0.3  # of the launch
GRAPH_SHARDS = 2
GRAPH_SHARDS_AFTER = 8
GRAPH_USHARDS = 128
KILL_AT = 0.55  # of the launch
RESTART_AFTER_S = 12.0
# The other product's p99 may grow this much over its p99 before the launch (or up to
# the floor): it shares the nodes, and a node dies under it.
OTHER_P99_FACTOR = 10.0
OTHER_P99_FLOOR_MS = 1000.0


@dataclass(frozen=True, slots=True)
class Settings:
    users: int = 2000
    duration_s: float = 60.0  # of the sign-up ramp; the queue drains after it
    seed: int = 7
    kill: bool = True
    reshard: bool = True
    tls: bool = False  # every connection with TLS (ADR 0015)

    def __post_init__(self) -> None:
        if not 20 <= self.users <= 200_000:
            raise ValueError("users must be 20..200000")
        if not 10 <= self.duration_s <= 3600:
            raise ValueError("duration must be 10..3600 s")


@dataclass(slots=True)
class Meter:
    """Counts and latencies of one kind of request, read once per second."""

    ok: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    all_latencies_ms: list[float] = field(default_factory=list)

    def record(self, started: float, ok: bool) -> None:
        if ok:
            self.ok += 1
            self.latencies_ms.append((time.perf_counter() - started) * 1000)
        else:
            self.failed += 1

    def take(self) -> tuple[int, list[float]]:
        """The last second's successes and latencies (kept for the whole run, too)."""
        ok, latencies = self.ok, self.latencies_ms
        self.ok, self.latencies_ms = 0, []
        self.all_latencies_ms += latencies
        return ok, latencies


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@dataclass(slots=True)
class SchedulerFigures:
    finished: float = 0.0
    signals: float = 0.0
    rates: dict[str, float] = field(default_factory=dict)


class Launch:
    def __init__(self, settings: Settings, workdir: Path, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.workdir = workdir
        self.say = say
        self.graph: LegacyGraph = generate(settings.users, seed=settings.seed)
        self.cluster = LocalCluster(data_dir=workdir, tls=settings.tls)
        self.rng = random.Random(settings.seed)
        self.app_ops = Meter()
        self.other_ops = Meter()
        self.signups = 0
        self.signed_up: list[int] = []
        self.submitted_calls = 0
        self.failed_requests = 0
        self.likes_acked: dict[int, int] = {}
        self.likes_unknown: dict[int, int] = {}
        self.other_acked: set[bytes] = set()
        self.notifications: set[tuple[int, int]] = set()
        self.samples: list[Sample] = []
        self.events: list[Event] = []
        self.started = 0.0
        self.signups_done = asyncio.Event()
        self.stop_load = asyncio.Event()
        self.latest: Sample | None = None

    # ---------------------------------------------------------------- the cluster

    def start_cluster(self) -> None:
        self.say("starting an embedded cluster: a shard manager, 3 nodes (us, eu, ap)…")
        self.cluster.start_manager()
        for index in range(NODES):
            self.cluster.start_node(f"n{index + 1}", region=REGIONS[index % len(REGIONS)])

    def start_functions(self) -> None:
        self.say("starting a scheduler and 2 workers…")
        self.cluster.start_scheduler("scheduler")
        for index in range(WORKERS):
            target = "loom.demo.app:app"
            self.cluster.start_worker(f"worker{index + 1}", target, concurrency=WORKER_CONCURRENCY)

    async def create_keyspaces(self, client: kv.Client) -> None:
        self.say("creating tenants and keyspaces…")
        layout = [
            (demo_app.GRAPH, "graph", GRAPH_SHARDS),
            (demo_app.COUNTERS, "counters", 2),
            (FEED, "feed", 1),
            (demo_app.NOTIFICATIONS, "notifications", 1),
            (demo_app.LEGACY, "legacy", 1),
            (OTHER, "other", 1),
        ]
        for keyspace, tenant, shards in layout:
            await client.create_tenant(tenant)
            # The follow graph has fewer μshards than the default, so its live reshard
            # (each μshard frozen, copied, owned) fits in the demo's few minutes.
            ushards = GRAPH_USHARDS if keyspace == demo_app.GRAPH else 4096
            await client.create_keyspace(keyspace, shards=shards, tenant=tenant, ushards=ushards)
        await client.set_quota(demo_app.NOTIFICATIONS, writes_per_s=NOTIFICATIONS_WRITES_PER_S)

    async def load_legacy_graph(self, client: kv.Client) -> None:
        self.say(
            f"loading the old app's graph: {self.graph.users} users, {self.graph.edges()} "
            f"follows, {len(self.graph.celebrities)} celebrities…"
        )
        ks = client.keyspace(demo_app.LEGACY)
        gate = asyncio.Semaphore(64)

        async def put(user: int, followees: tuple[int, ...]) -> None:
            async with gate:
                await ks.put(
                    demo_app.following_key(user),
                    msgspec.msgpack.encode(list(followees)),
                    shard_key=demo_app.user_shard(user),
                )

        await asyncio.gather(*(put(u, f) for u, f in self.graph.following.items()))

    # -------------------------------------------------------------------- the launch

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def mark(self, label: str) -> None:
        self.events.append(Event(t_s=round(self.elapsed(), 2), label=label))
        self.say(label)

    async def signup_driver(self, client: kv.Client) -> None:
        """Sign-ups at a rate that rises with the square of time: slow, then a surge."""
        order = list(self.graph.following)
        self.rng.shuffle(order)
        duration = self.settings.duration_s
        total = len(order)
        gate = asyncio.Semaphore(64)
        pending: set[asyncio.Task[None]] = set()
        for index, user in enumerate(order):
            # Sign-up i happens when (t / duration)^3 reaches i / total.
            due = duration * ((index + 1) / total) ** (1 / 3)
            delay = due - self.elapsed()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            task = asyncio.create_task(self._signup(client, user))
            task.add_done_callback(lambda _: gate.release())
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        self.signups_done.set()

    async def _signup(self, client: kv.Client, user: int) -> None:
        started = time.perf_counter()
        try:
            await client.keyspace(FEED).put(
                b"feed/%d" % user, b"new", shard_key=demo_app.user_shard(user)
            )
            self.app_ops.record(started, True)
            await demo_app.copy_follow_graph.submit(user, idempotency_key=f"copy:{user}")
            self.submitted_calls += 1
            if user in self.graph.celebrities:
                await self._fan_out(user)
        except LoomError as error:
            self.failed_requests += 1
            self.say(f"sign-up of {user} failed: {error!r}")
            return
        self.signups += 1
        self.signed_up.append(user)

    async def _fan_out(self, celebrity: int) -> None:
        followers = self.graph.followers(celebrity)
        self.mark(f"celebrity {celebrity} joins: notifying {len(followers)} followers")
        pairs = [[[follower, celebrity]] for follower in followers]
        keys = [f"notify:{celebrity}:{follower}" for follower in followers]
        for start in range(0, len(pairs), 500):
            await demo_app.notify.submit_many(
                pairs[start : start + 500], idempotency_keys=keys[start : start + 500]
            )
        self.submitted_calls += len(pairs)
        self.notifications.update((f, celebrity) for f in followers)

    async def likes_and_feed_reads(self, client: kv.Client) -> None:
        """Likes (counter increments) and feed reads at mixed consistency."""
        counters = client.keyspace(demo_app.COUNTERS)
        feed = client.keyspace(FEED)
        levels = [kv.EVENTUAL, kv.bounded(500), kv.STRONG]
        while not self.stop_load.is_set():
            post = self.rng.randrange(LIKE_POSTS)
            started = time.perf_counter()
            try:
                await counters.increment(
                    demo_app.likes_key(post), shard_key=demo_app.post_shard(post)
                )
                self.likes_acked[post] = self.likes_acked.get(post, 0) + 1
                self.app_ops.record(started, True)
            except OutcomeUnknown:
                self.likes_unknown[post] = self.likes_unknown.get(post, 0) + 1
                self.app_ops.record(started, False)
            except LoomError:
                self.failed_requests += 1
                self.app_ops.record(started, False)
            if self.signed_up:
                user = self.rng.choice(self.signed_up)
                started = time.perf_counter()
                try:
                    await feed.get(
                        b"feed/%d" % user,
                        shard_key=demo_app.user_shard(user),
                        consistency=self.rng.choice(levels),
                    )
                    self.app_ops.record(started, True)
                except LoomError:
                    self.failed_requests += 1
                    self.app_ops.record(started, False)
            await asyncio.sleep(0.005)

    async def other_product(self, client: kv.Client) -> None:
        """The other tenant: steady writes and reads of its own, latency measured."""
        ks = client.keyspace(OTHER)
        sequence = 0
        while not self.stop_load.is_set():
            sequence += 1
            key = b"item/%d" % sequence
            started = time.perf_counter()
            try:
                await ks.put(key, b"x" * 200)
                self.other_acked.add(key)
                self.other_ops.record(started, True)
                started = time.perf_counter()
                await ks.get(b"item/%d" % self.rng.randint(1, sequence))
                self.other_ops.record(started, True)
            except LoomError:
                self.failed_requests += 1
                self.other_ops.record(started, False)
            await asyncio.sleep(2 / OTHER_OPS_PER_S)

    async def faults(self, client: kv.Client) -> None:
        """Midway, as load climbs: the follow graph reshards live, then a node holding
        primaries is killed and later restarted."""
        await asyncio.sleep(self.settings.duration_s * RESHARD_AT)
        if self.settings.reshard:
            self.mark(f"reshard {demo_app.GRAPH} {GRAPH_SHARDS} → {GRAPH_SHARDS_AFTER} p-shards")
            started = self.elapsed()
            await client.reshard_keyspace(demo_app.GRAPH, shards=GRAPH_SHARDS_AFTER)
            self.mark(f"reshard done in {self.elapsed() - started:.1f} s")
        if not self.settings.kill:
            return
        await asyncio.sleep(max(0.0, self.settings.duration_s * KILL_AT - self.elapsed()))
        victim = await self._node_with_most_primaries(client)
        self.cluster.kill(victim)
        self.mark(f"SIGKILL {victim} (primaries on it fail over)")
        await asyncio.sleep(RESTART_AFTER_S)
        self.cluster.restart(victim)
        self.mark(f"restart {victim} (catches up from its log)")

    async def _node_with_most_primaries(self, client: kv.Client) -> str:
        table = await client.routing()
        counts: dict[str, int] = {}
        other_primary = {s.primary for s in table.shards if s.keyspace == OTHER}
        for shard in table.shards:
            if shard.primary not in other_primary:  # spare the other product's primary
                counts[shard.primary] = counts.get(shard.primary, 0) + 1
        return max(sorted(counts), key=lambda node: counts[node])

    # ---------------------------------------------------------------------- metrics

    async def sampler(self, client: kv.Client) -> None:
        signups_before = 0
        before = SchedulerFigures()
        while not self.stop_load.is_set():
            await asyncio.sleep(1.0)
            now = self.elapsed()
            figures = await self._scheduler_figures(client)
            writes_per_s = 0.0
            with contextlib.suppress(LoomError):
                status = await client.status()
                writes_per_s = sum(s.ops_per_s for s in status.shards)
            app_ok, app_latencies = self.app_ops.take()
            _, other_latencies = self.other_ops.take()
            sample = Sample(
                t_s=round(now, 2),
                signups_per_s=float(self.signups - signups_before),
                kv_ops_per_s=round(writes_per_s + app_ok, 1),
                calls_completed_per_s=max(0.0, figures.finished - before.finished),
                queue_depth=max(0, self.submitted_calls - int(figures.finished)),
                throttled_per_s=max(0.0, figures.signals - before.signals),
                p50_ms=percentile(app_latencies, 0.5),
                p99_ms=percentile(app_latencies, 0.99),
                other_p99_ms=percentile(other_latencies, 0.99),
                controller_rates=figures.rates,
            )
            signups_before, before = self.signups, figures
            self.samples.append(sample)
            self.latest = sample

    async def _scheduler_figures(self, client: kv.Client) -> SchedulerFigures:
        """The schedulers' published counts (summed) and controller rates."""
        figures = SchedulerFigures()
        with contextlib.suppress(LoomError):
            for member in await registry.read_members(client):
                for function in dict(member.status.get("functions", {})).values():
                    figures.finished += float(function.get("finished", 0))
                for name, controller in dict(member.status.get("downstreams", {})).items():
                    figures.signals += float(controller.get("signals", 0))
                    figures.rates[name] = float(controller.get("rate", 0.0))
        return figures

    async def drain(self, client: kv.Client) -> bool:
        """Waits until no call is queued or running any more."""
        queue = await DurableQueue.open(client)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        empty = 0
        while time.monotonic() < deadline:
            with contextlib.suppress(LoomError):
                # Empty twice, a second apart: one look may fall between two pages.
                empty = 0 if await queue.pending() else empty + 1
                if empty == 2:
                    return True
            await asyncio.sleep(1.0)
        return False

    # ---------------------------------------------------------------------- the run

    async def run(self) -> DemoReport:
        began_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.start_cluster()
        tls = self.cluster.client_tls()
        async with kv.connect(self.cluster.manager_address, timeout_s=20, tls=tls) as client:
            await self.create_keyspaces(client)
            await self.load_legacy_graph(client)
            await DurableQueue.open(client)
            self.start_functions()
            demo_app.app.cluster, demo_app.app.tls = self.cluster.manager_address, tls
            try:
                await demo_app.app.queue()
                self.say("the launch begins")
                self.started = time.monotonic()
                background = [
                    asyncio.create_task(self.likes_and_feed_reads(client)),
                    asyncio.create_task(self.other_product(client)),
                    asyncio.create_task(self.sampler(client)),
                    asyncio.create_task(self.faults(client)),
                ]
                await self.signup_driver(client)
                self.mark(f"all {self.signups} sign-ups in; draining the queue")
                drained = await self.drain(client)
                self.stop_load.set()
                await asyncio.gather(*background)
                duration = self.elapsed()
                self.say("verifying…")
                expected = Expectations(
                    graph=self.graph,
                    signed_up=set(self.signed_up),
                    notifications=self.notifications,
                    likes_acked=self.likes_acked,
                    likes_unknown=self.likes_unknown,
                    other_acked=self.other_acked,
                )
                checks = await verify(client, expected)
            finally:
                await demo_app.app.close()
        checks.insert(
            0,
            Check(name="the queue drained", passed=drained, detail=f"{self.submitted_calls} calls"),
        )
        checks.append(self._other_p99_check())
        return DemoReport(
            title="The Threads launch, replayed on loom",
            started_at=began_at,
            duration_s=round(duration, 1),
            settings={
                "users": self.settings.users,
                "ramp_s": self.settings.duration_s,
                "nodes": NODES,
                "regions": list(REGIONS),
                "workers": WORKERS,
                "seed": self.settings.seed,
                "tls": self.settings.tls,
            },
            samples=self.samples,
            events=self.events,
            checks=checks,
            totals={
                "signups": self.signups,
                "kv_ops": round(sum(s.kv_ops_per_s for s in self.samples)),
                "calls": self.submitted_calls,
                "failed_requests": self.failed_requests,
                "lost_writes": _lost(checks),
            },
        )

    def _other_p99_check(self) -> Check:
        """The other product's p99 over the launch against its p99 in the first tenth
        of it (before the surge), within a factor (it shares the nodes, and a node
        dies under it)."""
        name = "the other product's p99 stayed within bounds"
        latencies = self.other_ops.all_latencies_ms
        if len(latencies) < 20:
            return Check(name=name, passed=False, detail=f"only {len(latencies)} requests")
        before = percentile(latencies[: max(10, len(latencies) // 10)], 0.99) or 0.0
        overall = percentile(latencies, 0.99) or 0.0
        bound = max(OTHER_P99_FLOOR_MS, OTHER_P99_FACTOR * before)
        worst = max((s.other_p99_ms or 0.0) for s in self.samples)
        return Check(
            name=name,
            passed=overall <= bound,
            detail=(
                f"p99 {overall:.0f} ms over {len(latencies):,} requests, bound {bound:.0f} ms "
                f"(p99 before the surge {before:.0f} ms; worst second {worst:.0f} ms)"
            ),
        )

    def stop(self) -> None:
        self.cluster.stop()


def _lost(checks: list[Check]) -> int:
    """The number the "no acknowledged write lost" check counted."""
    for check in checks:
        if check.name == "no acknowledged write lost":
            return int(check.detail.rsplit(": ", 1)[1].split()[0])
    return 0
