"""Randomness arrives injected (a seeded `random.Random` in the simulator); cores never
import `random` themselves, so a run replays exactly from its seed."""

from __future__ import annotations

from typing import Protocol


class Rng(Protocol):
    def random(self) -> float: ...

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int: ...
