"""`loom cluster up`: the embedded default — a shard manager and N nodes as child
processes on 127.0.0.1, supervised until Ctrl-C; on the same `--data` it comes back
with all its data."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from types import FrameType

import click

from loom.cli.processes import DATA_DIR, NO_AUTH_WARNING
from loom.runtime.localcluster import LocalCluster
from loom.shardmgr.routing import LABEL

SUPERVISE_INTERVAL_S = 0.5
# A child that keeps dying is not restarted more often than this.
RESTART_INTERVAL_MIN_S = 5.0


@click.group("cluster")
def cluster_group() -> None:
    """Run a whole local cluster."""


@cluster_group.command("up")
@click.option("--nodes", type=click.IntRange(1, 32), default=3, show_default=True)
@click.option(
    "--regions",
    default="",
    help="Comma-separated region labels, given to the nodes in turn (e.g. a,b,c).",
)
@click.option(
    "--data",
    type=DATA_DIR,
    default=Path("loom-data"),
    show_default=True,
    help="Where the cluster keeps its data and logs; reuse it to get the data back.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65_535),
    default=7300,
    show_default=True,
    help="The shard manager's port (clients connect here; 0: any free port).",
)
@click.option("--lease-ms", type=click.FloatRange(50, 60_000), default=1000.0, show_default=True)
@click.option(
    "--functions",
    "functions_app",
    metavar="MODULE:APP",
    help="Also run a scheduler and a worker for this loom.functions App (importable from here).",
)
@click.option(
    "--auth",
    is_flag=True,
    help="Require tokens; the first start prints the admin token once (ADR 0008).",
)
@click.option(
    "--tls",
    is_flag=True,
    help="Every connection with TLS; certificates are made in DATA/tls (ADR 0015).",
)
def up_command(
    nodes: int,
    regions: str,
    data: Path,
    port: int,
    lease_ms: float,
    functions_app: str | None,
    auth: bool,
    tls: bool,
) -> None:
    """Start a shard manager and NODES storage nodes on 127.0.0.1, print the address to
    connect to, and keep them running (restarting any that dies) until Ctrl-C."""
    labels = [r for r in regions.split(",") if r]
    bad = [r for r in labels if not LABEL.fullmatch(r)]
    if bad:
        raise click.BadParameter(f"invalid region labels {bad}", param_hint="--regions")
    data.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(data_dir=data, lease_ms=lease_ms, auth=auth, tls=tls)
    stopping = _stop_on_signals()
    try:
        cluster.start_manager(port=port)
        for index in range(nodes):
            region = labels[index % len(labels)] if labels else ""
            cluster.start_node(f"n{index + 1}", region=region)
        if functions_app:
            cluster.start_scheduler("scheduler")
            cluster.start_worker("worker", functions_app)
        _announce(cluster, data, nodes, labels)
        if functions_app:
            click.echo(f"  a scheduler and a worker run the functions of {functions_app}")
        sys.stdout.flush()  # whoever reads our stdout (a pipe) sees the address now
        _supervise(cluster, stopping)
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None
    finally:
        click.echo("stopping the cluster…", err=True)
        cluster.stop()
        click.echo("stopped", err=True)


def _stop_on_signals() -> list[bool]:
    stopping = [False]

    def stop(_signum: int, _frame: FrameType | None) -> None:
        stopping[0] = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    return stopping


def _announce(cluster: LocalCluster, data: Path, nodes: int, labels: list[str]) -> None:
    address = cluster.manager_address
    where = f" over regions {','.join(labels)}" if labels else ""
    click.echo(f"loom cluster up: a shard manager and {nodes} nodes{where}")
    click.echo(f"  data in {data}, logs in {data / 'logs'}")
    click.echo(f"  connect to {address}")
    click.echo(f"  try: loom keyspace create demo --shards 2 -c {address}")
    click.echo(f"       loom kv put demo hello world -c {address}")
    _announce_auth(cluster)
    if cluster.tls:
        files = cluster.certificates
        click.echo(f"  TLS is on; clients: export LOOM_TLS_CA={files.ca}")
        click.echo(f"  (a client certificate, optional: {files.cert('client')})")
    click.echo("  Ctrl-C stops it")


def _announce_auth(cluster: LocalCluster) -> None:
    if not cluster.auth:
        click.secho(f"  WARNING: {NO_AUTH_WARNING}", fg="yellow", err=True)
        return
    if cluster.admin_token is None:
        click.echo("  auth is on; the admin token was printed when this cluster was first up")
        return
    click.echo(f"  auth is on; admin token (shown once, keep it): {cluster.admin_token}")
    click.echo(f"  use it: export LOOM_TOKEN={cluster.admin_token}")


def _supervise(cluster: LocalCluster, stopping: list[bool]) -> None:
    restarted_at: dict[str, float] = {}
    while not stopping[0]:
        time.sleep(SUPERVISE_INTERVAL_S)
        for name in cluster.exited():
            now = time.monotonic()
            if now - restarted_at.get(name, -RESTART_INTERVAL_MIN_S) < RESTART_INTERVAL_MIN_S:
                continue
            code = cluster.processes[name].returncode
            click.echo(f"{name} exited with status {code}; restarting it", err=True)
            cluster.stop([name])
            restarted_at[name] = now
            try:
                cluster.restart(name)
            except RuntimeError as error:
                click.echo(f"could not restart {name}: {error}", err=True)
