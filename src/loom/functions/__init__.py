"""loom functions: the serverless background-function platform (DESIGN §8).

    from loom import functions

    app = functions.App("threads", cluster="127.0.0.1:7300")

    @app.function(retries=functions.Retry(attempts_max=8, backoff_s=1), timeout_s=60,
                  rate_limit_per_s=500, concurrency_max=64,
                  downstream=("kv:threads_graph",))
    async def copy_follow_graph(ctx: functions.Context, user_id: int) -> int: ...

    call = await copy_follow_graph.submit(42, idempotency_key="copy:42")
    await call.result(timeout_s=30)

Run `loom scheduler` (one or more) and `loom worker MODULE:APP` (one or more), or
`loom cluster up --functions MODULE:APP` for both on a local cluster.
"""

from __future__ import annotations

from loom.functions.app import App, Call, Context, Function, Retry
from loom.functions.errors import CallFailed, NonRetryable
from loom.functions.queue import CallRecord, CallState, Criticality
from loom.functions.registry import Batch
from loom.functions.saga import Recovery, Saga, SagaCompensated

__all__ = [
    "App",
    "Batch",
    "Call",
    "CallFailed",
    "CallRecord",
    "CallState",
    "Context",
    "Criticality",
    "Function",
    "NonRetryable",
    "Recovery",
    "Retry",
    "Saga",
    "SagaCompensated",
]
