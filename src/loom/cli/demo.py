"""`loom demo threads`: the Threads launch, replayed on an embedded cluster (see
`loom.demo.threads`), shown live, checked, and written up as an HTML report."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loom.demo.model import DemoReport
from loom.demo.report import ReportError, summary_table, write_html
from loom.demo.threads import Launch, Settings


@click.group("demo")
def demo_group() -> None:
    """Demonstrations of the whole system."""


@demo_group.command("threads")
@click.option("--users", type=click.IntRange(20, 200_000), default=2000, show_default=True)
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(10, 3600),
    default=60.0,
    show_default=True,
    help="Seconds of the sign-up surge (the queue drains after it).",
)
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the cluster's data here (default: a scratch directory, removed after).",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("loom-demo-report.html"),
    show_default=True,
)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object last, for machines.")
@click.option("--tls", is_flag=True, help="Every connection with TLS (certificates in the data).")
def threads_command(
    users: int,
    duration_s: float,
    data: Path | None,
    report_path: Path,
    seed: int,
    as_json: bool,
    tls: bool,
) -> None:
    """Replay a launch: sign-ups surge, each copying a follow graph through loom
    functions into loom kv; celebrities fan out notifications; a node is killed and
    restarted midway. Then check that nothing was lost or done twice. Exit status 0
    only if every check passes."""
    console = Console(stderr=True)
    workdir = data or Path(tempfile.mkdtemp(prefix="loom-demo-"))
    settings = Settings(users=users, duration_s=duration_s, seed=seed, tls=tls)
    launch = Launch(settings, workdir, lambda line: console.print(f"[dim]·[/dim] {line}"))
    try:
        report = asyncio.run(_run_live(launch, console))
    finally:
        launch.stop()
        if data is None:
            shutil.rmtree(workdir, ignore_errors=True)
    console.print(summary_table(report))
    try:
        write_html(report, report_path)
    except ReportError as error:
        raise click.ClickException(str(error)) from None
    console.print(f"report: {report_path}")
    if as_json:
        click.echo(json.dumps(_json(report)))
    # No checks at all is a failure too: the run never got that far.
    sys.exit(0 if report.checks and report.passed else 1)


async def _run_live(launch: Launch, console: Console) -> DemoReport:
    progress = Progress(
        TextColumn("sign-ups"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task("sign-ups", total=launch.settings.users)
    running = asyncio.create_task(launch.run())
    with Live(Group(progress, _now_table(launch)), console=console, refresh_per_second=4) as live:
        while not running.done():
            progress.update(task, completed=launch.signups)
            live.update(Group(progress, _now_table(launch)))
            await asyncio.wait({running}, timeout=0.5)
        progress.update(task, completed=launch.signups)
    return running.result()


def _now_table(launch: Launch) -> Table:
    table = Table(
        "sign-ups/s",
        "kv ops/s",
        "calls/s",
        "queue",
        "throttled/s",
        "p99 ms",
        "other p99 ms",
        "controllers",
    )
    sample = launch.latest
    if sample is None:
        return table
    rates = ", ".join(
        f"{name.removeprefix('kv:')} {rate:,.0f}/s"
        for name, rate in sample.controller_rates.items()
        if rate < 100_000
    )
    table.add_row(
        f"{sample.signups_per_s:.0f}",
        f"{sample.kv_ops_per_s:,.0f}",
        f"{sample.calls_completed_per_s:,.0f}",
        f"{sample.queue_depth:,}",
        f"{sample.throttled_per_s:.0f}",
        f"{sample.p99_ms:.0f}" if sample.p99_ms is not None else "-",
        f"{sample.other_p99_ms:.0f}" if sample.other_p99_ms is not None else "-",
        rates or "open",
    )
    return table


def _json(report: DemoReport) -> dict[str, object]:
    return {
        "checks": {check.name: check.passed for check in report.checks},
        "signups": report.totals.get("signups", 0),
        "kv_ops": report.totals.get("kv_ops", 0),
        "calls": report.totals.get("calls", 0),
        "failed_requests": report.totals.get("failed_requests", 0),
        "lost_writes": report.totals.get("lost_writes", 0),
        "duration_s": report.duration_s,
    }
