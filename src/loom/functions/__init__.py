"""loom functions: the serverless background-function platform (DESIGN §8).

    from loom import functions

    app = functions.App("threads", cluster="127.0.0.1:7300")

    @app.function(retries=functions.Retry(attempts_max=8, backoff_s=1), timeout_s=60)
    async def copy_follow_graph(ctx: functions.Context, user_id: int) -> int: ...

    call = await copy_follow_graph.submit(42, idempotency_key="copy:42")
    await call.result(timeout_s=30)

Run the functions with `loom worker MODULE:APP`. Being built (functions issue): so far
durable idempotent submission, retries with backoff and dead-lettering, timeouts, and
a worker that finds due calls itself; schedulers, limits, back-pressure, batching and
sagas come next.
"""

from __future__ import annotations

from loom.functions.app import App, Call, CallFailed, Context, Function, Retry
from loom.functions.queue import CallRecord, CallState, Criticality

__all__ = [
    "App",
    "Call",
    "CallFailed",
    "CallRecord",
    "CallState",
    "Context",
    "Criticality",
    "Function",
    "Retry",
]
