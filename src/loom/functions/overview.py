"""What `loom functions ls` shows, as data: every function with its queue depth, what
runs, what was dispatched, its limits, and the state of the downstream controllers —
from the store (configs, indexes) and the schedulers' published status."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from loom import kv
from loom.functions import registry
from loom.functions.queue import DurableQueue, due_prefix, shard_key

COUNT_PER_PARTITION_MAX = 100_000
PAGE = 1000


@dataclass(slots=True)
class FunctionRow:
    function: str  # app.function
    tenant: str
    queued: int
    queued_capped: bool  # more than counted
    running: int
    dispatched: int
    rate_limit_per_s: float | None
    concurrency_max: int | None
    downstream: tuple[str, ...]
    criticality: str

    def to_json(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class Overview:
    functions: list[FunctionRow] = field(default_factory=list)
    downstreams: dict[str, dict[str, object]] = field(default_factory=dict)
    schedulers: list[dict[str, object]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "functions": [row.to_json() for row in self.functions],
            "downstreams": self.downstreams,
            "schedulers": self.schedulers,
        }


async def overview(client: kv.Client) -> Overview:
    queue = await DurableQueue.open(client)
    configs = await registry.read_configs(client)
    members = await registry.read_members(client)
    running: Counter[tuple[str, str]] = Counter()
    for calls in await asyncio.gather(*(queue.running(p) for p in range(queue.partitions))):
        running.update((c.entry.app, c.entry.function) for c in calls)
    dispatched: Counter[str] = Counter()
    result = Overview()
    for member in members:
        status = member.status
        for name, figures in dict(status.get("functions", {})).items():
            dispatched[name] += int(figures.get("dispatched", 0))
        for name, controller in dict(status.get("downstreams", {})).items():
            seen = result.downstreams.get(name)
            # Several schedulers each run a controller: show the most throttled one.
            if seen is None or float(controller["rate"]) < float(seen["rate"]):  # type: ignore[arg-type]
                result.downstreams[name] = dict(controller)
        result.schedulers.append(
            {"name": member.name, "partitions": len(status.get("partitions", ()))}
        )
    for config in sorted(configs, key=lambda c: c.key):
        counts = await asyncio.gather(
            *(_count(queue, p, config.app, config.function) for p in range(queue.partitions))
        )
        name = f"{config.app}.{config.function}"
        result.functions.append(
            FunctionRow(
                function=name,
                tenant=config.tenant,
                queued=sum(n for n, _ in counts),
                queued_capped=any(capped for _, capped in counts),
                running=running[config.key],
                dispatched=dispatched[name],
                rate_limit_per_s=config.rate_limit_per_s,
                concurrency_max=config.concurrency_max,
                downstream=config.downstream,
                criticality=config.criticality.value,
            )
        )
    return result


async def _count(queue: DurableQueue, partition: int, app: str, function: str) -> tuple[int, bool]:
    count = 0
    cursor: bytes | None = None
    while count < COUNT_PER_PARTITION_MAX:
        page = await queue.ks.scan(
            shard_key=shard_key(partition),
            prefix=due_prefix(partition, app, function),
            limit=PAGE,
            cursor=cursor,
        )
        count += len(page.items)
        cursor = page.cursor
        if cursor is None:
            return count, False
    return count, True


__all__ = ["FunctionRow", "Overview", "overview"]
