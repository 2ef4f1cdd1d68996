"""The simulated network: delay, loss, duplication, reordering, partitions (one-way too).

Endpoints are names (node ids, "sm", client ids). A partition is a set of blocked
(src, dst) pairs; a symmetric partition blocks both directions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from loom.sim.faults import Faults

DELAY_MS_MIN = 0.5
DELAY_MS_MAX = 6.0
SLOW_MS_MIN = 200.0
SLOW_MS_MAX = 2500.0


@dataclass(slots=True)
class Network:
    rng: random.Random
    faults: Faults
    blocked: set[tuple[str, str]] = field(default_factory=set)
    # Gray failure: links that still deliver, but late (a paused process, a sick NIC).
    slow: set[tuple[str, str]] = field(default_factory=set)
    healed: bool = False
    sent: int = 0
    dropped: int = 0

    def deliveries(self, src: str, dst: str) -> list[float]:
        """Delays (ms) after which copies of one message arrive; [] if it is lost."""
        self.sent += 1
        if src == dst:
            return [0.0]
        if (src, dst) in self.blocked:
            self.dropped += 1
            return []
        f = self.faults
        if not self.healed and f.loss and self.rng.random() < f.loss:
            self.dropped += 1
            return []
        copies = 1
        if not self.healed and f.duplicate and self.rng.random() < f.duplicate:
            copies = 2
        delays = []
        for _ in range(copies):
            delay = self.rng.uniform(DELAY_MS_MIN, DELAY_MS_MAX)
            if not self.healed and f.detour and self.rng.random() < f.detour:
                delay += self.rng.uniform(0, f.detour_ms_max)
            if (src, dst) in self.slow:
                delay += self.rng.uniform(SLOW_MS_MIN, SLOW_MS_MAX)
            delays.append(delay)
        return delays

    def partition(self, side: list[str], others: list[str], *, one_way: bool) -> None:
        for a in side:
            for b in others:
                self.blocked.add((a, b))
                if not one_way:
                    self.blocked.add((b, a))

    def slow_down(self, side: list[str], others: list[str], *, one_way: bool) -> None:
        """Links between `side` and `others` turn slow; one way: only towards `side`
        (a node whose replies arrive late while its own messages still go out)."""
        for a in side:
            for b in others:
                self.slow.add((b, a))
                if not one_way:
                    self.slow.add((a, b))

    def heal(self) -> None:
        self.blocked.clear()
        self.slow.clear()
