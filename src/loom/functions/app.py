"""The functions platform's Python API: an `App` declares functions, `submit` queues a
call durably in DurableQ, `Call.result()` waits for it (DESIGN §8).

Implemented so far: retries (attempts, exponential backoff with full jitter, then the
dead-letter state), timeouts, criticality, run-after and deadlines recorded with the
call, idempotency keys. Arguments and results travel as MessagePack (msgspec), so they
must be plain data (numbers, strings, bytes, lists, dicts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from loom import kv
from loom.core.errors import InvalidArgument, LoomError, NotFound
from loom.functions.queue import CallRecord, CallState, Criticality, DurableQueue

TIMEOUT_S_MAX = 24 * 3600.0
RESULT_POLL_S = 0.05


class CallFailed(LoomError):
    """The call ran out of attempts (dead-lettered) or expired; `.record` says why."""

    def __init__(self, message: str, record: CallRecord) -> None:
        super().__init__(message)
        self.record = record


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


@dataclass(frozen=True, slots=True)
class Context:
    """What a running function gets: who it is, and a kv client of the same cluster."""

    call_id: str
    attempt: int
    idempotency_key: str | None
    kv: kv.Client


@dataclass(slots=True)
class Function:
    app: App
    name: str
    fn: Callable[..., Any]
    retries: Retry
    timeout_s: float
    criticality: Criticality

    @property
    def is_async(self) -> bool:
        return asyncio.iscoroutinefunction(self.fn)

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
        try:
            payload = msgspec.msgpack.encode([list(args), kwargs])
        except (TypeError, msgspec.EncodeError) as error:
            raise InvalidArgument(f"arguments must be plain data: {error}") from None
        queue = await self.app.queue()
        submitted = await queue.submit(
            self.app.name,
            self.name,
            payload,
            idempotency_key=idempotency_key,
            run_after_ms=int(run_after * 1000) if run_after is not None else None,
            deadline_ms=int(deadline * 1000) if deadline is not None else None,
            criticality=self.criticality,
            attempts_max=self.retries.attempts_max,
            backoff_ms=int(self.retries.backoff_s * 1000),
            backoff_max_ms=int(self.retries.backoff_max_s * 1000),
        )
        return Call(queue, submitted.record.call_id)


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
    """A named set of functions on one loom cluster (`cluster`: any address of it)."""

    name: str
    cluster: str = "127.0.0.1:7300"
    token: str | None = None
    partitions: int = 16
    functions: dict[str, Function] = field(default_factory=dict)
    _client: kv.Client | None = None
    _queue: DurableQueue | None = None

    def function(
        self,
        *,
        retries: Retry | None = None,
        timeout_s: float = 60.0,
        criticality: Criticality = Criticality.NORMAL,
        name: str | None = None,
    ) -> Callable[[Callable[..., Any]], Function]:
        if not 0 < timeout_s <= TIMEOUT_S_MAX:
            raise InvalidArgument(f"timeout_s must be in (0, {TIMEOUT_S_MAX:g}]")

        def register(fn: Callable[..., Any]) -> Function:
            function = Function(
                app=self,
                name=name or fn.__name__,
                fn=fn,
                retries=retries or Retry(),
                timeout_s=timeout_s,
                criticality=criticality,
            )
            if function.name in self.functions:
                raise InvalidArgument(f"function {function.name!r} is already registered")
            self.functions[function.name] = function
            return function

        return register

    async def client(self) -> kv.Client:
        if self._client is None:
            self._client = await kv.connect(self.cluster, token=self.token)
        return self._client

    async def queue(self) -> DurableQueue:
        if self._queue is None:
            queue = DurableQueue(await self.client(), partitions=self.partitions)
            await queue.ensure_keyspace()
            self._queue = queue
        return self._queue

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        self._client = None
        self._queue = None
