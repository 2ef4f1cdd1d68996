"""One seeded run of the queue lifecycle under faults, and its checks.

The real `Scheduler`, `Worker`, `App` and `DurableQueue` run in virtual time (`clock`)
over `SimStore`. Workers reach schedulers through in-process channels instead of
sockets. Chaos crashes and restarts schedulers and workers, pauses them (a paused
process's requests do not leave and its functions do not progress), and makes the
store unavailable for a while. Then the faults stop, the queue drains, and the checks:

- every acknowledged submission ran at least once and ended succeeded, or dead with
  all its attempts used;
- one attempt of a call never ran twice, and two attempts of a call never ran at the
  same time unless the earlier one's worker was crashed or paused (its lease ended);
- attempts: a succeeded or dead call used at most `attempts_max` attempts, and no
  attempt was claimed before its due time (run_after, or the backoff after a failure);
- the rate limit held over every window (rate × window + the schedulers' bursts), and
  the concurrency limit held at every moment (runs on healthy workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from loom.core.errors import LoomError
from loom.functions import (
    App,
    CallState,
    Context,
    Retry,
    registry,
    scheduler_delivery,
    scheduler_ownership,
    scheduler_scan,
)
from loom.functions import app as app_module
from loom.functions import queue as queue_module
from loom.functions import scheduler as scheduler_module
from loom.functions import worker as worker_module
from loom.functions.limits import BURST_S
from loom.functions.queue import DurableQueue
from loom.functions.queue_transitions import CallTransitions
from loom.functions.scheduler import Scheduler
from loom.functions.worker import Worker
from loom.functions_sim.clock import EPOCH_S, VirtualTimeLoop, patched_time
from loom.functions_sim.store import SimClient, SimStore
from loom.runtime.rpc import CallTimedOut, ConnectionLost

PARTITIONS = 8
RATE = 4.0
CONCURRENCY = 3
ATTEMPTS = 6
LEASE_S = 2.0
CHAOS_S = 60.0
DRAIN_S = 600.0
BUGS = frozenset({"reclaim-early"})


@dataclass(slots=True)
class Run:
    call_id: str
    function: str
    attempt: int
    worker: str
    start: float
    end: float | None = None
    compromised: bool = False  # its worker crashed or paused meanwhile


@dataclass(slots=True)
class Result:
    seed: int
    submitted: int
    runs: int
    violations: list[str]
    faults: dict[str, int]


@dataclass(slots=True)
class SimWorkerProcess:
    name: str
    client: SimClient
    worker: Worker
    task: asyncio.Task[None]
    stop: asyncio.Event
    awake: asyncio.Event


@dataclass(slots=True)
class SimSchedulerProcess:
    client: SimClient
    scheduler: Scheduler
    task: asyncio.Task[None]
    stop: asyncio.Event
    awake: asyncio.Event


class FakeServer:
    """Stands in for the scheduler's RpcServer: workers call `_handle` in-process."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class Channel:
    """A worker's connection to one scheduler, through the simulation's network."""

    def __init__(self, world: World, port: int, caller: asyncio.Event) -> None:
        self.world = world
        self.port = port
        self.caller = caller

    async def call(self, body: bytes, *, timeout_s: float) -> bytes:
        target = self.world.schedulers_by_port.get(self.port)
        if target is None:
            raise ConnectionLost("simulated: the scheduler is gone")
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.sleep(self.world.rng.uniform(0.0005, 0.005))
                await target.awake.wait()
                await self.caller.wait()
                reply = await target.scheduler._handle(body)
                await asyncio.sleep(self.world.rng.uniform(0.0005, 0.005))
                await self.caller.wait()
        except TimeoutError:
            raise CallTimedOut("simulated: no reply in time") from None  # as RpcClient does
        if self.world.schedulers_by_port.get(self.port) is not target:
            raise ConnectionLost("simulated: the scheduler died before answering")
        return reply

    async def close(self) -> None:
        pass


class World:
    def __init__(self, seed: int, bugs: frozenset[str]) -> None:
        self.seed = seed
        self.bugs = bugs
        self.rng = random.Random(seed)
        self.store = SimStore(random.Random(seed * 7919 + 1))
        self.runs: list[Run] = []
        self.workers: dict[str, SimWorkerProcess] = {}
        self.schedulers: list[SimSchedulerProcess] = []
        self.schedulers_by_port: dict[int, SimSchedulerProcess] = {}
        self.scheduler_instances = 0
        self.ports = iter(range(20_000, 30_000))
        self.acked: dict[str, str] = {}  # call id → function
        # (call id, attempt) → (when the claim committed, its lease in s)
        self.claims: dict[tuple[str, int], tuple[float, float]] = {}
        # When the scheduler dispatched each claimed attempt (asked for its claim).
        self.dispatched: dict[tuple[str, int], float] = {}
        self.early: list[str] = []  # attempts claimed before their due time
        self.faults: dict[str, int] = {}

    # ---------------------------------------------------------------- processes

    def make_app(self, worker: str, awake: asyncio.Event) -> App:
        app = App("sim", partitions=PARTITIONS)
        retry = Retry(attempts_max=ATTEMPTS, backoff_s=1.0, backoff_max_s=4.0)
        world = self

        async def body(ctx: Context, function: str, low: float, high: float) -> int:
            run = Run(ctx.call_id, function, ctx.attempt, worker, asyncio.get_running_loop().time())
            world.runs.append(run)
            try:
                await awake.wait()
                await asyncio.sleep(world.rng.uniform(low, high))
                await awake.wait()
                if world.rng.random() < 0.1:
                    raise RuntimeError("simulated failure")
                return ctx.attempt
            finally:
                run.end = asyncio.get_running_loop().time()

        @app.function(retries=retry, timeout_s=3.0)
        async def work(ctx: Context, i: int) -> int:
            return await body(ctx, "work", 0.01, 1.5)

        @app.function(retries=retry, timeout_s=3.0, rate_limit_per_s=RATE)
        async def limited(ctx: Context, i: int) -> int:
            return await body(ctx, "limited", 0.01, 0.2)

        @app.function(retries=retry, timeout_s=3.0, concurrency_max=CONCURRENCY)
        async def narrow(ctx: Context, i: int) -> int:
            return await body(ctx, "narrow", 0.05, 0.5)

        return app

    def start_worker(self, name: str) -> None:
        client = SimClient(self.store)
        awake = asyncio.Event()
        awake.set()
        app = self.make_app(name, awake)
        app._client = app._functions_client = client  # type: ignore[assignment]
        world = self

        class SimWorker(Worker):
            async def _connection(self, scheduler: str, address: tuple[str, int]) -> Channel:  # type: ignore[override]
                channel = Channel(world, address[1], awake)
                self.schedulers[scheduler] = channel  # type: ignore[assignment]
                return channel

        worker = SimWorker(app, concurrency=8, name=name)
        worker.rng = random.Random(f"{self.seed}/{name}")
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        self.workers[name] = SimWorkerProcess(name, client, worker, task, stop, awake)

    def crash_worker(self, name: str) -> None:
        process = self.workers.pop(name)
        process.client.closed = True
        now = asyncio.get_running_loop().time()
        for run in self.runs:
            if run.worker == name and (run.end is None or run.end >= now):
                run.compromised = True
        for task in [*process.worker.tasks, *process.worker.pullers.values(), process.task]:
            task.cancel()

    def start_scheduler(self) -> None:
        client = SimClient(self.store)
        self.scheduler_instances += 1
        name = f"sched-{self.scheduler_instances}"
        store: Any = client  # the store's stand-in for a kv.Client
        scheduler = Scheduler(store, name=name, lease_s=LEASE_S, bugs=self.bugs)
        port = next(self.ports)
        scheduler.server = FakeServer(port)  # type: ignore[assignment]
        stop = asyncio.Event()
        awake = asyncio.Event()
        awake.set()
        task = asyncio.create_task(scheduler.run(stop))
        process = SimSchedulerProcess(client, scheduler, task, stop, awake)
        self.schedulers.append(process)
        self.schedulers_by_port[port] = process

    def crash_scheduler(self, process: SimSchedulerProcess) -> None:
        self.schedulers.remove(process)
        self.schedulers_by_port.pop(process.scheduler.port, None)
        process.client.closed = True
        for task in [*process.scheduler.tasks, process.task]:
            task.cancel()

    # ---------------------------------------------------------------- the run

    async def submitter(self, app: App) -> None:
        functions = ["work", "work", "limited", "narrow"]
        for index in range(60):
            name = self.rng.choice(functions)
            count = self.rng.randint(1, 6)
            with contextlib.suppress(LoomError):
                calls = await app.functions[name].submit_many(
                    [[index * 10 + j] for j in range(count)]
                )
                self.acked.update((c.call_id, name) for c in calls)
            await asyncio.sleep(self.rng.uniform(0.1, 1.5))

    async def chaos(self) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + CHAOS_S
        names = iter(f"w{i}" for i in range(3, 10_000))
        while loop.time() < end:
            await asyncio.sleep(self.rng.uniform(1.0, 5.0))
            fault = self.rng.choice(
                [
                    "crash-scheduler",
                    "pause-scheduler",
                    "crash-worker",
                    "pause-worker",
                    "outage",
                    "lost-answers",
                ]
            )
            self.faults[fault] = self.faults.get(fault, 0) + 1
            match fault:
                case "crash-scheduler" if self.schedulers:
                    self.crash_scheduler(self.rng.choice(self.schedulers))
                    await asyncio.sleep(self.rng.uniform(0.5, 4.0))
                    self.start_scheduler()
                case "pause-scheduler" if self.schedulers:
                    process = self.rng.choice(self.schedulers)
                    process.client.running.clear()
                    process.awake.clear()
                    await asyncio.sleep(self.rng.uniform(0.5, 3 * LEASE_S))
                    process.client.running.set()
                    process.awake.set()
                case "crash-worker" if self.workers:
                    self.crash_worker(self.rng.choice(sorted(self.workers)))
                    await asyncio.sleep(self.rng.uniform(0.5, 3.0))
                    self.start_worker(next(names))
                case "pause-worker" if self.workers:
                    paused = self.workers[self.rng.choice(sorted(self.workers))]
                    paused.client.running.clear()
                    paused.awake.clear()
                    started = loop.time()
                    await asyncio.sleep(self.rng.uniform(0.5, 12.0))
                    for run in self.runs:
                        if run.worker == paused.name and (run.end is None or run.end >= started):
                            run.compromised = True
                    paused.client.running.set()
                    paused.awake.set()
                case "outage":
                    self.store.faults.outage_until = loop.time() + self.rng.uniform(0.5, 3.0)
                case "lost-answers":
                    self.store.faults.lose_answer = 0.05
                    self.store.faults.refuse = 0.05
                    await asyncio.sleep(self.rng.uniform(1.0, 5.0))
                    self.store.faults.lose_answer = self.store.faults.refuse = 0.0

    async def drain(self, queue: DurableQueue) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + DRAIN_S
        empty = 0
        while loop.time() < end:
            with contextlib.suppress(LoomError):
                # Empty twice, a second apart: one look may fall between two pages.
                empty = 0 if await queue.pending() else empty + 1
                if empty == 2:
                    return
            await asyncio.sleep(1.0)

    async def main(self) -> Result:
        submitter_client = SimClient(self.store)
        queue = await DurableQueue.open(submitter_client, partitions=PARTITIONS)  # type: ignore[arg-type]
        for _ in range(2):
            self.start_scheduler()
        for name in ("w1", "w2"):
            self.start_worker(name)
        app = self.make_app("submitter", asyncio.Event())
        app._client = submitter_client  # type: ignore[assignment]
        await asyncio.gather(self.submitter(app), self.chaos())
        self.store.faults.lose_answer = self.store.faults.refuse = 0.0
        if not self.schedulers:
            self.start_scheduler()
        await self.drain(queue)
        records = {}
        for partition in range(queue.partitions):
            async for record in queue.records(partition):
                records[record.call_id] = record
        for process in list(self.schedulers):
            self.crash_scheduler(process)
        for name in list(self.workers):
            self.crash_worker(name)
        await asyncio.sleep(0.1)
        return Result(
            seed=self.seed,
            submitted=len(self.acked),
            runs=len(self.runs),
            violations=check(self, records),
            faults=self.faults,
        )


def check(world: World, records: dict[str, queue_module.CallRecord]) -> list[str]:
    problems: list[str] = []
    runs_of: dict[str, list[Run]] = {}
    for run in world.runs:
        runs_of.setdefault(run.call_id, []).append(run)
    for call_id, function in world.acked.items():
        record = records.get(call_id)
        if record is None:
            problems.append(f"acknowledged call {call_id} ({function}) is gone")
            continue
        if not runs_of.get(call_id):
            problems.append(
                f"acknowledged call {call_id} ({function}) never ran ({record.state.value})"
            )
        if record.state is CallState.DEAD and record.attempts_used < record.attempts_max:
            problems.append(
                f"call {call_id} dead after {record.attempts_used} of "
                f"{record.attempts_max} attempts"
            )
        elif record.state not in (CallState.SUCCEEDED, CallState.DEAD):
            problems.append(f"call {call_id} is still {record.state.value} after the drain")
        if record.attempts_used > record.attempts_max:
            problems.append(
                f"call {call_id} used {record.attempts_used} > {record.attempts_max} attempts"
            )
    for call_id, runs in runs_of.items():
        attempts = [r.attempt for r in runs]
        if len(attempts) != len(set(attempts)):
            problems.append(f"call {call_id}: one attempt ran twice ({sorted(attempts)})")
        live = [(r, _live(world, r)) for r in runs]
        for a, (a_from, a_to) in live:
            for b, (b_from, b_to) in live:
                if a.attempt < b.attempt and max(a_from, b_from) < min(a_to, b_to):
                    problems.append(
                        f"call {call_id}: attempts {a.attempt} and {b.attempt} ran at once "
                        f"under live leases ({a_from:.2f}-{a_to:.2f}, {b_from:.2f}-{b_to:.2f})"
                    )
    problems += world.early
    problems += _rate(world)
    problems += _concurrency(world)
    return problems


def _live(world: World, run: Run) -> tuple[float, float]:
    """The part of a run under its attempt's lease (the claim's commit + the lease)."""
    claimed, lease_s = world.claims.get((run.call_id, run.attempt), (run.start, 0.0))
    end = run.end if run.end is not None else run.start
    return max(run.start, claimed), min(end, claimed + lease_s)


def _rate(world: World) -> list[str]:
    """The limit holds where it is enforced, at dispatch: rate × window + the buckets'
    bursts. (Runs start a claim transaction and a delivery later; how much later varies
    with the store's and the network's latency, which no limiter controls.)"""
    starts = sorted(
        world.dispatched.get((r.call_id, r.attempt), r.start)
        for r in world.runs
        if r.function == "limited"
    )
    burst = world.scheduler_instances * max(1.0, RATE * BURST_S)
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            window = starts[j] - first
            allowed = RATE * window + burst
            if j - i + 1 > allowed + 1e-9:
                return [
                    f"rate limit: {j - i + 1} dispatches of `limited` in {window:.2f} s "
                    f"(allowed {allowed:.1f})"
                ]
    return []


def _concurrency(world: World) -> list[str]:
    events: list[tuple[float, int]] = []
    for run in world.runs:
        if run.function == "narrow" and not run.compromised and run.end is not None:
            events += [(run.start, 1), (run.end, -1)]
    running = 0
    for moment, change in sorted(events, key=lambda e: (e[0], e[1])):
        running += change
        if running > CONCURRENCY:
            return [f"concurrency limit: {running} runs of `narrow` at {moment:.2f} s"]
    return []


def _clock_readers() -> list[str]:
    """The loaded modules of loom.functions that read `time` (they must all read the
    virtual clock here; a new module split off another is easy to forget)."""
    return [
        name
        for name, module in sorted(sys.modules.items())
        if name.startswith("loom.functions.") and getattr(module, "time", None) is time
    ]


def run_seed(seed: int, bugs: Iterable[str] = ()) -> Result:
    unknown = set(bugs) - BUGS
    if unknown:
        raise ValueError(f"unknown bugs {sorted(unknown)}; known: {sorted(BUGS)}")
    loop = VirtualTimeLoop()
    world = World(seed, frozenset(bugs))
    # Every module that reads `time` (the scheduler's parts too: a module left out
    # would read the machine's clock, and a seed would no longer replay).
    modules = [
        scheduler_module,
        scheduler_ownership,
        scheduler_scan,
        scheduler_delivery,
        worker_module,
        queue_module,
        app_module,
        registry,
    ]
    unpatched = sorted(set(_clock_readers()) - {m.__name__ for m in modules})
    assert not unpatched, f"modules reading the machine's clock in the simulation: {unpatched}"
    claim_many = DurableQueue.claim_many

    async def recorded(self: CallTransitions, *args: Any, **kwargs: Any) -> Any:
        dispatched = loop.time()  # the scheduler took its tokens just before
        done = await claim_many(self, *args, **kwargs)
        for record in done:
            if isinstance(record, queue_module.CallRecord):
                world.claims[record.call_id, record.attempt] = (loop.time(), record.lease_ms / 1000)
                world.dispatched[record.call_id, record.attempt] = dispatched
                # The attempt may not start before its due time (the backoff after a
                # failure, or run_after): one clock for everyone in the simulation.
                claimed_ms = (EPOCH_S + loop.time()) * 1000
                if claimed_ms < record.run_after_ms:
                    world.early.append(
                        f"call {record.call_id} attempt {record.attempt} claimed "
                        f"{record.run_after_ms - claimed_ms:.0f} ms before its due time"
                    )
        return done

    ids = random.Random(f"{seed}/ids")
    namespace = vars(queue_module)
    secrets_module = namespace["secrets"]
    try:
        DurableQueue.claim_many = recorded  # type: ignore[method-assign]
        # Call ids from the seed, not the OS: a run of a seed is the same run.
        namespace["secrets"] = SimpleNamespace(
            token_hex=lambda n: ids.getrandbits(8 * n).to_bytes(n, "big").hex()
        )
        with patched_time(loop, modules):
            return loop.run_until_complete(world.main())
    finally:
        DurableQueue.claim_many = claim_many  # type: ignore[method-assign]
        namespace["secrets"] = secrets_module
        loop.close()
