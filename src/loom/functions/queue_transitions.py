"""DurableQ's call transitions, as transactions (see `loom.functions.queue`).

Each transition reads its calls and writes the records and index entries their
changes (`queue_changes`) return, in one transaction of the partition's μshard.
Rules: `_transition_many` takes at most `CALLS_PER_TXN_MAX` calls; a change that
refuses (`StaleAttempt`) leaves its call alone and the others go on; the transitions a
scheduler makes (claim, reclaim, expire, forget) check its partition lease in the
same transaction; an outcome applies only to the attempt it names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec

from loom import kv
from loom.core.errors import InvalidArgument, NotFound
from loom.functions.queue_changes import (
    Failed,
    Outcome,
    StaleAttempt,
    _Change,
    _claim,
    _due,
    _finish,
    _require_running,
)
from loom.functions.queue_leases import PartitionLeases, _check_held
from loom.functions.queue_records import (
    _DECODER,
    _ENCODER,
    CALLS_PER_TXN_MAX,
    CallRecord,
    CallState,
    LeaseHold,
    call_key,
    dead_key,
    done_prefix,
    due_key,
    lease_key,
    running_key,
    shard_key,
)


class CallTransitions(PartitionLeases):
    """The call transitions of `DurableQueue` (its base, after the leases)."""

    async def _transition_many(
        self,
        partition: int,
        changes: list[tuple[str, _Change]],
        *,
        hold: LeaseHold | None = None,
    ) -> list[CallRecord | StaleAttempt]:
        """Reads each call and writes its change's new record and index entries, all
        in one transaction of the partition's μshard (checking `hold` first, if given).
        A change that refuses leaves its call alone: its slot holds the `StaleAttempt`."""
        assert len(changes) <= CALLS_PER_TXN_MAX

        async def apply(tx: kv.Transaction) -> list[CallRecord | StaleAttempt]:
            # The lease and the calls in one request.
            keys = [call_key(partition, call_id) for call_id, _ in changes]
            if hold is None:
                items = await tx.get_many(keys)
            else:
                lease, *items = await tx.get_many([lease_key(partition), *keys])
                _check_held(lease, hold)
            done: list[CallRecord | StaleAttempt] = []
            for (call_id, change), item in zip(changes, items, strict=True):
                if item is None:
                    done.append(StaleAttempt(f"no call {call_id}"))
                    continue
                try:
                    new, drop, add = change(_DECODER.decode(item.value))
                except StaleAttempt as refused:
                    done.append(refused)
                    continue
                for key in drop:
                    await tx.delete(key)
                for key, value in add.items():
                    await tx.put(key, value)
                await tx.put(call_key(partition, call_id), _ENCODER.encode(new))
                done.append(new)
            return done

        return await self.ks.run_transaction(apply, shard_key=shard_key(partition))

    async def _transition(
        self, call_id: str, change: _Change, *, hold: LeaseHold | None = None
    ) -> CallRecord:
        partition = self._partition(call_id)
        if hold is not None and hold.partition != partition:
            raise InvalidArgument(f"call {call_id} is not in partition {hold.partition}")
        (done,) = await self._transition_many(partition, [(call_id, change)], hold=hold)
        if isinstance(done, StaleAttempt):
            if str(done).startswith("no call"):
                raise NotFound(str(done))
            raise done
        return done

    async def claim_many(
        self, hold: LeaseHold, claims: Sequence[tuple[str, int]], *, scheduler: str, now_ms: int
    ) -> list[CallRecord | StaleAttempt]:
        """Due QUEUED calls of the held partition → RUNNING, as their next attempt,
        each with a lease of the given ms (the scheduler reclaims it after that long)."""
        return await self._transition_many(
            hold.partition,
            [
                (call_id, _claim(hold.partition, lease_ms, scheduler, now_ms))
                for call_id, lease_ms in claims
            ],
            hold=hold,
        )

    async def claim(
        self, hold: LeaseHold, call_id: str, *, lease_ms: int, now_ms: int
    ) -> CallRecord:
        return await self._transition(
            call_id, _claim(hold.partition, lease_ms, hold.owner, now_ms), hold=hold
        )

    async def reclaim(
        self, hold: LeaseHold, call_id: str, *, attempt: int, now_ms: int
    ) -> CallRecord:
        """A RUNNING call whose lease the scheduler saw end (on its own clock) goes back
        to the queue (at-least-once); the attempt it was in can no longer finish it. An
        attempt whose lease ended is used up: after the last, the call is dead (a call
        that kills its worker every time must not run forever)."""

        def change(record: CallRecord) -> tuple[CallRecord, list[bytes], dict[bytes, bytes]]:
            _require_running(record, attempt)
            drop = [running_key(hold.partition, record.call_id)]
            if record.attempts_used >= record.attempts_max:
                dead = msgspec.structs.replace(
                    record,
                    state=CallState.DEAD,
                    error=f"lease expired on attempt {record.attempt}, the last",
                    finished_ms=now_ms,
                )
                return dead, drop, {dead_key(hold.partition, record.call_id): b""}
            new = msgspec.structs.replace(
                record, state=CallState.QUEUED, run_after_ms=now_ms, error="lease expired"
            )
            return new, drop, _due(hold.partition, new)

        return await self._transition(call_id, change, hold=hold)

    async def expire(self, hold: LeaseHold, call_id: str, *, now_ms: int) -> CallRecord:
        """A queued call past its deadline becomes EXPIRED: visible in the dead-letter
        set and replayable, never silently dropped."""

        def change(record: CallRecord) -> tuple[CallRecord, list[bytes], dict[bytes, bytes]]:
            deadline = record.deadline_ms
            if record.state is not CallState.QUEUED or deadline is None or deadline > now_ms:
                raise StaleAttempt(f"call {call_id} is {record.state.value}, not past a deadline")
            new = msgspec.structs.replace(
                record, state=CallState.EXPIRED, error="deadline passed", finished_ms=now_ms
            )
            drop = [due_key(hold.partition, record)]
            return new, drop, {dead_key(hold.partition, call_id): b""}

        return await self._transition(call_id, change, hold=hold)

    async def forget_done(self, hold: LeaseHold, *, before_ms: int, limit: int = 100) -> int:
        """Deletes up to `limit` calls of the held partition that succeeded before
        `before_ms` (record and index entry; their idempotency keys are free again).
        Returns how many."""
        prefix = done_prefix(hold.partition)
        page = await self.ks.scan(shard_key=shard_key(hold.partition), prefix=prefix, limit=limit)
        old = []
        for item in page.items:
            stamp, _, call_id = item.key[len(prefix) :].partition(b"/")
            if int(stamp, 16) >= before_ms:
                break
            old.append((item.key, call_key(hold.partition, call_id.decode())))
        if not old:
            return 0

        async def forget(tx: kv.Transaction) -> None:
            await self._check_lease(tx, hold)
            for index_key, record_key in old:
                await tx.delete(index_key)
                await tx.delete(record_key)

        await self.ks.run_transaction(forget, shard_key=shard_key(hold.partition))
        return len(old)

    async def finish_many(
        self,
        partition: int,
        outcomes: Sequence[Outcome],
        *,
        now_ms: int,
        jitter: Callable[[], float],
    ) -> list[CallRecord | StaleAttempt]:
        """What workers report, one transaction for many calls of one partition: each
        outcome applies only to the attempt it names."""
        return await self._transition_many(
            partition, [(o.call_id, _finish(partition, o, now_ms, jitter)) for o in outcomes]
        )

    async def fail(
        self,
        call_id: str,
        *,
        attempt: int,
        error: str,
        now_ms: int,
        jitter: float,
        retryable: bool = True,
    ) -> CallRecord:
        """RUNNING in `attempt` → QUEUED after a backoff, or DEAD after the last attempt."""
        outcome = Failed(call_id, attempt, error, retryable)
        return await self._transition(
            call_id, _finish(self._partition(call_id), outcome, now_ms, lambda: jitter)
        )

    async def replay(self, call_id: str, *, now_ms: int) -> CallRecord:
        """A dead-lettered or expired call goes back to the queue with a fresh set of
        attempts (and no deadline: the one it had has passed)."""
        partition = self._partition(call_id)

        def change(record: CallRecord) -> tuple[CallRecord, list[bytes], dict[bytes, bytes]]:
            if record.state not in (CallState.DEAD, CallState.EXPIRED):
                raise StaleAttempt(f"call {call_id} is {record.state.value}, not dead")
            new = msgspec.structs.replace(
                record,
                state=CallState.QUEUED,
                run_after_ms=now_ms,
                deadline_ms=None,
                attempts_max=record.attempts_used + record.attempts_max,
                finished_ms=None,
            )
            return new, [dead_key(partition, call_id)], _due(partition, new)

        return await self._transition(call_id, change)
