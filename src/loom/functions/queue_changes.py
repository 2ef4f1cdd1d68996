"""What a worker reports about an attempt, and pure changes of one call record.

A change (`_Change`) takes a call's record as read and returns its new record, the
index keys to delete and the index entries to write; it refuses by raising
`StaleAttempt`, and then nothing of its call is written. Here are the changes more
than one transition uses (claiming a call, finishing an attempt with an `Outcome`);
`queue_transitions` applies changes, one transaction per partition, and keeps those
of a single transition (reclaim, expire, replay) beside it. Rules: no IO and no clock
(`now_ms` and the jitter are arguments); a change to a running call first checks that
it runs in the attempt named (`_require_running`). Names with one leading underscore
are private to the queue modules, not to this file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from loom.core.errors import InvalidArgument
from loom.functions.queue_records import (
    _ENCODER,
    CallRecord,
    CallState,
    DueEntry,
    RunningEntry,
    dead_key,
    done_key,
    due_key,
    running_key,
)


class StaleAttempt(InvalidArgument):
    """The call moved on (another attempt, or finished): this transition changes nothing."""


def retry_delay_ms(record: CallRecord, rng_fraction: float) -> int:
    """Exponential backoff with full jitter for the attempt that just failed."""
    ceiling = min(record.backoff_max_ms, record.backoff_ms * 2 ** max(0, record.attempts_used - 1))
    return int(ceiling * rng_fraction)


# What a worker reports about one attempt.
@dataclass(frozen=True, slots=True)
class Succeeded:
    call_id: str
    attempt: int
    result: bytes


@dataclass(frozen=True, slots=True)
class Failed:
    call_id: str
    attempt: int
    error: str
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class WasThrottled:
    """The function met `Throttled` downstream: back to the queue after `retry_after_ms`,
    without using up an attempt."""

    call_id: str
    attempt: int
    retry_after_ms: int


@dataclass(frozen=True, slots=True)
class NotStarted:
    """A worker fetched the call but did not start it in time (its running slots were
    busy): back to the queue at once, without using up an attempt."""

    call_id: str
    attempt: int


Outcome = Succeeded | Failed | WasThrottled | NotStarted
_Change = Callable[[CallRecord], tuple[CallRecord, list[bytes], dict[bytes, bytes]]]


def _due(partition: int, record: CallRecord) -> dict[bytes, bytes]:
    return {due_key(partition, record): _ENCODER.encode(DueEntry(record.deadline_ms))}


def _claim(partition: int, lease_ms: int, scheduler: str, now_ms: int) -> _Change:
    def change(record: CallRecord) -> tuple[CallRecord, list[bytes], dict[bytes, bytes]]:
        if record.state is not CallState.QUEUED or record.run_after_ms > now_ms:
            raise StaleAttempt(f"call {record.call_id} is {record.state.value}, not due")
        new = msgspec.structs.replace(
            record,
            state=CallState.RUNNING,
            attempt=record.attempt + 1,
            lease_ms=lease_ms,
            scheduler=scheduler,
        )
        entry = RunningEntry(record.app, record.function, new.attempt, lease_ms)
        add = {running_key(partition, record.call_id): _ENCODER.encode(entry)}
        return new, [due_key(partition, record)], add

    return change


def _finish(partition: int, outcome: Outcome, now_ms: int, jitter: Callable[[], float]) -> _Change:
    def change(record: CallRecord) -> tuple[CallRecord, list[bytes], dict[bytes, bytes]]:
        _require_running(record, outcome.attempt)
        drop = [running_key(partition, record.call_id)]
        match outcome:
            case Succeeded(result=result):
                new = msgspec.structs.replace(
                    record, state=CallState.SUCCEEDED, result=result, finished_ms=now_ms
                )
                return new, drop, {done_key(partition, now_ms, record.call_id): b""}
            case WasThrottled(retry_after_ms=retry_after_ms):
                new = msgspec.structs.replace(
                    record,
                    state=CallState.QUEUED,
                    throttled=record.throttled + 1,
                    run_after_ms=now_ms + retry_after_ms,
                    error="throttled downstream",
                )
                return new, drop, _due(partition, new)
            case NotStarted():
                new = msgspec.structs.replace(
                    record, state=CallState.QUEUED, throttled=record.throttled + 1
                )
                return new, drop, _due(partition, new)
            case Failed(error=error, retryable=retryable):
                if not retryable or record.attempts_used >= record.attempts_max:
                    dead = msgspec.structs.replace(
                        record, state=CallState.DEAD, error=error, finished_ms=now_ms
                    )
                    return dead, drop, {dead_key(partition, record.call_id): b""}
                run_after = now_ms + retry_delay_ms(record, jitter())
                new = msgspec.structs.replace(
                    record, state=CallState.QUEUED, run_after_ms=run_after, error=error
                )
                return new, drop, _due(partition, new)

    return change


def _require_running(record: CallRecord, attempt: int) -> None:
    if record.state is not CallState.RUNNING or record.attempt != attempt:
        raise StaleAttempt(
            f"call {record.call_id} is {record.state.value} in attempt {record.attempt}, "
            f"not running in attempt {attempt}"
        )
