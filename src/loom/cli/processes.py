"""`loom sm` and `loom node`: the cluster's processes. Each logs to stderr, prints
`listening on HOST:PORT` on stdout once ready, and stops cleanly on SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path

import click

from loom.cli.locality_options import (
    akkio_options,
    latency_option,
    locality_params,
    parse_latency_option,
)
from loom.cli.tls import tls_options
from loom.core.ids import NodeId
from loom.core.limits import DEFAULT_LIMITS
from loom.paxos.params import ReplicaParams
from loom.runtime.leadership import EtcdLeadership
from loom.runtime.manager import ManagerRuntime
from loom.runtime.metastore_etcd import EtcdMetastore
from loom.runtime.metastore_file import FileMetastore
from loom.runtime.node import NodeRuntime
from loom.runtime.rpc import run
from loom.runtime.tls import TlsConfig
from loom.shardmgr.autosplit import SplitParams
from loom.shardmgr.core import SmParams
from loom.shardmgr.metastore import Metastore
from loom.shardmgr.rebalance import BalanceParams
from loom.shardmgr.routing import DEFAULT_TIER, LABEL

NO_AUTH_WARNING = (
    "AUTH IS OFF: any client can read, write and drop every keyspace and change quotas. "
    "Start the shard manager (and nodes) with --auth to require tokens."
)
LISTEN_HELP = "HOST:PORT to listen on (port 0: any free port)."
DATA_DIR = click.Path(file_okay=False, dir_okay=True, path_type=Path)


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{text!r} is not HOST:PORT")
    return host, int(port)


LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)
log = logging.getLogger("loom")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def until_stopped(also: asyncio.Event | None = None) -> None:
    """Until SIGTERM or Ctrl-C (or `also` is set). A signal does not set `also`: the
    caller tells a stop it was asked for from its own reason to stop (a deposed
    manager exits with status 1, a stopped one with 0)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, also) if e is not None]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()


@click.command("sm")
@click.option(
    "--listen", default="127.0.0.1:7300", show_default=True, help="HOST:PORT (port 0: any)"
)
@click.option("--data", type=DATA_DIR, help="Directory of the metastore file (one manager).")
@click.option(
    "--etcd",
    help="etcd HOST:PORT[,HOST:PORT…] holding the state; several managers share it and "
    "one leads (by an etcd lease).",
)
@click.option(
    "--replace-after",
    "replace_after_s",
    type=click.FloatRange(1, 86_400),
    default=60.0,
    show_default=True,
    help="Seconds a node may stay silent before its replicas move to other nodes.",
)
@click.option(
    "--balance-cooldown",
    "balance_cooldown_s",
    type=click.FloatRange(0, 86_400),
    default=BalanceParams().cooldown_ms / 1000,
    show_default=True,
    help="Seconds between two load-balancing moves (and after an operator's hand-off).",
)
@click.option(
    "--balance-min-ops",
    type=click.FloatRange(0, 1e9),
    default=BalanceParams().load_gap_min_per_s,
    show_default=True,
    help="Ops/s below which load is not balanced (gap between nodes, and in all).",
)
@click.option(
    "--auth",
    is_flag=True,
    help="Require tokens (ADR 0008). The first start prints an admin token, once.",
)
@click.option("--region", default="", help="This manager's region label (the latency matrix).")
@latency_option
@akkio_options
@click.option(
    "--auto-split/--no-auto-split",
    default=True,
    show_default=True,
    help="Grow a keyspace by itself (double its p-shards) when one of its p-shards stays "
    "over --split-bytes or --split-ops.",
)
@click.option(
    "--split-bytes",
    type=click.IntRange(1),
    default=SplitParams().bytes_max,
    show_default=True,
    help="Stored bytes of a p-shard above which its keyspace splits.",
)
@click.option(
    "--split-ops",
    type=click.FloatRange(min=0, min_open=True),
    default=SplitParams().ops_per_s_max,
    show_default=True,
    help="Commands per second of a p-shard above which its keyspace splits.",
)
@click.option(
    "--split-max-shards",
    type=click.IntRange(1, 1024),
    default=SplitParams().shards_max,
    show_default=True,
    help="The most p-shards an automatic split grows a keyspace to.",
)
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
@tls_options
def sm_command(
    listen: str,
    data: Path | None,
    etcd: str | None,
    replace_after_s: float,
    balance_cooldown_s: float,
    balance_min_ops: float,
    auth: bool,
    region: str,
    latency: str,
    akkio_period_s: float,
    akkio_share: float,
    akkio_dwell_s: float,
    akkio_accesses_min: float,
    auto_split: bool,
    split_bytes: int,
    split_ops: float,
    split_max_shards: int,
    log_level: str,
    tls: TlsConfig | None,
) -> None:
    """Run the shard manager: node registry, keyspaces and placement, epochs, failover,
    the routing table (control plane only: never on the data path)."""
    setup_logging(log_level)
    host, port = parse_address(listen)
    if (data is None) == (etcd is None):
        raise click.UsageError("give exactly one of --data DIR and --etcd HOST:PORT[,…]")
    if not LABEL.fullmatch(region):
        raise click.BadParameter(f"{region!r} is not a valid label", param_hint="--region")
    matrix = parse_latency_option(latency, region)
    locality = locality_params(akkio_share, akkio_dwell_s, akkio_accesses_min)
    endpoints = [
        f"http://{h}:{p}" for h, p in map(parse_address, (etcd or "").split(",") if etcd else [])
    ]

    if data is not None:
        data.mkdir(parents=True, exist_ok=True)

    async def main() -> int:
        leadership: EtcdLeadership | None = None
        metastore: Metastore
        if data is not None:
            metastore = FileMetastore(data / "metastore.json")
        else:
            metastore = EtcdMetastore(endpoints)
            leadership = EtcdLeadership(endpoints)
        params = SmParams(replace_after_ms=replace_after_s * 1000)
        manager = ManagerRuntime(
            metastore=metastore,
            params=params,
            host=host,
            port=port,
            leadership=leadership,
            auth=auth,
            split=SplitParams(
                enabled=auto_split,
                bytes_max=split_bytes,
                ops_per_s_max=split_ops,
                shards_max=split_max_shards,
            ),
            tls=tls,
            region=region,
            latency=matrix,
            locality=locality,
            locality_period_s=akkio_period_s,
            balance=BalanceParams(
                cooldown_ms=balance_cooldown_s * 1000,
                load_gap_min_per_s=balance_min_ops,
                load_total_min_per_s=balance_min_ops,
            ),
        )
        await manager.start()
        where = f"metastore {data}" if data is not None else f"etcd {etcd} (standby until elected)"
        log.info("shard manager up on %s:%d, %s", host, manager.port, where)
        click.echo(f"loom sm listening on {host}:{manager.port}")
        showing: asyncio.Task[None] | None = None
        if auth and manager.leading:
            # The secret exists only in this line: the catalog keeps its hash.
            shown = manager.bootstrap_token or "(made earlier; not shown again)"
            click.echo(f"loom sm admin token: {shown}")
        elif auth:  # a standby: if it is the first to lead, it makes the token then
            click.echo("loom sm admin token: (shown by the first manager to lead)")
            showing = asyncio.get_running_loop().create_task(_show_token_once_made(manager))
        else:
            log.warning(NO_AUTH_WARNING)
        sys.stdout.flush()
        try:
            await until_stopped(manager.deposed)
        finally:
            if showing is not None:
                showing.cancel()
            log.info("shard manager stopping")
            await manager.close()
        return 1 if manager.deposed.is_set() else 0

    sys.exit(run(main()))


async def _show_token_once_made(manager: ManagerRuntime) -> None:
    await manager.token_made.wait()
    click.echo(f"loom sm admin token: {manager.bootstrap_token}")
    sys.stdout.flush()


@click.command("node")
@click.option("--id", "node_id", required=True, help="This node's name, unique in the cluster.")
@click.option(
    "--listen", default="127.0.0.1:7400", show_default=True, help="HOST:PORT (port 0: any)"
)
@click.option("--sm", "manager", required=True, help="The shard managers' HOST:PORT[,HOST:PORT…].")
@click.option("--data", type=DATA_DIR, required=True, help="This node's data directory.")
@click.option("--region", default="", help="Region label (placement spreads replicas).")
@click.option("--zone", default="", help="Zone label within the region.")
@click.option("--tier", default=DEFAULT_TIER, show_default=True, help="Node pool.")
@click.option(
    "--lease-ms",
    type=click.FloatRange(50, 60_000),
    default=1000.0,
    show_default=True,
    help="Primary lease; failover takes about this long plus failure detection.",
)
@click.option(
    "--log-entries-max",
    type=click.IntRange(16, 1_000_000),
    default=DEFAULT_LIMITS.log_retained_entries_max,
    show_default=True,
    help="Log entries kept per shard; a member further behind gets a snapshot.",
)
@click.option(
    "--auth",
    is_flag=True,
    help="Refuse clients until the manager's routing table (with tokens) arrives, and "
    "any table without auth.",
)
@latency_option
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
@tls_options
def node_command(
    node_id: str,
    listen: str,
    manager: str,
    data: Path,
    region: str,
    zone: str,
    tier: str,
    lease_ms: float,
    log_entries_max: int,
    auth: bool,
    latency: str,
    log_level: str,
    tls: TlsConfig | None,
) -> None:
    """Run a storage node: the replicas of its shards over one RocksDB."""
    setup_logging(log_level)
    host, port = parse_address(listen)
    managers = [parse_address(a) for a in manager.split(",")]
    for name, label in (("region", region), ("zone", zone), ("tier", tier)):
        if not LABEL.fullmatch(label):
            raise click.BadParameter(f"{label!r} is not a valid label", param_hint=f"--{name}")
    matrix = parse_latency_option(latency, region)
    params = ReplicaParams(
        lease_ms=lease_ms,
        heartbeat_interval_ms=min(100.0, lease_ms / 10),
        limits=replace(DEFAULT_LIMITS, log_retained_entries_max=log_entries_max),
    )

    async def main() -> None:
        node = NodeRuntime(
            node=NodeId(node_id),
            data_dir=data,
            params=params,
            host=host,
            port=port,
            region=region,
            zone=zone,
            tier=tier,
            auth=auth,
            tls=tls,
            latency=matrix,
        )
        await node.start()
        node.connect_managers(managers)
        log.info(
            "node %s up on %s:%d (incarnation %d, region %r), data %s",
            node_id, host, node.port, node.incarnation, region, data,
        )  # fmt: skip
        click.echo(f"loom node {node_id} listening on {host}:{node.port}")
        sys.stdout.flush()
        try:
            await until_stopped()
        finally:
            log.info("node %s stopping", node_id)
            await node.close()

    run(main())
