"""`loom status`: the cluster as the shard manager sees it, for people or (`--json`) machines."""

from __future__ import annotations

import json

import click
import msgspec
from rich.console import Console
from rich.table import Table

from loom.cli.processes import parse_address
from loom.core.errors import LoomError
from loom.runtime.codec import StatusReply, StatusRequest, decode, encode
from loom.runtime.rpc import RpcClient, run

TIMEOUT_S = 5.0


async def fetch_status(host: str, port: int) -> StatusReply:
    async with await RpcClient.connect(host, port) as client:
        body = await client.call(encode(StatusRequest()), timeout_s=TIMEOUT_S)
    reply = decode(body)
    if not isinstance(reply, StatusReply):
        raise click.ClickException(f"the shard manager answered {type(reply).__name__}")
    return reply


@click.command("status")
@click.option(
    "--sm",
    "manager",
    default="127.0.0.1:7300",
    show_default=True,
    help="The shard manager's HOST:PORT.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for machines.")
def status_command(manager: str, as_json: bool) -> None:
    """Nodes (address, alive) and shards (members, primary, epoch, applied/commit seq)."""
    host, port = parse_address(manager)
    try:
        status = run(fetch_status(host, port))
    except LoomError as error:
        raise click.ClickException(
            f"cannot reach the shard manager at {manager}: {error}"
        ) from None
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(status)))
        return
    console = Console()
    nodes = Table(title="nodes")
    for column in ("node", "address", "alive", "incarnation"):
        nodes.add_column(column)
    for node in status.nodes:
        alive = "[green]yes[/green]" if node.alive else "[red]no[/red]"
        nodes.add_row(node.node, node.address, alive, str(node.incarnation))
    shards = Table(title="shards")
    for column in (
        "shard",
        "epoch",
        "primary",
        "active",
        "acceptors",
        "followers",
        "applied/commit",
    ):
        shards.add_column(column)
    for shard in status.shards:
        progress = ", ".join(f"{n} {a}/{c}" for n, (a, c) in sorted(shard.progress.items()))
        shards.add_row(
            str(shard.shard),
            str(shard.epoch),
            shard.primary,
            "yes" if shard.activated else "activating",
            ",".join(shard.acceptors),
            ",".join(shard.followers) or "-",
            progress or "-",
        )
    console.print(nodes)
    console.print(shards)
