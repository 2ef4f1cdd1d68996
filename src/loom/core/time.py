"""Time as values. Cores receive `now` from their driver; they never read a clock.

`Instant` is a reading of one node's *monotonic* clock in milliseconds; instants
from different nodes are never compared (PITFALLS 6). `WallMs` is wall-clock time
in milliseconds, used only for stamps the primary writes into log entries (TTL,
run-after), never for leases.
"""

from __future__ import annotations

from typing import NewType

Instant = NewType("Instant", float)
WallMs = NewType("WallMs", int)
