"""`loom scheduler`, `loom worker MODULE:APP` and `loom functions …`: run and inspect
the functions platform."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from loom import kv
from loom.cli.data import cluster_option, current_token
from loom.cli.processes import LOG_LEVELS, log, setup_logging, until_stopped
from loom.cli.tls import current_tls, tls_options
from loom.core.errors import LoomError
from loom.functions.app import App
from loom.functions.overview import Overview, overview
from loom.functions.queue import CallRecord, CallState, DurableQueue
from loom.functions.scheduler import RETENTION_S, RETENTION_S_MAX, RETENTION_S_MIN, Scheduler
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
@tls_options
def worker_command(
    target: str, cluster: str, concurrency: int, log_level: str, tls: kv.TlsConfig | None
) -> None:
    """Run the functions of MODULE:APP: take due calls, run them, record the outcome."""
    setup_logging(log_level)
    app = load_app(target)
    app.cluster = cluster
    app.token = app.token or current_token()
    app.tls = app.tls or tls

    async def main() -> None:
        worker = Worker(app, concurrency=concurrency)
        log.info("worker %s for app %s on %s", worker.name, app.name, cluster)
        try:
            await _serve(worker.run, f"loom worker {worker.name} running app {app.name}")
        finally:
            await app.close()

    run(main())


async def _serve(body: Callable[[asyncio.Event], Coroutine[Any, Any, None]], ready: str) -> None:
    """Runs `body(stop)`, says `ready` on stdout, and stops it on SIGTERM or Ctrl-C."""
    stop = asyncio.Event()
    running = asyncio.create_task(body(stop))
    click.echo(ready)
    sys.stdout.flush()
    try:
        await until_stopped(stop)
    finally:
        stop.set()
        await running


@click.command("scheduler")
@cluster_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Where workers reach it.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="0: any free port.")
@click.option(
    "--retention",
    "retention_s",
    type=click.FloatRange(RETENTION_S_MIN, RETENTION_S_MAX),
    default=RETENTION_S,
    show_default=True,
    help="Seconds a succeeded call (its result and idempotency key) is remembered.",
)
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
@tls_options
def scheduler_command(
    cluster: str,
    host: str,
    port: int,
    retention_s: float,
    log_level: str,
    tls: kv.TlsConfig | None,
) -> None:
    """Dispatch due function calls to workers. Several may run: each owns a share of
    the queue's partitions by leases in the store, and takes over a dead one's."""
    setup_logging(log_level)

    async def main() -> None:
        async with kv.connect(cluster, token=current_token(), tls=tls) as client:
            scheduler = Scheduler(client, host=host, port=port, retention_s=retention_s, tls=tls)
            await scheduler.start()
            ready = f"loom scheduler {scheduler.name} listening on {host}:{scheduler.port}"
            await _serve(scheduler.run, ready)

    run(main())


@click.group("functions")
def functions_group() -> None:
    """Inspect and manage function calls."""


@functions_group.command("ls")
@cluster_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def functions_ls(cluster: str, as_json: bool) -> None:
    """Functions with their queue depth, running calls, dispatch counts, limits and
    the downstream controllers' rates (throttling: below their ceiling)."""

    async def main() -> Overview:
        async with kv.connect(cluster, token=current_token(), tls=current_tls()) as client:
            return await overview(client)

    result = _run(main())
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    table = Table("function", "tenant", "queued", "running", "dispatched", "limits", "downstream")
    for row in result.functions:
        limits = ", ".join(
            text
            for text in (
                f"{row.rate_limit_per_s:g}/s" if row.rate_limit_per_s else "",
                f"≤{row.concurrency_max} at once" if row.concurrency_max else "",
            )
            if text
        )
        table.add_row(
            row.function,
            row.tenant,
            f"≥{row.queued}" if row.queued_capped else str(row.queued),
            str(row.running),
            str(row.dispatched),
            limits or "-",
            ", ".join(row.downstream) or "-",
        )
    console = Console()
    console.print(table)
    for name, controller in result.downstreams.items():
        state = "THROTTLING" if controller["throttling"] else "open"
        console.print(
            f"downstream {name}: {controller['rate']}/s ({state}, {controller['cuts']} cuts)"
        )
    console.print(
        f"{len(result.schedulers)} schedulers: "
        + ", ".join(f"{s['name']} ({s['partitions']} partitions)" for s in result.schedulers)
    )


@functions_group.command("drain")
@cluster_option
@click.option(
    "--timeout", "timeout_s", type=click.FloatRange(1, 86_400), default=3600, show_default=True
)
def functions_drain(cluster: str, timeout_s: float) -> None:
    """Wait until no call is queued or running, with a progress bar; exit 1 on timeout."""

    async def remaining(client: kv.Client) -> int:
        return sum(row.queued + row.running for row in (await overview(client)).functions)

    async def main() -> bool:
        async with kv.connect(cluster, token=current_token(), tls=current_tls()) as client:
            first = await remaining(client)
            deadline = time.monotonic() + timeout_s
            with Progress() as progress:
                task = progress.add_task("draining the queue", total=max(1, first))
                while (left := await remaining(client)) > 0:
                    progress.update(task, total=max(first, left), completed=max(0, first - left))
                    if time.monotonic() > deadline:
                        return False
                    await asyncio.sleep(1.0)
                progress.update(task, completed=max(1, first))
            return True

    if not _run(main()):
        raise click.ClickException(f"calls still queued or running after {timeout_s:g} s")
    click.echo("the queue is empty")


@functions_group.command("calls")
@cluster_option
@click.option(
    "--state",
    type=click.Choice([s.value for s in CallState]),
    help="Only calls in this state.",
)
@click.option(
    "--function", "function_name", metavar="APP.FUNCTION", help="Only this function's calls."
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON list.")
def functions_calls(
    cluster: str, state: str | None, function_name: str | None, limit: int, as_json: bool
) -> None:
    """List calls (every partition's records, read in order, with a progress bar)."""

    async def main() -> list[CallRecord]:
        async with kv.connect(cluster, token=current_token(), tls=current_tls()) as client:
            queue = await _queue(client)
            found: list[CallRecord] = []
            with Progress(transient=True) as progress:
                task = progress.add_task("reading partitions", total=queue.partitions)
                for partition in range(queue.partitions):
                    async for record in queue.records(partition):
                        if state and record.state.value != state:
                            continue
                        if function_name and f"{record.app}.{record.function}" != function_name:
                            continue
                        found.append(record)
                        if len(found) >= limit:
                            return found
                    progress.advance(task)
            return found

    records = _run(main())
    if as_json:
        click.echo(json.dumps([_summary(r) for r in records]))
        return
    table = Table("call", "function", "state", "attempts", "error")
    for r in records:
        table.add_row(
            r.call_id, f"{r.app}.{r.function}", r.state.value, str(r.attempts_used), r.error or ""
        )
    Console().print(table)


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
        async with kv.connect(cluster, token=current_token(), tls=current_tls()) as client:
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
        async with kv.connect(cluster, token=current_token(), tls=current_tls()) as client:
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
        "state": record.state.value,
        "attempts": record.attempts_used,
        "error": record.error,
    }
