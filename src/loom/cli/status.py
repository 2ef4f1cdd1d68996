"""`loom status`: the cluster as the shard manager sees it, for people or (`--json`) machines."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from loom.cli.data import cluster_option, connected
from loom.runtime.codec import ShardStatus, StatusReply


def status_json(status: StatusReply) -> dict[str, object]:
    return {
        "nodes": [
            {
                "id": n.node,
                "address": n.address,
                "region": n.region,
                "zone": n.zone,
                "alive": n.alive,
                "pid": n.pid,
                "incarnation": n.incarnation,
                "stored_bytes": n.stored_bytes,
                "throttled_per_s": n.throttled_per_s,
                "tier": n.tier,
            }
            for n in status.nodes
        ],
        "shards": [
            {
                "id": s.shard,
                "keyspace": s.keyspace,
                "members": [*s.acceptors, *s.followers],
                "acceptors": list(s.acceptors),
                "followers": list(s.followers),
                "primary": s.primary,
                "epoch": s.epoch,
                "active": s.activated,
                "applied_seq": _applied(s, s.primary),
                "commit_seq": s.progress.get(s.primary, (0, 0))[1],
                "lag": _lag(s),
                "ops_per_s": s.ops_per_s,
                "load_per_s": s.load_per_s,
                "progress": {m: {"applied": a, "commit": c} for m, (a, c) in s.progress.items()},
            }
            for s in status.shards
        ],
    }


def _applied(shard: ShardStatus, member: str) -> int:
    return shard.progress.get(member, (0, 0))[0]


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GiB"


def _lag(shard: ShardStatus) -> int:
    """How far the slowest member's applied seq trails the primary's commit seq."""
    commit = shard.progress.get(shard.primary, (0, 0))[1]
    applied = [a for a, _ in shard.progress.values()]
    return max(0, commit - min(applied)) if applied else 0


@click.command("status")
@cluster_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for machines.")
def status_command(cluster: str, as_json: bool) -> None:
    """Nodes (address, region, alive) and shards (keyspace, members, primary, epoch,
    applied/commit seq, lag)."""
    with connected(cluster) as client:
        status = client.status()
    if as_json:
        click.echo(json.dumps(status_json(status)))
        return
    console = Console()
    nodes = Table(title="nodes")
    node_columns = ("node", "address", "region", "zone", "tier", "alive", "pid", "incarnation")
    for column in (*node_columns, "size", "throttled/s"):
        nodes.add_column(column)
    for node in status.nodes:
        alive = "[green]yes[/green]" if node.alive else "[red]no[/red]"
        nodes.add_row(
            node.node,
            node.address,
            node.region or "-",
            node.zone or "-",
            node.tier or "-",
            alive,
            str(node.pid),
            str(node.incarnation),
            _bytes(node.stored_bytes),
            f"{node.throttled_per_s:g}",
        )
    shards = Table(title="shards")
    columns = (
        "shard",
        "keyspace",
        "epoch",
        "primary",
        "active",
        "members",
        "applied/commit",
        "lag",
        "ops/s",
        "load/s",
    )
    for column in columns:
        shards.add_column(column)
    for shard in status.shards:
        progress = " ".join(f"{n}:{a}/{c}" for n, (a, c) in sorted(shard.progress.items()))
        members = ",".join(shard.acceptors) + (
            " +" + ",".join(shard.followers) if shard.followers else ""
        )
        shards.add_row(
            str(shard.shard),
            shard.keyspace or "-",
            str(shard.epoch),
            shard.primary,
            "yes" if shard.activated else "[yellow]activating[/yellow]",
            members,
            progress or "-",
            str(_lag(shard)),
            f"{shard.ops_per_s:,.0f}",
            f"{shard.load_per_s:,.0f}",
        )
    console.print(nodes)
    console.print(shards)
