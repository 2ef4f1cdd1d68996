"""`loom bench`: benchmarks against real processes. They measure and print; they never
decide pass or fail."""

from __future__ import annotations

import json

import click

from loom.benchmarks.failover import run_failover
from loom.runtime.rpc import run


@click.group("bench")
def bench_group() -> None:
    """Measure loom on this machine (see docs/perf.md)."""


@bench_group.command("failover")
@click.option("--trials", type=click.IntRange(1, 50), default=5, show_default=True)
@click.option("--lease-ms", type=click.FloatRange(50, 60_000), default=1000.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for machines.")
def failover_command(trials: int, lease_ms: float, as_json: bool) -> None:
    """Kill the primary of a 3-node cluster under write load (SIGKILL) TRIALS times,
    restarting it in between; time until writes succeed again, and count acknowledged
    writes lost (must be 0)."""
    say = (lambda _: None) if as_json else (lambda line: click.echo(line, err=True))
    result = run(run_failover(trials=trials, lease_ms=lease_ms, progress=say))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"failover: {trials} trials, median {result['median_s']} s, max {result['max_s']} s, "
        f"lost writes {result['lost_writes']} (lease {lease_ms:g} ms); trials {result['trials_s']}"
    )
