"""A tiny dict-backed StateReader for the kv state-machine tests, and an entry harness.

Deliberately independent of loom.storage.memory: it implements just the StateReader
reads plus applying a WriteBatch, following the storage contract (range deletes
first, then ops in order).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from loom.core.ids import ClientId, Epoch, Generation, RequestId, RequestSeq, Seq, UShard
from loom.core.limits import DEFAULT_LIMITS, Limits
from loom.core.time import WallMs
from loom.kvstate.apply import EntryContext, apply_entry
from loom.kvstate.commands import Command, Result, encode_command
from loom.storage.api import WriteBatch


class DictState:
    """Ordered byte keys in a dict; scans sort (fine at test sizes)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def scan(
        self, start: bytes, end: bytes, *, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        keys = sorted(key for key in self.data if start <= key < end)
        if limit is not None:
            keys = keys[:limit]
        for key in keys:
            yield key, self.data[key]

    def write(self, batch: WriteBatch) -> None:
        for start, end in batch.ranges_deleted:
            for key in [key for key in self.data if start <= key < end]:
                del self.data[key]
        for key, value in batch.ops:
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value


@dataclass
class Harness:
    """Applies entries one after another, as a replica's apply loop would."""

    limits: Limits = DEFAULT_LIMITS
    state: DictState = field(default_factory=DictState)
    seq: int = 0
    wall_ms: int = 1_000_000
    epoch: Epoch = Epoch(1)
    generation: Generation = Generation(1)
    batches: list[WriteBatch] = field(default_factory=list)
    request_seq: int = 0
    # The μshards the p-shard was created with (None: all).
    initial: frozenset[UShard] | None = None

    def next_request(self, client: str = "c1") -> RequestId:
        self.request_seq += 1
        return request(self.request_seq, client)

    def context(self) -> EntryContext:
        return EntryContext(
            seq=Seq(self.seq),
            epoch=self.epoch,
            wall_ms=WallMs(self.wall_ms),
            generation=self.generation,
            initial=self.initial,
        )

    def entry(self, commands: Sequence[Command | bytes]) -> list[Result]:
        self.seq += 1
        encoded = [c if isinstance(c, bytes) else encode_command(c) for c in commands]
        batch = WriteBatch()
        results = apply_entry(self.state, self.context(), encoded, batch, self.limits)
        self.state.write(batch)
        self.batches.append(batch)
        assert len(results) == len(encoded)
        return results

    def one(self, command: Command | bytes) -> Result:
        return self.entry([command])[0]


def request(seq: int, client: str = "c1") -> RequestId:
    return RequestId(client=ClientId(client), seq=RequestSeq(seq))


U = UShard(7)
