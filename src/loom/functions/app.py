"""The functions platform's Python API: an `App` declares functions, `submit` queues a
call durably in DurableQ, `Call.result()` waits for it (DESIGN §8).

Arguments and results travel as MessagePack (msgspec), so they must be plain data
(numbers, strings, bytes, lists, dicts). A batched function takes a list: each call
of it is submitted with exactly one argument, and the function gets the arguments of
up to `Batch.size_max` calls at once and returns one result per call, in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from loom import kv
from loom.core.errors import InvalidArgument, NotFound
from loom.functions.errors import CallFailed
from loom.functions.limits import allotted_partitions
from loom.functions.queue import (
    PARTITIONS_DEFAULT,
    CallRecord,
    CallState,
    Criticality,
    DurableQueue,
    Submission,
)
from loom.functions.registry import Batch, FunctionConfig
from loom.functions.saga import Recovery, Saga, make_saga
from loom.kv import Transaction

TIMEOUT_S_MAX = 24 * 3600.0
RESULT_POLL_S = 0.05
ONCE_PREFIX = b"__once/"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Retry:
    attempts_max: int = 3
    backoff_s: float = 1.0
    backoff_max_s: float = 600.0

    def __post_init__(self) -> None:
        if not 1 <= self.attempts_max <= 1000:
            raise InvalidArgument("attempts_max must be 1..1000")
        if not 0 < self.backoff_s <= self.backoff_max_s <= 86_400:
            raise InvalidArgument("need 0 < backoff_s <= backoff_max_s <= 86400")


@dataclass(slots=True)
class Context:
    """What a running function gets: who it is, a kv client of the same cluster, a way
    to report back-pressure, and an exactly-once helper (`once`)."""

    call_id: str
    attempt: int
    idempotency_key: str | None
    kv: kv.Client
    downstream: tuple[str, ...] = ()
    batch: tuple[str, ...] = ()  # the call ids of a batched invocation
    signals: list[str] = field(default_factory=list)

    def backpressure(self, downstream: str | None = None) -> None:
        """Tell the scheduler a downstream is overloaded (all declared ones if None):
        it cuts the dispatch rate of everything that uses it."""
        self.signals.extend([downstream] if downstream else self.downstream)

    async def once(
        self,
        keyspace: str,
        shard_key: bytes,
        step: str,
        effect: Callable[[Transaction], Awaitable[T]],
    ) -> T:
        """Runs `effect(tx)` in one transaction of `shard_key`'s μshard together with a
        marker (call id + `step`), unless the marker is already there: a retry of this
        call, however much later, changes nothing and returns the first result. `step`
        names one effect of the call: two effects of one call need two steps, even in
        different shard keys (they may share a μshard)."""
        if not step or len(step) > 256 or "/" in step:
            raise InvalidArgument("step must be 1..256 characters without '/'")
        marker = ONCE_PREFIX + f"{self.call_id}/{step}".encode()

        async def apply(tx: Transaction) -> T:
            done = await tx.get(marker)
            if done is not None:
                result: T = msgspec.msgpack.decode(done.value)
                return result
            result = await effect(tx)
            await tx.put(marker, msgspec.msgpack.encode(result))
            return result

        return await self.kv.keyspace(keyspace).run_transaction(apply, shard_key=shard_key)


@dataclass(slots=True)
class Function:
    app: App
    name: str
    fn: Callable[..., Any]
    retries: Retry
    timeout_s: float
    criticality: Criticality
    rate_limit_per_s: float | None = None
    concurrency_max: int | None = None
    batch: Batch | None = None
    downstream: tuple[str, ...] = ()

    @property
    def is_async(self) -> bool:
        return asyncio.iscoroutinefunction(self.fn)

    def config(self) -> FunctionConfig:
        return FunctionConfig(
            app=self.app.name,
            function=self.name,
            tenant=self.app.tenant or self.app.name,
            weight=self.app.weight,
            rate_limit_per_s=self.rate_limit_per_s,
            concurrency_max=self.concurrency_max,
            batch=self.batch,
            downstream=self.downstream,
            criticality=self.criticality,
            timeout_s=self.timeout_s,
        )

    def _submission(
        self,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        partitions: int,
        *,
        run_after: float | None,
        deadline: float | None,
        idempotency_key: str | None,
    ) -> Submission:
        if self.batch is not None and (len(args) != 1 or kwargs):
            raise InvalidArgument(f"{self.name} is batched: submit exactly one argument per call")
        try:
            payload = msgspec.msgpack.encode([list(args), kwargs])
        except (TypeError, msgspec.EncodeError) as error:
            raise InvalidArgument(f"arguments must be plain data: {error}") from None
        return Submission(
            self.app.name,
            self.name,
            payload,
            partitions=allotted_partitions(self.concurrency_max, partitions),
            idempotency_key=idempotency_key,
            run_after_ms=int(run_after * 1000) if run_after is not None else None,
            deadline_ms=int(deadline * 1000) if deadline is not None else None,
            criticality=self.criticality,
            attempts_max=self.retries.attempts_max,
            backoff_ms=int(self.retries.backoff_s * 1000),
            backoff_max_ms=int(self.retries.backoff_max_s * 1000),
        )

    async def submit(
        self,
        *args: Any,
        run_after: float | None = None,
        deadline: float | None = None,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> Call:
        """Queue a call (durable when this returns). `run_after`/`deadline`: Unix times
        in seconds. A repeated `idempotency_key` returns the existing call."""
        queue = await self.app.queue()
        submission = self._submission(
            args,
            kwargs,
            queue.partitions,
            run_after=run_after,
            deadline=deadline,
            idempotency_key=idempotency_key,
        )
        submitted = await queue.submit(submission)
        return Call(queue, submitted.record.call_id)

    async def submit_many(
        self,
        calls: Sequence[Sequence[Any]],
        *,
        run_after: float | None = None,
        deadline: float | None = None,
        idempotency_keys: Sequence[str | None] | None = None,
    ) -> list[Call]:
        """Queue many calls (each a sequence of positional arguments) in one transaction
        per partition: much cheaper per call than `submit` one at a time."""
        if idempotency_keys is not None and len(idempotency_keys) != len(calls):
            raise InvalidArgument("one idempotency key per call, or none")
        queue = await self.app.queue()
        keys = idempotency_keys or [None] * len(calls)
        submissions = [
            self._submission(
                args,
                {},
                queue.partitions,
                run_after=run_after,
                deadline=deadline,
                idempotency_key=key,
            )
            for args, key in zip(calls, keys, strict=True)
        ]
        return [Call(queue, s.record.call_id) for s in await queue.submit_many(submissions)]


@dataclass(frozen=True, slots=True)
class Call:
    queue: DurableQueue
    call_id: str

    async def status(self) -> CallRecord:
        record = await self.queue.get(self.call_id)
        if record is None:
            raise NotFound(f"no call {self.call_id}")
        return record

    async def result(self, *, timeout_s: float = 30.0) -> Any:
        """The function's return value once the call succeeded; `CallFailed` if it was
        dead-lettered or expired; `TimeoutError` if it is still pending after
        `timeout_s` (the call goes on)."""
        deadline = time.monotonic() + timeout_s
        while True:
            record = await self.status()
            if record.state is CallState.SUCCEEDED:
                assert record.result is not None
                return msgspec.msgpack.decode(record.result)
            if record.state in (CallState.DEAD, CallState.EXPIRED, CallState.FAILED):
                raise CallFailed(
                    f"call {self.call_id} {record.state.value}: {record.error}", record
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"call {self.call_id} is still {record.state.value}")
            await asyncio.sleep(RESULT_POLL_S)


@dataclass(slots=True)
class App:
    """A named set of functions on one loom cluster (`cluster`: any address of it).
    `tenant` (default: the app's name) and `weight` set its fair share of dispatch."""

    name: str
    cluster: str = "127.0.0.1:7300"
    token: str | None = None
    partitions: int = PARTITIONS_DEFAULT
    tenant: str | None = None
    weight: int = 1
    functions: dict[str, Function] = field(default_factory=dict)
    # Functions' own kv requests (`ctx.kv`) give up this soon when a keyspace throttles
    # them, so `Throttled` reaches the platform: the call goes back to the queue without
    # using an attempt and the downstream's controller slows dispatch.
    kv_timeout_s: float = 3.0
    # TLS to the cluster and, for workers, to the schedulers (ADR 0015).
    tls: kv.TlsConfig | None = None
    _client: kv.Client | None = None
    _functions_client: kv.Client | None = None
    _queue: DurableQueue | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.weight <= 100:
            raise InvalidArgument("weight must be 1..100")

    def function(
        self,
        *,
        retries: Retry | None = None,
        timeout_s: float = 60.0,
        criticality: Criticality = Criticality.NORMAL,
        rate_limit_per_s: float | None = None,
        concurrency_max: int | None = None,
        batch: Batch | None = None,
        downstream: Sequence[str] = (),
        name: str | None = None,
    ) -> Callable[[Callable[..., Any]], Function]:
        """Declares a function. Limits hold across all schedulers and workers; a batch
        counts as its size. `downstream`: what it loads (e.g. "kv:threads_graph"),
        each with an AIMD controller that cuts the rate when it pushes back."""
        if not 0 < timeout_s <= TIMEOUT_S_MAX:
            raise InvalidArgument(f"timeout_s must be in (0, {TIMEOUT_S_MAX:g}]")
        if rate_limit_per_s is not None and not 0 < rate_limit_per_s <= 1_000_000:
            raise InvalidArgument("rate_limit_per_s must be in (0, 1000000]")
        if concurrency_max is not None and not 1 <= concurrency_max <= 100_000:
            raise InvalidArgument("concurrency_max must be 1..100000")
        if len(downstream) > 16 or not all(
            isinstance(d, str) and 0 < len(d) <= 128 for d in downstream
        ):
            raise InvalidArgument("downstream: at most 16 names of 1..128 characters")

        def register(fn: Callable[..., Any]) -> Function:
            function = Function(
                app=self,
                name=name or fn.__name__,
                fn=fn,
                retries=retries or Retry(),
                timeout_s=timeout_s,
                criticality=criticality,
                rate_limit_per_s=rate_limit_per_s,
                concurrency_max=concurrency_max,
                batch=batch,
                downstream=tuple(downstream),
            )
            if function.name in self.functions:
                raise InvalidArgument(f"function {function.name!r} is already registered")
            self.functions[function.name] = function
            return function

        return register

    def saga(
        self,
        name: str,
        *,
        recovery: Recovery = Recovery.FORWARD,
        retries: Retry | None = None,
        timeout_s: float = 600.0,
        criticality: Criticality = Criticality.NORMAL,
        compensate_when_exhausted: bool = False,
    ) -> Saga:
        """Declares a saga: add its steps with `@saga.step(compensate=...)`, then
        `await saga.submit(argument)`. See `loom.functions.saga`."""
        return make_saga(
            self,
            name,
            recovery=recovery,
            retries=retries,
            timeout_s=timeout_s,
            criticality=criticality,
            compensate_when_exhausted=compensate_when_exhausted,
        )

    async def client(self) -> kv.Client:
        """The client of the queue (submissions, outcomes)."""
        if self._client is None:
            self._client = await kv.connect(self.cluster, token=self.token, tls=self.tls)
        return self._client

    async def functions_client(self) -> kv.Client:
        """The client functions get as `ctx.kv` (see `kv_timeout_s`)."""
        if self._functions_client is None:
            self._functions_client = await kv.connect(
                self.cluster, token=self.token, timeout_s=self.kv_timeout_s, tls=self.tls
            )
        return self._functions_client

    async def queue(self) -> DurableQueue:
        if self._queue is None:
            self._queue = await DurableQueue.open(await self.client(), partitions=self.partitions)
        return self._queue

    async def close(self) -> None:
        for client in (self._client, self._functions_client):
            if client is not None:
                await client.close()
        self._client = self._functions_client = None
        self._queue = None
