"""`loom sm` and `loom node`: the cluster's processes (work in progress for the cluster
issue). Each logs to stderr, prints `listening on HOST:PORT` once ready, and stops
cleanly on SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import click

from loom.core.ids import NodeId
from loom.paxos.params import ReplicaParams
from loom.runtime.manager import ManagerRuntime
from loom.runtime.node import NodeRuntime
from loom.runtime.rpc import run

LISTEN_HELP = "HOST:PORT to listen on (port 0: any free port)."
DATA_DIR = click.Path(file_okay=False, dir_okay=True, path_type=Path)


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{text!r} is not HOST:PORT")
    return host, int(port)


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


@click.command("sm")
@click.option(
    "--listen", default="127.0.0.1:7300", show_default=True, help="HOST:PORT (port 0: any)"
)
@click.option("--data", type=DATA_DIR, required=True, help="Directory of the metastore file.")
def sm_command(listen: str, data: Path) -> None:
    """Run the shard manager: node registry, epochs, failover (control plane only)."""
    host, port = parse_address(listen)
    data.mkdir(parents=True, exist_ok=True)

    async def main() -> None:
        manager = ManagerRuntime(metastore_path=data / "metastore.json", host=host, port=port)
        await manager.start()
        click.echo(f"loom sm listening on {host}:{manager.port}")
        sys.stdout.flush()
        try:
            await _until_stopped()
        finally:
            await manager.close()

    run(main())


@click.command("node")
@click.option("--id", "node_id", required=True, help="This node's name, unique in the cluster.")
@click.option(
    "--listen", default="127.0.0.1:7400", show_default=True, help="HOST:PORT (port 0: any)"
)
@click.option("--sm", "manager", required=True, help="The shard manager's HOST:PORT.")
@click.option("--data", type=DATA_DIR, required=True, help="This node's data directory.")
@click.option("--lease-ms", type=click.FloatRange(50, 60_000), default=1000.0, show_default=True)
def node_command(node_id: str, listen: str, manager: str, data: Path, lease_ms: float) -> None:
    """Run a storage node: the replicas of its shards over one RocksDB."""
    host, port = parse_address(listen)
    sm_host, sm_port = parse_address(manager)
    params = ReplicaParams(lease_ms=lease_ms, heartbeat_interval_ms=min(100.0, lease_ms / 10))

    async def main() -> None:
        node = NodeRuntime(node=NodeId(node_id), data_dir=data, params=params, host=host, port=port)
        await node.start()
        node.connect_manager(sm_host, sm_port)
        click.echo(f"loom node {node_id} listening on {host}:{node.port}")
        sys.stdout.flush()
        try:
            await _until_stopped()
        finally:
            await node.close()

    run(main())
