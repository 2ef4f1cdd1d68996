"""Per-request consistency and durability (DESIGN §5), and the values reads return."""

from __future__ import annotations

import math
from dataclasses import dataclass

from loom.core.errors import InvalidArgument
from loom.host.requests import Consistency, Durability
from loom.kvstate.reads import Item

QUORUM = Durability.QUORUM
FAST_ACK = Durability.FAST_ACK

BOUNDED_MS_MAX = 24 * 3600 * 1000.0


@dataclass(frozen=True, slots=True)
class ReadConsistency:
    """How fresh a read must be; use the module constants or `bounded(ms)`."""

    kind: Consistency
    bound_ms: float | None = None

    def __str__(self) -> str:
        if self.kind is Consistency.BOUNDED:
            return f"bounded({self.bound_ms:g} ms)"
        return self.kind.name


STRONG = ReadConsistency(Consistency.STRONG)
READ_YOUR_WRITES = ReadConsistency(Consistency.READ_YOUR_WRITES)
EVENTUAL = ReadConsistency(Consistency.EVENTUAL)


def bounded(ms: float) -> ReadConsistency:
    """A read never staler than `ms` milliseconds, served by the nearest replica that can
    prove it (else by the primary)."""
    number = isinstance(ms, int | float) and not isinstance(ms, bool)
    if not number or not math.isfinite(ms) or not 0 < ms <= BOUNDED_MS_MAX:
        raise InvalidArgument(f"bounded(ms) needs 0 < ms <= {BOUNDED_MS_MAX:g}, not {ms!r}")
    return ReadConsistency(Consistency.BOUNDED, float(ms))


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a scan; pass `cursor` back for the next page (None: nothing left)."""

    items: list[Item]
    cursor: bytes | None


__all__ = [
    "EVENTUAL",
    "FAST_ACK",
    "QUORUM",
    "READ_YOUR_WRITES",
    "STRONG",
    "Item",
    "Page",
    "ReadConsistency",
    "bounded",
]
