"""A view of a store under a fixed key prefix: many shards share one RocksDB."""

from __future__ import annotations

from collections.abc import Iterator

from loom.storage.api import KVStore, WriteBatch


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key above every key starting with `prefix` (b"" = no upper bound)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b""
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class PrefixedStore:
    def __init__(self, store: KVStore, prefix: bytes) -> None:
        assert prefix, "an empty prefix would be the whole store"
        self.store = store
        self.prefix = prefix

    def get(self, key: bytes) -> bytes | None:
        return self.store.get(self.prefix + key)

    def scan(
        self, start: bytes, end: bytes, *, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        upper = self.prefix + end if end else prefix_end(self.prefix)
        cut = len(self.prefix)
        for key, value in self.store.scan(self.prefix + start, upper, limit=limit):
            yield key[cut:], value

    def add_to(self, batch: WriteBatch, inner: WriteBatch) -> None:
        """Copies `inner` (keys relative to this view) into `batch` (absolute keys)."""
        for start, end in inner.ranges_deleted:
            batch.delete_range(
                self.prefix + start, self.prefix + end if end else prefix_end(self.prefix)
            )
        for key, value in inner.ops:
            batch.ops.append((self.prefix + key, value))
