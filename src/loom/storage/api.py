"""The storage port: an ordered byte-key store with atomic, optionally synced batches.

Contract (tested against every backend by tests/unit/test_storage_contract.py):
- keys compare as raw bytes; `scan` yields [start, end) in ascending key order;
- `write(batch, sync=False)` applies the whole batch atomically and makes it visible
  at once, but a crash may lose it (and every later unsynced batch) until a `sync()`
  or a `write(..., sync=True)` returns, which makes it and every earlier batch durable;
- batches are applied in the order written; a crash never loses batch N but keeps N+1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class WriteBatch:
    """Ordered puts, deletes and range deletes, applied atomically."""

    ops: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    # [start, end) ranges deleted before `ops` are applied.
    ranges_deleted: list[tuple[bytes, bytes]] = field(default_factory=list)

    def put(self, key: bytes, value: bytes) -> None:
        self.ops.append((key, value))

    def delete(self, key: bytes) -> None:
        self.ops.append((key, None))

    def delete_range(self, start: bytes, end: bytes) -> None:
        assert start <= end
        self.ranges_deleted.append((start, end))

    def __len__(self) -> int:
        return len(self.ops) + len(self.ranges_deleted)


class KVStore(Protocol):
    def get(self, key: bytes) -> bytes | None: ...

    def scan(
        self, start: bytes, end: bytes, *, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]: ...

    def write(self, batch: WriteBatch, *, sync: bool) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...
