"""`loom worker MODULE:APP`: run the functions of an `App` (functions issue, first form:
the worker finds due calls itself; schedulers come next)."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import click
from rich.progress import Progress

from loom import kv
from loom.cli.data import cluster_option, current_token
from loom.cli.processes import LOG_LEVELS, log, setup_logging, until_stopped
from loom.core.errors import LoomError
from loom.functions.app import App
from loom.functions.queue import CallRecord, DurableQueue
from loom.functions.worker import Worker
from loom.runtime.rpc import run

T = TypeVar("T")


def load_app(target: str) -> App:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(f"{target!r} is not MODULE:APP", param_hint="MODULE:APP")
    sys.path.insert(0, ".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise click.BadParameter(f"cannot import {module_name}: {error}") from None
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise click.BadParameter(f"{target} is not a loom.functions App")
    return app


@click.command("worker")
@click.argument("target", metavar="MODULE:APP")
@cluster_option
@click.option("--concurrency", type=click.IntRange(1, 10_000), default=16, show_default=True)
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
def worker_command(target: str, cluster: str, concurrency: int, log_level: str) -> None:
    """Run the functions of MODULE:APP: take due calls, run them, record the outcome."""
    setup_logging(log_level)
    app = load_app(target)
    app.cluster = cluster

    async def main() -> None:
        worker = Worker(app, concurrency=concurrency)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        log.info("worker %s for app %s on %s", worker.name, app.name, cluster)
        click.echo(f"loom worker {worker.name} running app {app.name}")
        sys.stdout.flush()
        try:
            await until_stopped(stop)
        finally:
            stop.set()
            await running
            await app.close()

    run(main())


@click.group("functions")
def functions_group() -> None:
    """Inspect and manage function calls."""


@functions_group.group("dead-letter")
def dead_letter_group() -> None:
    """Calls that used up their attempts."""


async def _queue(client: kv.Client) -> DurableQueue:
    partitions = await DurableQueue.stored_partitions(client)
    if partitions is None:
        raise click.ClickException("no function call was ever submitted to this cluster")
    return DurableQueue(client, partitions=partitions)


@dead_letter_group.command("ls")
@cluster_option
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dead_letter_ls(cluster: str, limit: int, as_json: bool) -> None:
    """List dead-lettered calls: id, function, attempts, last error."""

    async def main() -> list[CallRecord]:
        async with kv.connect(cluster, token=current_token()) as client:
            queue = await _queue(client)
            records = [await queue.get(c) for c in await queue.dead_letters(limit=limit)]
            return [r for r in records if r is not None]

    records = _run(main())
    if as_json:
        click.echo(json.dumps([_summary(r) for r in records]))
        return
    for record in records:
        click.echo(
            f"{record.call_id}\t{record.app}.{record.function}\t{record.attempt}\t{record.error}"
        )
    click.echo(f"{len(records)} dead-lettered calls", err=True)


@dead_letter_group.command("replay")
@click.argument("call_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead-lettered call.")
@cluster_option
def dead_letter_replay(call_ids: tuple[str, ...], replay_all: bool, cluster: str) -> None:
    """Put dead-lettered calls back in the queue with a fresh set of attempts."""
    if bool(call_ids) == replay_all:
        raise click.UsageError("give CALL_IDS or --all")

    async def main() -> int:
        async with kv.connect(cluster, token=current_token()) as client:
            queue = await _queue(client)
            ids = list(call_ids) or await queue.dead_letters(limit=100_000)
            now_ms = int(time.time() * 1000)
            with Progress(transient=True) as progress:
                task = progress.add_task("replaying", total=len(ids))
                for call_id in ids:
                    await queue.replay(call_id, now_ms=now_ms)
                    progress.advance(task)
            return len(ids)

    click.echo(f"{_run(main())} calls back in the queue")


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        return run(coroutine)
    except LoomError as error:
        raise click.ClickException(f"{type(error).__name__}: {error}") from None


def _summary(record: CallRecord) -> dict[str, object]:
    return {
        "call_id": record.call_id,
        "function": f"{record.app}.{record.function}",
        "attempts": record.attempt,
        "error": record.error,
    }
