"""Stable key → μshard hashing (PITFALLS 18: never Python's salted `hash()`)."""

from __future__ import annotations

import xxhash

from loom.core.ids import UShard


def stable_hash64(data: bytes) -> int:
    """xxh3-64 with seed 0: identical in every process and on every machine."""
    return xxhash.xxh3_64_intdigest(data)


def ushard_of(key: bytes, ushards: int) -> UShard:
    assert ushards > 0
    return UShard(stable_hash64(key) % ushards)
