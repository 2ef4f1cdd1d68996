"""Sagas: a sequence of steps with compensations, run as one function call, with the
saga log in loom kv (DESIGN §8).

    signup = app.saga("signup", recovery=Recovery.BACKWARD)

    @signup.step(compensate=delete_account)
    async def create_account(ctx, data): ...      # returns what the next step gets

    @signup.step()
    async def send_welcome(ctx, account): ...

    call = await signup.submit({"name": "ada"})

Each step receives the previous step's output (the first one: the saga's argument);
the saga's result is the last step's output. The log records every finished step's
output and every finished compensation under the call's id, so a retried saga call —
at-least-once, after a crash or a failure — skips what is done.
- Forward recovery (the default): a failed step fails the call, which is retried with
  the saga's `Retry` policy; done steps are not run again. When the attempts run out,
  the call is dead-lettered (replayable), unless `compensate_when_exhausted` asks for
  compensation then.
- Backward recovery: a failed step compensates the done steps in reverse, each once,
  and the call ends dead-lettered with the step's error.
Steps should be idempotent or use `ctx.once`: a crash between a step's effect and its
log record runs the step again.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from loom.core.errors import InvalidArgument
from loom.functions.errors import NonRetryable
from loom.functions.queue import KEYSPACE, Criticality

if TYPE_CHECKING:
    from loom.functions.app import App, Call, Context, Function, Retry

STEPS_MAX = 100
Step = Callable[["Context", Any], Awaitable[Any]]


class Recovery(enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


class SagaCompensated(NonRetryable):
    """A step failed and the done steps were compensated (backward recovery)."""


@dataclass(frozen=True, slots=True)
class SagaStep:
    name: str
    run: Step
    compensate: Step | None


@dataclass(slots=True)
class Saga:
    app: App
    name: str
    recovery: Recovery
    compensate_when_exhausted: bool
    steps: list[SagaStep] = field(default_factory=list)
    function: Function | None = None

    def step(
        self, *, compensate: Step | None = None, name: str | None = None
    ) -> Callable[[Step], Step]:
        def register(fn: Step) -> Step:
            if len(self.steps) >= STEPS_MAX:
                raise InvalidArgument(f"a saga has at most {STEPS_MAX} steps")
            self.steps.append(SagaStep(name or fn.__name__, fn, compensate))
            return fn

        return register

    async def submit(self, argument: Any, **options: Any) -> Call:
        assert self.function is not None
        return await self.function.submit(argument, **options)

    async def run(self, ctx: Context, argument: Any) -> Any:
        """The saga's function body: the steps, from the log onwards."""
        if not self.steps:
            raise InvalidArgument(f"saga {self.name} has no steps")
        log = ctx.kv.keyspace(KEYSPACE)
        shard = b"saga/" + ctx.call_id.encode()
        value = argument
        done: list[tuple[SagaStep, Any]] = []
        for index, step in enumerate(self.steps):
            key = shard + b"/step/%d" % index
            logged = await log.get(key, shard_key=shard)
            if logged is not None:
                output = msgspec.msgpack.decode(logged.value)
            else:
                try:
                    output = await step.run(ctx, value)
                except Exception as error:
                    if self.recovery is Recovery.BACKWARD or (
                        self.compensate_when_exhausted and ctx.attempt >= self._attempts_max()
                    ):
                        await self._compensate(ctx, shard, done)
                        raise SagaCompensated(
                            f"step {step.name} failed: {error!r}; compensated"
                        ) from error
                    raise
                await log.put(key, msgspec.msgpack.encode(output), shard_key=shard)
            done.append((step, value))
            value = output
        return value

    def _attempts_max(self) -> int:
        assert self.function is not None
        return self.function.retries.attempts_max

    async def _compensate(
        self, ctx: Context, shard: bytes, done: list[tuple[SagaStep, Any]]
    ) -> None:
        log = ctx.kv.keyspace(KEYSPACE)
        for index in reversed(range(len(done))):
            step, step_input = done[index]
            if step.compensate is None:
                continue
            key = shard + b"/undo/%d" % index
            if await log.get(key, shard_key=shard) is not None:
                continue
            await step.compensate(ctx, step_input)
            await log.put(key, b"", shard_key=shard)


def make_saga(
    app: App,
    name: str,
    *,
    recovery: Recovery,
    retries: Retry | None,
    timeout_s: float,
    criticality: Criticality,
    compensate_when_exhausted: bool,
) -> Saga:
    saga = Saga(app, name, recovery, compensate_when_exhausted)
    register = app.function(
        retries=retries, timeout_s=timeout_s, criticality=criticality, name=f"saga.{name}"
    )

    async def body(ctx: Context, argument: Any) -> Any:
        return await saga.run(ctx, argument)

    saga.function = register(body)
    return saga
