"""Virtual time for asyncio: the loop's clock jumps to the next timer instead of
sleeping, so a simulated minute takes milliseconds and every run of a seed is the same.

The functions code reads `time.monotonic()` and `time.time()` directly; `patched_time`
points those modules' `time` at a shim over the loop's virtual clock for the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import types
from collections.abc import Iterator

EPOCH_S = 1_800_000_000.0  # the virtual wall clock starts here (2027)


class _InstantSelector(selectors.DefaultSelector):
    """Never waits: a wait for `timeout` seconds is a jump of the virtual clock."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        assert self.loop is not None
        if timeout is None:
            raise RuntimeError("the simulation is stuck: nothing is scheduled and nothing runs")
        if timeout > 0:
            self.loop.now += timeout
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _InstantSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0

    def time(self) -> float:
        return self.now


class _TimeShim(types.SimpleNamespace):
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def monotonic(self) -> float:
        return self._loop.now

    def perf_counter(self) -> float:
        return self._loop.now

    def time(self) -> float:
        return EPOCH_S + self._loop.now


@contextlib.contextmanager
def patched_time(loop: VirtualTimeLoop, modules: list[types.ModuleType]) -> Iterator[None]:
    shim = _TimeShim(loop)
    saved = [(module, module.time) for module in modules]
    try:
        for module in modules:
            module.time = shim  # type: ignore[attr-defined]
        yield
    finally:
        for module, original in saved:
            module.time = original  # type: ignore[attr-defined]
