"""`loom bench`: benchmarks against real processes. They measure and print; they never
decide pass or fail."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from loom.benchmarks import tenants, ycsb
from loom.benchmarks.etcd_peer import CLIENT_EXTRA, EtcdError
from loom.benchmarks.failover import run_failover
from loom.benchmarks.functions import run as run_functions
from loom.benchmarks.kv import PEERS, SEED_DEFAULT, SHARDS_DEFAULT, SHARDS_MAX, run_kv_bench
from loom.core.errors import LoomError
from loom.runtime.rpc import run

T = TypeVar("T")
EXIT_ON_SIGTERM = 128 + signal.SIGTERM


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


@bench_group.command("kv")
@click.option(
    "--workload",
    type=click.Choice(sorted(ycsb.WORKLOADS), case_sensitive=False),
    default="A",
    show_default=True,
    help="A: 50/50 read/update, B: 95/5, C: read-only, W: write-only.",
)
@click.option("--clients", type=click.IntRange(1, ycsb.CLIENTS_MAX), default=64, show_default=True)
@click.option(
    "--duration",
    type=click.FloatRange(0, ycsb.DURATION_S_MAX, min_open=True),
    default=10.0,
    show_default=True,
    help="Measured seconds (after the warm-up).",
)
@click.option(
    "--warmup",
    type=click.FloatRange(0, ycsb.DURATION_S_MAX),
    default=ycsb.WARMUP_S_DEFAULT,
    show_default=True,
    help="Unmeasured seconds before the measured window.",
)
@click.option(
    "--records",
    type=click.IntRange(1, ycsb.RECORDS_MAX),
    default=ycsb.RECORDS_DEFAULT,
    show_default=True,
)
@click.option(
    "--value-bytes",
    type=click.IntRange(1, ycsb.VALUE_BYTES_MAX),
    default=ycsb.VALUE_BYTES_DEFAULT,
    show_default=True,
)
@click.option(
    "--shards",
    type=click.IntRange(1, SHARDS_MAX),
    default=SHARDS_DEFAULT,
    show_default=True,
    help="p-shards of the benchmark keyspace (replication 3).",
)
@click.option(
    "--peer",
    type=click.Choice(PEERS),
    default=None,
    help="Then run the same workload (same seed) against a local 3-member etcd, or "
    "(loom-tls) against a fresh loom cluster with TLS on every connection.",
)
@click.option("--seed", type=int, default=SEED_DEFAULT, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, for machines.")
def kv_command(
    workload: str,
    clients: int,
    duration: float,
    warmup: float,
    records: int,
    value_bytes: int,
    shards: int,
    peer: str | None,
    seed: int,
    as_json: bool,
) -> None:
    """A YCSB-style closed-loop workload (zipfian keys, --clients concurrent clients)
    against a fresh local cluster (manager + 3 nodes): STRONG gets, QUORUM puts; prints
    ops/s, p50 and p99. With --peer etcd, then the same workload against a fresh 3-member
    etcd (never at the same time) and the ratio loom/etcd of ops/s. Progress: stderr."""
    if peer == "etcd" and importlib.util.find_spec("aetcd") is None:
        raise click.ClickException(
            f"--peer etcd needs the etcd client package 'aetcd': pip install -e '.[{CLIENT_EXTRA}]'"
        )
    chosen = ycsb.WORKLOADS[workload.upper()]
    try:
        result = run(
            _cancelled_by_sigterm(
                run_kv_bench(
                    chosen,
                    clients=clients,
                    duration_s=duration,
                    records=records,
                    value_bytes=value_bytes,
                    peer=peer,
                    shards=shards,
                    progress=lambda line: click.echo(line, err=True),
                    warmup_s=warmup,
                    seed=seed,
                )
            )
        )
    except (ValueError, EtcdError, ycsb.LoadFailed, LoomError) as error:
        raise click.ClickException(f"{type(error).__name__}: {error}") from None
    except asyncio.CancelledError:
        click.echo("stopped by SIGTERM (the clusters were stopped)", err=True)
        raise SystemExit(EXIT_ON_SIGTERM) from None
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(_table(result, peer))


async def _cancelled_by_sigterm(main: Coroutine[Any, Any, T]) -> T:
    """Awaits `main`, cancelled by SIGTERM as Ctrl-C cancels it (asyncio.Runner), so its
    cleanup stops the clusters' processes instead of leaving them running."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await main
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _table(result: dict[str, object], peer: str | None) -> str:
    columns = [("loom", result["loom"])]
    if peer is not None:
        columns.append((peer, result["peer"]))
    lines = [
        f"workload {result['workload']}, {result['clients']} clients, "
        f"{result['duration_s']:g} s measured",
        f"{'':<10}" + "".join(f"{name:>12}" for name, _ in columns),
    ]
    for field, label in (
        ("ops_per_s", "ops/s"),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("errors", "errors"),
    ):
        cells = [_cell(stats, field) for _, stats in columns]
        lines.append(f"{label:<10}" + "".join(f"{cell:>12}" for cell in cells))
    if peer is not None:
        ratio = result["ratio"]
        lines.append(f"ratio loom/{peer} ops/s: " + ("n/a" if ratio is None else f"{ratio:.2f}"))
    return "\n".join(lines)


def _cell(stats: object, field: str) -> str:
    if not isinstance(stats, dict):
        return "-"
    value = stats.get(field)
    if value is None:
        return "-"
    if field == "ops_per_s":
        return f"{value:,.0f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


@bench_group.command("functions")
@click.option("--calls", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1024),
    default=64,
    show_default=True,
    help="Calls one worker runs at once (Celery: its worker's concurrency).",
)
@click.option("--submitters", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--peer", type=click.Choice(["celery"]), help="Also run the same work through this.")
@click.option(
    "--timeout", "timeout_s", type=click.FloatRange(1, 3600), default=300.0, show_default=True
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, for machines.")
def functions_command(
    calls: int, concurrency: int, submitters: int, peer: str | None, timeout_s: float, as_json: bool
) -> None:
    """Submit CALLS no-op function calls and run them on a local cluster (sm, 3 kv
    nodes, a scheduler, a worker); calls per second submitted and completed, end-to-end
    latency, calls lost. With --peer celery, the same through Celery and Redis."""
    result = run_functions(
        calls,
        concurrency=concurrency,
        submitters=submitters,
        peer=peer,
        timeout_s=timeout_s,
        progress=lambda line: click.echo(line, err=True),
    )
    if as_json:
        click.echo(json.dumps(result))
        return
    for system in ("loom", "peer"):
        figures = result[system]
        if isinstance(figures, dict):
            name = "loom" if system == "loom" else peer
            click.echo(
                f"{name}: submitted {figures['submitted_per_s']}/s, completed "
                f"{figures['completed_per_s']}/s, p50 {figures['p50_ms']} ms, "
                f"p99 {figures['p99_ms']} ms, lost {figures['lost']}"
            )
    if result["ratio"] is not None:
        click.echo(f"completed calls/s, loom / {peer}: {result['ratio']}")


@bench_group.command("tenants")
@click.option(
    "--duration",
    type=click.FloatRange(1, tenants.DURATION_S_MAX),
    default=10.0,
    show_default=True,
    help="Measured seconds of each phase (quiet alone, then with the noisy tenant).",
)
@click.option(
    "--rounds",
    type=click.IntRange(1, tenants.ROUNDS_MAX),
    default=3,
    show_default=True,
    help="Alternations of the two phases (the machine's background load drifts).",
)
@click.option(
    "--quiet-rate",
    type=click.FloatRange(1, tenants.RATE_MAX),
    default=100.0,
    show_default=True,
    help="The quiet tenant's ops/s (half reads, half writes), paced.",
)
@click.option(
    "--noisy-writers",
    type=click.IntRange(1, tenants.NOISY_WRITERS_MAX),
    default=64,
    show_default=True,
    help="The noisy tenant's concurrent writers, back to back.",
)
@click.option(
    "--noisy-quota",
    type=click.FloatRange(1, tenants.RATE_MAX),
    default=100.0,
    show_default=True,
    help="The noisy tenant's keyspace writes/s quota.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, for machines.")
def tenants_command(
    duration: float,
    rounds: int,
    quiet_rate: float,
    noisy_writers: int,
    noisy_quota: float,
    as_json: bool,
) -> None:
    """A quiet tenant's latency alone and beside a noisy tenant driven far over its
    writes/s quota, on a fresh local cluster with auth (manager + 3 nodes). Prints both
    p99s and their ratio; progress on stderr."""
    try:
        result = run(
            _cancelled_by_sigterm(
                tenants.run_tenants_bench(
                    quiet_rate=quiet_rate,
                    noisy_writers=noisy_writers,
                    noisy_quota=noisy_quota,
                    duration_s=duration,
                    rounds=rounds,
                    progress=lambda line: click.echo(line, err=True),
                )
            )
        )
    except (RuntimeError, LoomError) as error:
        raise click.ClickException(f"{type(error).__name__}: {error}") from None
    if as_json:
        click.echo(json.dumps(result))
        return
    solo, shared, noisy = result["quiet_solo"], result["quiet_with_noisy"], result["noisy"]
    assert isinstance(solo, dict) and isinstance(shared, dict) and isinstance(noisy, dict)
    ratios = result["round_p99_ratios"]
    assert isinstance(ratios, list)
    click.echo(
        f"tenants: quiet p99 {solo['p99_ms']} ms alone, {shared['p99_ms']} ms beside the "
        f"noisy tenant ({result['p99_ratio']}x); p50 {solo['p50_ms']} → {shared['p50_ms']} ms; "
        f"quiet errors {solo['errors']}/{shared['errors']}; each round: "
        f"{', '.join(f'{r}x' for r in ratios)}"
    )
    click.echo(
        f"noisy: {noisy['writers']} writers, {noisy['accepted_writes_per_s']} writes/s accepted "
        f"of a {noisy['quota_writes_per_s']:g}/s quota, {noisy['throttled']} Throttled, "
        f"other errors {noisy['other_errors'] or 'none'}; nodes refused "
        f"{noisy['refused_per_s_at_nodes']} requests/s"
    )
