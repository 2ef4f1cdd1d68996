"""The scheduler: owns DurableQ partitions by leases in the store and dispatches their
due calls to workers, under the functions' limits (DESIGN §8).

- **Ownership.** Each scheduler takes about P / (live schedulers) partitions. A free
  partition is taken at once; a held one only after its lease record has not moved
  for a lease period on this process's monotonic clock (never by comparing wall
  clocks). Every write a scheduler makes to a partition — claim, reclaim, expire —
  checks its lease record in the same transaction, so a paused scheduler that wakes
  after losing a partition changes nothing. (`scheduler_ownership`)
- **Dispatch.** Workers long-poll with `Pull`. A pass picks calls by weighted fair
  share across tenants (criticality first within a tenant), within each function's
  allotment of its global rate and concurrency limits (`limits`), within each
  declared downstream's AIMD rate, groups batched functions' calls into batches,
  claims them in one transaction per partition and hands them to the waiting workers.
  (`scheduler_dispatch` picks; `scheduler_delivery` claims and delivers)
- **Time-shifting.** While the scheduler is busy (calls of normal or high criticality
  left waiting for capacity, or a downstream throttled), calls of low criticality
  wait unless their deadline is near.
- **Leases of calls.** A claimed call is the scheduler's until the worker reports it
  finished; the worker's heartbeats keep it; if neither comes within the call's lease
  (on this scheduler's clock), the call is reclaimed: at-least-once. (`scheduler_scan`)

This module wires those parts around one `CallBook` (`scheduler_state`) and runs them.
Its rules:
- The parts share state only through what they are given here: the book (with
  `stats`), the ownership's partitions, the dispatcher's waiters, `_spawn` (every
  background task) and `_dispatch` (one pass).
- Every loop runs in the `run` task group; every background task is spawned by
  `_spawn`, owned in `tasks` and awaited on stop; on stop, waiting workers get empty
  work, and the partitions are handed back.
- A dispatch pass runs after each scan round and on each pull, synchronously; its
  claims run in the background.
- Succeeded calls are forgotten after the retention period, fenced by the partition
  lease like every scheduler write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any

from loom import kv
from loom.core.errors import InvalidArgument, LoomError
from loom.functions import protocol, registry
from loom.functions.limits import AimdSettings
from loom.functions.protocol import Ack, Pull, Report, Work
from loom.functions.queue import DurableQueue
from loom.functions.registry import SchedulerMember
from loom.functions.scheduler_delivery import Delivery
from loom.functions.scheduler_dispatch import Dispatcher
from loom.functions.scheduler_ownership import Ownership
from loom.functions.scheduler_scan import Scanner
from loom.functions.scheduler_state import (
    LEASE_SLACK_MS,
    SCAN_BUSY_S,
    CallBook,
    Downstream,
    FunctionState,
    Inflight,
    PartitionView,
    Waiter,
    call_lease_ms,
)
from loom.runtime.rpc import RpcServer

__all__ = [
    "LEASE_S",
    "LEASE_SLACK_MS",
    "RETENTION_S",
    "RETENTION_S_MAX",
    "RETENTION_S_MIN",
    "Downstream",
    "FunctionState",
    "Inflight",
    "PartitionView",
    "Scheduler",
    "Waiter",
    "call_lease_ms",
]

log = logging.getLogger("loom.scheduler")

LEASE_S = 4.0
CONFIG_REFRESH_S = 1.0
# How long a succeeded call (its result, and its idempotency key) is remembered.
RETENTION_S = 7 * 86_400.0
RETENTION_S_MIN = 1.0
RETENTION_S_MAX = 400 * 86_400.0
RETENTION_CHECK_S = 10.0


class Scheduler:
    def __init__(
        self,
        client: kv.Client,
        *,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        lease_s: float = LEASE_S,
        aimd: AimdSettings | None = None,
        retention_s: float = RETENTION_S,
        bugs: frozenset[str] = frozenset(),
        tls: kv.TlsConfig | None = None,
    ) -> None:
        # Deliberate bugs, for the simulation to prove its checks bite (loom sim
        # --functions --bug …): "reclaim-early" reclaims calls at a quarter of their lease.
        self.bugs = bugs
        if not RETENTION_S_MIN <= retention_s <= RETENTION_S_MAX:
            raise InvalidArgument(f"retention must be {RETENTION_S_MIN:g}..{RETENTION_S_MAX:g} s")
        self.retention_s = retention_s
        self.client = client
        self.name = name or f"sched-{secrets.token_hex(4)}"
        self.lease_s = lease_s
        self.server = RpcServer(self._handle, host, port, tls=tls)  # workers' TLS (ADR 0015)
        self.host = host
        self.queue: DurableQueue | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        self.book = CallBook(aimd or AimdSettings())
        self.ownership = Ownership(
            client=client,
            name=self.name,
            lease_s=lease_s,
            book=self.book,
            member=self._member,
        )
        self.dispatcher = Dispatcher(self.book)
        self.scanner = Scanner(
            book=self.book,
            ownership=self.ownership,
            spawn=self._spawn,
            bugs=bugs,
        )
        self.delivery = Delivery(
            name=self.name,
            book=self.book,
            dispatcher=self.dispatcher,
            ownership=self.ownership,
            spawn=self._spawn,
            dispatch=self._dispatch,
        )

    @property
    def port(self) -> int:
        return self.server.port

    # The parts' state, by the names it has on a scheduler.

    @property
    def partitions(self) -> dict[int, PartitionView]:
        return self.ownership.partitions

    @property
    def functions(self) -> dict[tuple[str, str], FunctionState]:
        return self.book.functions

    @property
    def downstreams(self) -> dict[str, Downstream]:
        return self.book.downstreams

    @property
    def where(self) -> dict[str, tuple[str, str]]:
        return self.book.where

    @property
    def stats(self) -> dict[str, int]:
        return self.book.stats

    @property
    def waiters(self) -> list[Waiter]:
        return self.dispatcher.waiters

    @property
    def busy(self) -> bool:
        return self.dispatcher.busy

    @busy.setter
    def busy(self, busy: bool) -> None:
        self.dispatcher.busy = busy

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Opens the queue and starts listening (then `run`)."""
        queue = self.queue = await DurableQueue.open(self.client)
        await self.server.start()
        log.info(
            "scheduler %s on %s:%d, %d partitions",
            self.name, self.host, self.port, queue.partitions,
        )  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; then hands its partitions back."""
        if self.queue is None:
            await self.start()
        queue = self.queue
        assert queue is not None
        loops = [
            self.ownership.loop(queue),
            self._config_loop(),
            self._scan_loop(queue),
            self._retention_loop(),
        ]
        async with asyncio.TaskGroup() as group:
            running = [group.create_task(loop) for loop in loops]
            await stop.wait()
            for task in running:
                task.cancel()
        for waiter in self.waiters:
            if not waiter.future.done():
                waiter.future.set_result(Work(scheduler=self.name))
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.close()
        with contextlib.suppress(LoomError):
            for view in list(self.partitions.values()):
                await queue.release(view.hold)
            await registry.leave(self.client, self.name)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("scheduler task failed", exc_info=task.exception())

    def _member(self, beat: int) -> SchedulerMember:
        """This scheduler's entry in the registry, at its `beat`-th ownership round."""
        return SchedulerMember(
            name=self.name, host=self.host, port=self.port, beat=beat, status=self.status()
        )

    # -------------------------------------------------------------- configuration

    def _function(self, app: str, function: str) -> FunctionState:
        return self.book.function(app, function)

    async def _config_loop(self) -> None:
        while True:
            try:
                configs = await registry.read_configs(self.client)
            except LoomError as error:
                log.warning("reading function configs: %s", error)
            else:
                for config in configs:
                    self._function(config.app, config.function).config = config
                self._reallot()
            await asyncio.sleep(CONFIG_REFRESH_S)

    def _reallot(self) -> None:
        """Each function's share of its limits follows the partitions held."""
        assert self.queue is not None
        now = time.monotonic()
        self.book.reallot(self.partitions, self.queue.partitions, now)

    async def _retention_loop(self) -> None:
        """Forgets succeeded calls older than the retention period, partition by
        partition (fenced by the partition lease like every scheduler write)."""
        assert self.queue is not None
        while True:
            await asyncio.sleep(min(RETENTION_CHECK_S, self.retention_s / 2))
            before_ms = int((time.time() - self.retention_s) * 1000)
            for view in list(self.partitions.values()):
                with contextlib.suppress(LoomError):
                    while forgotten := await self.queue.forget_done(view.hold, before_ms=before_ms):
                        self.stats["forgotten"] += forgotten

    # ------------------------------------------------------------ scan, dispatch

    async def _scan_loop(self, queue: DurableQueue) -> None:
        while True:
            now = time.monotonic()
            due = [view for view in self.partitions.values() if self.scanner.should_scan(view, now)]
            if due:
                await asyncio.gather(*(self.scanner.scan(queue, view) for view in due))
            self.scanner.reclaim_silent(queue)
            self._dispatch()
            self.wake.clear()
            # Not `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that
            # arrives as the event is set (it returns the result instead), and this loop
            # then outlived `run`'s cancel and hung the scheduler's stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SCAN_BUSY_S):
                    await self.wake.wait()

    def _dispatch(self) -> None:
        """One pass: picks calls for the waiting workers (synchronously, so passes never
        pick the same call twice), then claims them in the background."""
        if not self.waiters:
            return
        assert self.queue is not None
        now = time.monotonic()
        now_ms = int(time.time() * 1000)
        chosen = self.dispatcher.pick(now, now_ms, self.queue.partitions)
        if chosen:
            self._spawn(self.delivery.claim_and_deliver(self.queue, chosen, now_ms))

    # ------------------------------------------------------------------- serving

    async def _handle(self, body: bytes) -> bytes:
        message = protocol.decode(body)
        match message:
            case Pull():
                return protocol.encode(await self.delivery.on_pull(message))
            case Report():
                self._on_report(message)
                return protocol.encode(Ack())
            case _:
                raise InvalidArgument(f"a scheduler does not take {type(message).__name__}")

    def _on_report(self, report: Report) -> None:
        self.book.settle(report, time.monotonic())
        if report.finished:
            self.wake.set()

    # ------------------------------------------------------------------- status

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "name": self.name,
            "partitions": sorted(self.partitions),
            "functions": {
                f"{app}.{function}": {
                    "candidates": state.candidate_count(),
                    "running": len(state.inflight),
                    "dispatched": state.dispatched,
                    "finished": state.finished,
                    "rate_allotted": state.allotment.rate_per_s,
                    "concurrency_allotted": state.allotment.concurrency,
                }
                for (app, function), state in self.functions.items()
            },
            "downstreams": {
                name: {
                    "rate": round(d.aimd.current(now), 1),
                    "throttling": d.aimd.throttling,
                    "cuts": d.aimd.cuts,
                    "signals": d.aimd.signals,
                }
                for name, d in self.downstreams.items()
            },
            **self.stats,
        }
