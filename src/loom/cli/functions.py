"""`loom worker MODULE:APP`: run the functions of an `App` (functions issue, first form:
the worker finds due calls itself; schedulers come next)."""

from __future__ import annotations

import asyncio
import importlib
import sys

import click

from loom.cli.data import cluster_option
from loom.cli.processes import LOG_LEVELS, log, setup_logging, until_stopped
from loom.functions.app import App
from loom.functions.worker import Worker
from loom.runtime.rpc import run


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
        try:
            await until_stopped(stop)
        finally:
            stop.set()
            await running
            await app.close()

    run(main())
