"""The dispatch pass: which waiting worker gets which calls (DESIGN §8).

Rules:
- No IO and no clock: a pass is one synchronous decision over the candidates, so
  passes never pick the same call twice; the claims it implies run afterwards
  (`scheduler_delivery`).
- A pass picks calls by weighted fair share across tenants (criticality first within a
  tenant), within each function's allotment of its global rate and concurrency
  limits (`limits`), within each declared downstream's AIMD rate; a partition's
  concurrency slots serve only its own calls.
- Batched functions' calls go out in batches: a batch waits to fill until its
  function's `wait_ms` has passed since its calls began waiting.
- Time-shifting: while the scheduler is busy (calls of normal or high criticality left
  waiting for capacity, or a downstream throttled), calls of low criticality wait
  unless their deadline is near.
- A picked call is in flight (attempt 0) and being claimed from the moment it is
  picked; its function's bucket and its downstreams' buckets are charged for it.
"""

from __future__ import annotations

from loom.functions.limits import FairShare, concurrency_share
from loom.functions.queue import Criticality, DueCall
from loom.functions.registry import FunctionConfig
from loom.functions.scheduler_state import (
    CallBook,
    FunctionState,
    Inflight,
    Waiter,
    call_lease_ms,
)

TIME_SHIFT_SLACK_MS = 60_000
# A downstream admits this many seconds of its AIMD rate at once.
DOWNSTREAM_BURST_S = 0.25
CRITICALITY_RANK = {Criticality.HIGH: 0, Criticality.NORMAL: 1, Criticality.LOW: 2}


class Dispatcher:
    """The waiting workers, and the passes that pick calls for them."""

    def __init__(self, book: CallBook) -> None:
        self.book = book
        self.waiters: list[Waiter] = []
        self.busy = False
        self.fair = FairShare()

    def pick(self, now: float, now_ms: int, partitions: int) -> list[Waiter]:
        """One pass: picks calls for the waiting workers; returns those that got some
        (no longer waiting: their calls are to be claimed and delivered)."""
        for downstream in self.book.downstreams.values():
            downstream.bucket.reshape(
                downstream.aimd.current(now, used=downstream.used(now)),
                max(1.0, downstream.aimd.rate * DOWNSTREAM_BURST_S),
                now,
            )
        by_tenant: dict[str, list[FunctionState]] = {}
        weights: dict[str, int] = {}
        for state in self.book.functions.values():
            if state.config is not None and state.candidate_count():
                by_tenant.setdefault(state.config.tenant, []).append(state)
                weights[state.config.tenant] = state.config.weight
            if state.candidate_count() and state.waiting_since is None:
                state.waiting_since = now
        throttled = any(d.aimd.throttling for d in self.book.downstreams.values())
        shift_low = self.busy or throttled
        for states in by_tenant.values():
            states.sort(key=lambda s: CRITICALITY_RANK[s.config.criticality])  # type: ignore[union-attr]

        def take(tenant: str, allowance: int) -> int:
            for state in by_tenant[tenant]:
                count = self._take(state, allowance, now, now_ms, shift_low, partitions=partitions)
                if count:
                    return count
            return 0

        self.fair.run(sorted(by_tenant), weights, take)
        # Busy: a call of normal or high criticality could not go out for lack of room.
        self.busy = any(
            s.candidate_count()
            and s.config is not None
            and s.config.criticality is not Criticality.LOW
            for s in self.book.functions.values()
        )
        chosen = [w for w in self.waiters if w.batches]
        self.waiters = [w for w in self.waiters if not w.batches and not w.future.done()]
        return chosen

    def _take(
        self,
        state: FunctionState,
        allowance: int,
        now: float,
        now_ms: int,
        shift_low: bool,
        *,
        partitions: int,
    ) -> int:
        config = state.config
        assert config is not None
        waiter = next(
            (
                w
                for w in self.waiters
                if w.slots > 0 and w.pull.app == config.app and config.function in w.pull.functions
            ),
            None,
        )
        if waiter is None:
            return 0
        size = 1 if config.batch is None else config.batch.size_max
        room = min(state.room(now), size, allowance if config.batch is None else size)
        for name in config.downstream:
            room = min(room, self.book.downstreams[name].bucket.available(now))
        if room <= 0:
            return 0
        calls: list[tuple[int, DueCall]] = []
        for partition, queue in state.candidates.items():
            cap = room - len(calls)
            if config.concurrency_max is not None:
                # A partition's slots serve only its own calls, so the partition's
                # running index is its whole use: whoever owns it next sees it exact.
                share = concurrency_share(config.concurrency_max, partitions, partition)
                used = sum(1 for i in state.inflight.values() if i.partition == partition)
                cap = min(cap, share - used)
            taken = 0
            while queue and taken < cap:
                call = queue[0]
                if (
                    shift_low
                    and config.criticality is Criticality.LOW
                    and not _urgent(call, config, now_ms)
                ):
                    break
                calls.append((partition, queue.popleft()))
                taken += 1
            if len(calls) >= room:
                break
        if not calls:
            return 0
        if config.batch is not None and len(calls) < size:
            waited_ms = (now - (state.waiting_since or now)) * 1000
            if waited_ms < config.batch.wait_ms:
                for partition, call in reversed(calls):  # not yet: let the batch fill
                    state.candidates[partition].appendleft(call)
                return 0
        count = len(calls)
        if state.bucket is not None:
            state.bucket.take(count, now)
        for name in config.downstream:
            self.book.downstreams[name].bucket.take(count, now)
            self.book.downstreams[name].dispatched += count
        lease_ms = call_lease_ms(config)
        for partition, call in calls:
            state.inflight[call.call_id] = Inflight(partition, 0, now, lease_ms)
            self.book.where[call.call_id] = config.key
            self.book.claiming.add(call.call_id)
        state.waiting_since = None if not state.candidate_count() else now
        if config.batch is None:
            waiter.batches.extend([c] for c in calls)
            waiter.slots -= count
        else:
            waiter.batches.append(calls)
            waiter.slots -= 1
        waiter.functions.extend([state] * (count if config.batch is None else 1))
        return count


def _urgent(call: DueCall, config: FunctionConfig, now_ms: int) -> bool:
    """A low-criticality call may wait for spare capacity unless its deadline is near."""
    if call.deadline_ms is None:
        return False
    return call.deadline_ms - now_ms < TIME_SHIFT_SLACK_MS + 2 * config.timeout_s * 1000
