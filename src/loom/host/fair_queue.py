"""Weighted fair queuing of client requests across tenants (DESIGN §7): deficit round
robin. Pure.

Rules of this module:
- one FIFO per tenant, each bounded (`per_tenant_max`) and all together bounded
  (`total_max`): a push over either answers False, and the caller refuses the request
  with a retry hint — a noisy tenant fills its own queue, not everybody's;
- `pop(n)` takes up to `n` items, visiting tenants with queued work in turn; each visit
  gives a tenant `quantum × weight` more credit and takes as many items as its credit
  covers. Over time each busy tenant gets its weight's share of the items taken, and
  a quiet tenant's request waits for at most one round, whatever the others queued;
- a tenant whose queue empties leaves the round and loses its credit (no hoarding);
- tenants join the round in arrival order; nothing depends on hash or set order.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Generic, TypeVar

T = TypeVar("T")
QUANTUM = 4


class FairQueue(Generic[T]):
    def __init__(self, *, per_tenant_max: int, total_max: int, quantum: int = QUANTUM) -> None:
        assert 0 < per_tenant_max <= total_max and quantum > 0
        self.per_tenant_max = per_tenant_max
        self.total_max = total_max
        self.quantum = quantum
        self._queues: dict[str, deque[T]] = {}
        # Tenants with queued items, in round order; the value is unused.
        self._round: OrderedDict[str, None] = OrderedDict()
        self._credit: dict[str, int] = {}
        self._weights: dict[str, int] = {}
        self._visiting: str | None = None  # the front tenant, if its visit was cut short
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def set_weights(self, weights: Mapping[str, int]) -> None:
        """Tenant → weight (≥ 1); a tenant not named weighs 1."""
        self._weights = {t: max(1, w) for t, w in weights.items()}

    def push(self, tenant: str, item: T) -> bool:
        """Queues `item`; False (nothing queued) if the tenant's or the total bound is hit."""
        queue = self._queues.get(tenant)
        if self._size >= self.total_max:
            return False
        if queue is not None and len(queue) >= self.per_tenant_max:
            return False
        if queue is None:
            queue = self._queues[tenant] = deque()
        if not queue:
            self._round[tenant] = None
            self._credit[tenant] = 0
        queue.append(item)
        self._size += 1
        return True

    def pop(self, count: int) -> list[T]:
        """Up to `count` items, shared among the tenants by weight."""
        taken: list[T] = []
        while len(taken) < count and self._round:
            tenant = next(iter(self._round))
            queue = self._queues[tenant]
            credit = self._credit[tenant]
            if tenant != self._visiting:  # a new visit: this round's credit
                credit += self.quantum * self._weights.get(tenant, 1)
            while credit > 0 and queue and len(taken) < count:
                taken.append(queue.popleft())
                credit -= 1
            if not queue:
                del self._round[tenant], self._credit[tenant], self._queues[tenant]
                self._visiting = None
            elif credit > 0:  # cut short by `count`: the visit goes on at the next pop
                self._credit[tenant] = credit
                self._visiting = tenant
            else:
                self._credit[tenant] = 0
                self._round.move_to_end(tenant)  # its turn is over: to the back
                self._visiting = None
        self._size -= len(taken)
        return taken

    def queued(self, tenant: str) -> int:
        queue = self._queues.get(tenant)
        return len(queue) if queue is not None else 0
