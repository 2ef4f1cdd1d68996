"""The Celery app of the peer's worker process, `celery -A loom.benchmarks.celery_app
worker`; only that process imports it (the measurer sends tasks by name).

Rules of this module:
- The broker's URL comes from the environment (`BROKER_URL_ENV`); results are off
  (`task_ignore_result`): the measurer reads completions from `DONE_KEY` instead.
- The task is a no-op that then records when it finished: one RPUSH of "index
  finished_s" (wall clock) to `DONE_KEY` in the broker's Redis, its only cost beyond
  Celery's own. That is cheaper for the worker than a result backend (a SET of the
  task's state plus a PUBLISH per task) and still makes each completion visible.
- Each worker process opens its own Redis client, once, on first use.
"""

from __future__ import annotations

import functools
import os
import time

import redis
from celery import Celery
from celery.signals import worker_ready

from loom.benchmarks.celery_peer import BROKER_URL_ENV, DONE_KEY, NOOP_TASK, READY_KEY

app = Celery("loom_bench", broker=os.environ[BROKER_URL_ENV])
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@functools.cache
def _redis() -> redis.Redis:
    # One client (and connection pool) per worker process: redis-py's pool notices a
    # fork and reconnects in the child, so prefork children never share a socket.
    return redis.Redis.from_url(os.environ[BROKER_URL_ENV])


@app.task(name=NOOP_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def noop(index: int) -> None:
    finished_s = time.time()
    _redis().rpush(DONE_KEY, f"{index} {finished_s!r}")


@worker_ready.connect  # type: ignore[untyped-decorator]
def _announce_ready(**_: object) -> None:
    """Tells the measurer the worker consumes now (its pool is up)."""
    _redis().set(READY_KEY, str(os.getpid()))
