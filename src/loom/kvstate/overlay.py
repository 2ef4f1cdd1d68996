"""The shard's state as apply sees it: durable state plus this entry's pending writes.

Rules:
- `StateReader` is the durable state as of the last applied entry; apply never writes
  to it. Every write goes to the `Overlay`, and later commands of the same entry read
  through it, so they see earlier commands' writes.
- `flush` emits the net writes in sorted key order, so identical inputs produce
  identical batches on every replica (never dict or set order, STYLE rule 9).
- `scan` snapshots the overlay's part of the range when called, so a caller may write
  while it iterates; the durable part is read lazily and never changes during apply.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Protocol

from loom.storage.api import WriteBatch


class StateReader(Protocol):
    """The shard's durable state as of the last applied entry."""

    def get(self, key: bytes) -> bytes | None: ...

    def scan(
        self, start: bytes, end: bytes, *, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]: ...


class Overlay:
    """Pending writes of one entry (value None = delete) layered over a StateReader."""

    __slots__ = ("_keys", "_state", "_writes")

    def __init__(self, state: StateReader) -> None:
        self._state = state
        self._writes: dict[bytes, bytes | None] = {}
        self._keys: list[bytes] = []  # sorted keys of _writes, for range scans

    def get(self, key: bytes) -> bytes | None:
        if key in self._writes:
            return self._writes[key]
        return self._state.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self._set(key, value)

    def delete(self, key: bytes) -> None:
        self._set(key, None)

    def _set(self, key: bytes, value: bytes | None) -> None:
        if key not in self._writes:
            bisect.insort(self._keys, key)
        self._writes[key] = value

    def scan(
        self, start: bytes, end: bytes, *, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Live (not deleted) pairs in [start, end), ascending, overlay winning."""
        lo = bisect.bisect_left(self._keys, start)
        hi = bisect.bisect_left(self._keys, end)
        pending = [(key, self._writes[key]) for key in self._keys[lo:hi]]
        durable_limit = None
        if limit is not None:
            # Each pending write can hide at most one durable pair.
            durable_limit = limit + len(pending)
        merged = _merge(self._state.scan(start, end, limit=durable_limit), pending)
        for count, pair in enumerate(merged):
            if limit is not None and count >= limit:
                return
            yield pair

    def flush(self, batch: WriteBatch) -> None:
        for key in self._keys:
            value = self._writes[key]
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)


def _merge(
    durable: Iterator[tuple[bytes, bytes]], pending: list[tuple[bytes, bytes | None]]
) -> Iterator[tuple[bytes, bytes]]:
    """Merge two ascending streams; a pending write replaces the durable pair."""
    index = 0
    for key, value in durable:
        while index < len(pending) and pending[index][0] < key:
            yield from _live(pending[index])
            index += 1
        if index < len(pending) and pending[index][0] == key:
            yield from _live(pending[index])
            index += 1
        else:
            yield key, value
    for item in pending[index:]:
        yield from _live(item)


def _live(item: tuple[bytes, bytes | None]) -> Iterator[tuple[bytes, bytes]]:
    key, value = item
    if value is not None:
        yield key, value
