"""Loops that wait for an event with a timeout stop when cancelled, even when the event
is set as the cancel arrives. On Python 3.11 `asyncio.wait_for` returns the event's
result in that case and swallows the cancel: the scheduler's scan loop then outlived its
`run` and hung the scheduler's stop (a CI run timed out on it). So loom waits with
`asyncio.timeout`, and no module may use `asyncio.wait_for`."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import loom


async def _wait_loop(event: asyncio.Event, laps: list[int]) -> None:
    while True:
        laps.append(1)
        event.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await event.wait()


def test_a_loop_waiting_with_a_timeout_stops_when_cancelled_as_its_event_is_set() -> None:
    async def scenario() -> bool:
        event, laps = asyncio.Event(), list[int]()
        task = asyncio.create_task(_wait_loop(event, laps))
        await asyncio.sleep(0.01)
        event.set()
        task.cancel()  # in the same turn as the event
        await asyncio.wait([task], timeout=2.0)
        return task.cancelled()

    assert asyncio.run(scenario())


def test_no_module_uses_asyncio_wait_for() -> None:
    root = Path(loom.__file__).parent
    users = [
        str(path.relative_to(root))
        for path in sorted(root.rglob("*.py"))
        if "wait_for(" in path.read_text(encoding="utf-8")
    ]
    assert users == [], f"use asyncio.timeout instead of asyncio.wait_for in {users}"
