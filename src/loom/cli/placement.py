"""`loom shard transfer-primary` and `loom keyspace set-tier`: the operator's placement
commands (admin token when the cluster runs with auth)."""

from __future__ import annotations

import click
from rich.progress import Progress

from loom.cli.data import cluster_option, connected
from loom.shardmgr.routing import DEFAULT_TIER


@click.group("shard")
def shard_group() -> None:
    """Operate on p-shards (see `loom status` for their ids, primaries and members)."""


@shard_group.command("transfer-primary")
@click.argument("shard", type=click.IntRange(1, 2**31 - 1))
@click.option("--to", "to", required=True, help="The acceptor node that becomes primary.")
@cluster_option
def transfer_primary_command(shard: int, to: str, cluster: str) -> None:
    """Hand the primary of p-shard SHARD to its acceptor --to, gracefully: the node
    catches up first, the old primary releases its lease, clients see no error."""
    with connected(cluster) as client:
        primary, epoch = client.transfer_primary(shard, to)
    click.echo(f"p-shard {shard}: primary {primary} in epoch {epoch}")


@click.command("set-tier")
@click.argument("name")
@click.argument("tier", default=DEFAULT_TIER)
@click.option("--no-wait", is_flag=True, help="Return once the move is stored.")
@cluster_option
def set_tier_command(name: str, tier: str, no_wait: bool, cluster: str) -> None:
    """Move keyspace NAME to the nodes of TIER, live: its replicas are replaced one at a
    time (primaries handed off gracefully). Refused if TIER has too few live nodes;
    after a shard-manager restart the move goes on by itself (run again to watch)."""
    with connected(cluster) as client, Progress() as bar:
        task = bar.add_task(f"moving {name} to tier {tier}", total=None)

        def show(placed: int, total: int) -> None:
            bar.update(task, completed=placed, total=total)

        keyspace = client.set_keyspace_tier(name, tier, wait=not no_wait, progress=show)
    state = "stored; moving" if no_wait else "every replica on it"
    click.echo(f"keyspace {keyspace.name}: tier {keyspace.spec.tier} ({state})")
