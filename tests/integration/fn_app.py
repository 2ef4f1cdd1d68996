"""An App for the worker-process tests (`loom worker fn_app:app`)."""

from __future__ import annotations

import asyncio

from loom.functions import App, Context

app = App("fntest", partitions=2)


@app.function(timeout_s=2)
async def slow_first(ctx: Context, value: str) -> str:
    if ctx.attempt == 1:
        await asyncio.sleep(60)  # the test kills this worker meanwhile
    return f"{value} on attempt {ctx.attempt}"


@app.function(timeout_s=10)
async def noop(ctx: Context, value: int) -> int:
    return value
