"""What schedulers learn from the store: the functions workers serve (their configs)
and which schedulers are alive (DESIGN §8).

- `cfg/{app}/{function}` → `FunctionConfig`, written by every worker of the app when it
  starts: the scheduler never imports user code, so limits, batching, downstreams and
  criticality travel as data.
- `sched/{name}` → `SchedulerMember`: address and a beat counter a live scheduler
  raises every few hundred ms. Liveness is judged on the observer's own monotonic
  clock (a beat that has not moved for a TTL), never by comparing wall clocks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from loom import kv
from loom.functions.queue import KEYSPACE, Criticality

CONFIG_SHARD_KEY = b"cfg"
MEMBERS_SHARD_KEY = b"sched"
CONFIG_PREFIX = b"cfg/"
MEMBER_PREFIX = b"sched/"
SCAN_PAGE = 1000


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    """Calls of a batched function run together: up to `size_max` per invocation,
    waiting at most `wait_ms` for a batch to fill."""

    size_max: int = 100
    wait_ms: int = 50

    def __post_init__(self) -> None:
        if not 1 <= self.size_max <= 1000 or not 0 <= self.wait_ms <= 60_000:
            raise ValueError("Batch needs 1 <= size_max <= 1000 and 0 <= wait_ms <= 60000")


class FunctionConfig(msgspec.Struct, frozen=True, kw_only=True):
    app: str
    function: str
    tenant: str
    weight: int = 1
    rate_limit_per_s: float | None = None
    concurrency_max: int | None = None
    batch: Batch | None = None
    downstream: tuple[str, ...] = ()
    criticality: Criticality = Criticality.NORMAL
    timeout_s: float = 60.0

    @property
    def key(self) -> tuple[str, str]:
        return self.app, self.function


class SchedulerMember(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    host: str
    port: int
    beat: int = 0
    status: dict[str, Any] = {}  # what `loom functions ls` shows


_ENCODER = msgspec.msgpack.Encoder()
_CONFIG = msgspec.msgpack.Decoder(FunctionConfig)
_MEMBER = msgspec.msgpack.Decoder(SchedulerMember)


def config_key(app: str, function: str) -> bytes:
    return CONFIG_PREFIX + f"{app}/{function}".encode()


async def publish_configs(client: kv.Client, configs: list[FunctionConfig]) -> None:
    ks = client.keyspace(KEYSPACE)
    await asyncio.gather(
        *(
            ks.put(config_key(c.app, c.function), _ENCODER.encode(c), shard_key=CONFIG_SHARD_KEY)
            for c in configs
        )
    )


async def read_configs(client: kv.Client) -> list[FunctionConfig]:
    return [_CONFIG.decode(v) for v in await _scan(client, CONFIG_SHARD_KEY, CONFIG_PREFIX)]


async def beat(client: kv.Client, member: SchedulerMember) -> None:
    await client.keyspace(KEYSPACE).put(
        MEMBER_PREFIX + member.name.encode(), _ENCODER.encode(member), shard_key=MEMBERS_SHARD_KEY
    )


async def leave(client: kv.Client, name: str) -> None:
    await client.keyspace(KEYSPACE).delete(
        MEMBER_PREFIX + name.encode(), shard_key=MEMBERS_SHARD_KEY
    )


async def read_members(client: kv.Client) -> list[SchedulerMember]:
    return [_MEMBER.decode(v) for v in await _scan(client, MEMBERS_SHARD_KEY, MEMBER_PREFIX)]


async def _scan(client: kv.Client, shard_key: bytes, prefix: bytes) -> list[bytes]:
    ks = client.keyspace(KEYSPACE)
    values: list[bytes] = []
    cursor: bytes | None = None
    while True:
        page = await ks.scan(shard_key=shard_key, prefix=prefix, limit=SCAN_PAGE, cursor=cursor)
        values += [item.value for item in page.items]
        cursor = page.cursor
        if cursor is None:
            return values


@dataclass(slots=True)
class Liveness:
    """Who is alive, judged by beats seen changing on this process's monotonic clock."""

    ttl_s: float
    seen: dict[str, tuple[object, float]] = field(default_factory=dict)

    def observe(self, name: str, beat: object, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        previous = self.seen.get(name)
        if previous is None or previous[0] != beat:
            self.seen[name] = (beat, now)

    def alive(self, name: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        entry = self.seen.get(name)
        return entry is not None and now - entry[1] < self.ttl_s

    def silent_for(self, name: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        entry = self.seen.get(name)
        return 0.0 if entry is None else now - entry[1]
