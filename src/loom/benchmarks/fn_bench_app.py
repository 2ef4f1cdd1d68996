"""The App `loom bench functions` runs: one no-op function that returns the wall-clock
time it finished at (the completion time the figures use)."""

from __future__ import annotations

import time

from loom.functions import App, Context

app = App("bench")


@app.function(timeout_s=30)
async def noop(ctx: Context, index: int) -> float:
    return time.time()
