"""`loom kv …` and `loom keyspace …`: the store from a shell, through the client library.

Keys and values are given as text (UTF-8); printed values that are not UTF-8 show
with backslash escapes. Every error is the typed client error, printed in one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import msgspec
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from loom import kv
from loom.cli.tls import current_tls
from loom.core.errors import LoomError
from loom.core.ids import NodeId
from loom.runtime.codec import ReshardReport
from loom.shardmgr.routing import MAPPINGS, Quota, ShardRoute

T = TypeVar("T")
DEFAULT_CLUSTER = "127.0.0.1:7300"
PAUSES_SHOWN = 5  # `keyspace reshard` prints this many of the longest pauses
CONSISTENCY_HELP = "strong, eventual, ryw (read your writes) or bounded:MS"


def cluster_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--cluster",
        "-c",
        default=lambda: os.environ.get("LOOM_CLUSTER", DEFAULT_CLUSTER),
        show_default=f"$LOOM_CLUSTER or {DEFAULT_CLUSTER}",
        help="Any cluster address: the shard manager or nodes, HOST:PORT[,HOST:PORT…].",
    )(fn)


def current_token() -> str | None:
    """`loom --token T …` or $LOOM_TOKEN (the root command keeps it in its context)."""
    context = click.get_current_context(silent=True)
    root = context.find_root().obj if context is not None else None
    if isinstance(root, dict) and root.get("token"):
        return str(root["token"])
    return os.environ.get("LOOM_TOKEN") or None


@contextmanager
def connected(cluster: str) -> Iterator[kv.SyncClient]:
    try:
        with kv.connect_sync(
            cluster, timeout_s=10.0, token=current_token(), tls=current_tls()
        ) as client:
            yield client
    except LoomError as error:
        raise click.ClickException(f"{type(error).__name__}: {error}") from None


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


def parse_consistency(text: str) -> kv.ReadConsistency:
    named = {"strong": kv.STRONG, "eventual": kv.EVENTUAL, "ryw": kv.READ_YOUR_WRITES}
    if text.lower() in named:
        return named[text.lower()]
    kind, _, ms = text.partition(":")
    if kind.lower() == "bounded":
        try:
            return kv.bounded(float(ms))
        except (ValueError, LoomError):
            pass
    raise click.BadParameter(f"{text!r}: use {CONSISTENCY_HELP}", param_hint="--consistency")


def _item_json(item: kv.Item) -> dict[str, object]:
    return {"key": _text(item.key), "value": _text(item.value), "version": str(item.version)}


# ---------------------------------------------------------------------- loom kv


@click.group("kv")
def kv_group() -> None:
    """Read and write keys of a keyspace."""


@kv_group.command("put")
@click.argument("keyspace")
@click.argument("key")
@click.argument("value")
@click.option("--shard-key", help="Co-locate with other keys of this shard key.")
@click.option("--if-absent", is_flag=True, help="Only if the key does not exist.")
@click.option("--if-value", help="Only if the current value is this.")
@click.option("--ttl", "ttl_s", type=click.FloatRange(min=0.001), help="Expire after seconds.")
@click.option("--fast-ack", is_flag=True, help="Acknowledge when sequenced (may be lost).")
@cluster_option
def put_command(
    keyspace: str,
    key: str,
    value: str,
    shard_key: str | None,
    if_absent: bool,
    if_value: str | None,
    ttl_s: float | None,
    fast_ack: bool,
    cluster: str,
) -> None:
    """Store VALUE under KEY; prints the write's version."""
    with connected(cluster) as client:
        version = client.keyspace(keyspace).put(
            key.encode(),
            value.encode(),
            shard_key=shard_key.encode() if shard_key else None,
            if_absent=if_absent,
            if_value=if_value.encode() if if_value is not None else None,
            ttl_s=ttl_s,
            durability=kv.FAST_ACK if fast_ack else kv.QUORUM,
        )
    click.echo(str(version))


@kv_group.command("get")
@click.argument("keyspace")
@click.argument("key")
@click.option("--shard-key")
@click.option("--consistency", default="strong", show_default=True, help=CONSISTENCY_HELP)
@click.option("--json", "as_json", is_flag=True)
@cluster_option
def get_command(
    keyspace: str, key: str, shard_key: str | None, consistency: str, as_json: bool, cluster: str
) -> None:
    """Print KEY's value (exit status 1 if it does not exist)."""
    level = parse_consistency(consistency)
    with connected(cluster) as client:
        item = client.keyspace(keyspace).get(
            key.encode(), shard_key=shard_key.encode() if shard_key else None, consistency=level
        )
    if as_json:
        click.echo(json.dumps(_item_json(item) if item else None))
    elif item is not None:
        click.echo(_text(item.value))
    if item is None:
        if not as_json:
            click.echo(f"{key}: not found", err=True)
        raise SystemExit(1)


@kv_group.command("delete")
@click.argument("keyspace")
@click.argument("key")
@click.option("--shard-key")
@click.option("--if-exists", is_flag=True, help="Fail if there is nothing to delete.")
@cluster_option
def delete_command(
    keyspace: str, key: str, shard_key: str | None, if_exists: bool, cluster: str
) -> None:
    """Delete KEY."""
    with connected(cluster) as client:
        existed = client.keyspace(keyspace).delete(
            key.encode(), shard_key=shard_key.encode() if shard_key else None, if_exists=if_exists
        )
    click.echo("deleted" if existed else "nothing to delete")


@kv_group.command("incr")
@click.argument("keyspace")
@click.argument("key")
@click.argument("delta", type=int, default=1)
@click.option("--shard-key")
@cluster_option
def incr_command(keyspace: str, key: str, delta: int, shard_key: str | None, cluster: str) -> None:
    """Add DELTA (default 1) to the counter at KEY; prints the new value."""
    with connected(cluster) as client:
        value = client.keyspace(keyspace).increment(
            key.encode(), delta, shard_key=shard_key.encode() if shard_key else None
        )
    click.echo(str(value))


@kv_group.command("scan")
@click.argument("keyspace")
@click.option("--shard-key", required=True, help="The μshard to scan is this key's.")
@click.option("--prefix", default="", help="Only keys starting with this.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--consistency", default="strong", show_default=True, help=CONSISTENCY_HELP)
@click.option("--json", "as_json", is_flag=True)
@cluster_option
def scan_command(
    keyspace: str,
    shard_key: str,
    prefix: str,
    limit: int,
    consistency: str,
    as_json: bool,
    cluster: str,
) -> None:
    """List the keys of one μshard (up to --limit, following pages)."""
    level = parse_consistency(consistency)
    items: list[kv.Item] = []
    with connected(cluster) as client:
        ks = client.keyspace(keyspace)
        cursor: bytes | None = None
        while len(items) < limit:
            page = ks.scan(
                shard_key=shard_key.encode(),
                prefix=prefix.encode(),
                limit=limit - len(items),
                cursor=cursor,
                consistency=level,
            )
            items += page.items
            cursor = page.cursor
            if cursor is None:
                break
    if as_json:
        click.echo(json.dumps([_item_json(i) for i in items]))
        return
    for item in items:
        click.echo(f"{_text(item.key)}\t{_text(item.value)}")


# ---------------------------------------------------------------------- loom keyspace


@click.group("keyspace")
def keyspace_group() -> None:
    """Create, list, describe and drop keyspaces."""


@keyspace_group.command("create")
@click.argument("name")
@click.option("--shards", type=click.IntRange(1, 1024), default=1, show_default=True)
@click.option("--replication", type=click.Choice(["1", "3", "5"]), default="3", show_default=True)
@click.option("--ushards", type=click.IntRange(1, 65_536), default=4096, show_default=True)
@click.option("--tier", default="wildcard", show_default=True)
@click.option("--regions", default="", help="Comma-separated regions to place replicas in.")
@click.option("--tenant", help="Owner (admin token only; default: the token's tenant).")
@click.option(
    "--mapping",
    type=click.Choice(MAPPINGS),
    default="compact",
    show_default=True,
    help="μshard placement: compact ranges, or akkio (μshards move to where they are "
    "accessed, ADR 0013).",
)
@cluster_option
def create_command(
    name: str,
    shards: int,
    replication: str,
    ushards: int,
    tier: str,
    regions: str,
    tenant: str | None,
    mapping: str,
    cluster: str,
) -> None:
    """Create keyspace NAME and wait until its p-shards serve."""
    with connected(cluster) as client:
        keyspace = client.create_keyspace(
            name,
            shards=shards,
            replication=int(replication),
            ushards=ushards,
            tier=tier,
            regions=[r for r in regions.split(",") if r],
            tenant=tenant,
            mapping=mapping,
        )
    click.echo(f"keyspace {keyspace.name}: {len(keyspace.placements)} p-shards ready")


@keyspace_group.command("reshard")
@click.argument("name")
@click.option("--shards", type=click.IntRange(1, 1024), required=True)
@cluster_option
def reshard_command(name: str, shards: int, cluster: str) -> None:
    """Grow or shrink keyspace NAME to SHARDS p-shards, moving μshards live (clients see
    a short pause per μshard, no errors); a shrink then retires the emptied p-shards."""
    reports: list[ReshardReport] = []
    with connected(cluster) as client, Progress() as bar:
        task = bar.add_task(f"resharding {name}", total=None)

        def show(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        keyspace = client.reshard_keyspace(
            name, shards=shards, progress=show, report=reports.append
        )
    click.echo(f"keyspace {keyspace.name}: {len(keyspace.placements)} p-shards, resharded")
    pauses = reports[0].pauses if reports else ()
    if pauses:
        longest = ", ".join(f"μshard {u}: {ms:.0f} ms" for u, ms in pauses[:PAUSES_SHOWN])
        click.echo(f"{len(pauses)} μshards moved; longest write pauses: {longest}")


@keyspace_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@cluster_option
def list_command(as_json: bool, cluster: str) -> None:
    """The keyspaces and their settings."""
    with connected(cluster) as client:
        keyspaces = client.keyspaces()
    if as_json:
        click.echo(json.dumps([msgspec.to_builtins(k.spec) for k in keyspaces]))
        return
    table = Table(title="keyspaces")
    columns = ("name", "p-shards", "replication", "μshards", "tier", "regions", "mapping", "tenant")
    for column in columns:
        table.add_column(column)
    for k in keyspaces:
        spec = k.spec
        table.add_row(
            spec.name,
            str(len(k.placements)),
            str(spec.replication),
            str(spec.ushards),
            spec.tier,
            ",".join(spec.regions) or "any",
            spec.mapping,
            k.tenant or "-",
        )
    Console().print(table)


@keyspace_group.command("describe")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@cluster_option
def describe_command(name: str, as_json: bool, cluster: str) -> None:
    """A keyspace's p-shards: μshard ranges, members, primary, epoch."""
    with connected(cluster) as client:
        table = client.routing()
    keyspace = next((k for k in table.keyspaces if k.name == name), None)
    if keyspace is None:
        raise click.ClickException(f"NotFound: no keyspace {name!r}")
    routes = {s.shard: s for s in table.shards}
    ends = [start for start, _ in keyspace.ranges[1:]] + [keyspace.spec.ushards]
    rows = []
    for (start, shard), end in zip(keyspace.ranges, ends, strict=True):
        route = routes.get(shard) or ShardRoute(
            shard=shard, keyspace=name, epoch=0, primary=NodeId("?"), acceptors=()
        )
        rows.append((start, end - 1, route))
    if as_json:
        shards = [
            {
                "shard": route.shard,
                "ushards": [first, last],
                "primary": route.primary,
                "epoch": route.epoch,
                "ready": route.ready,
                "acceptors": list(route.acceptors),
                "followers": list(route.followers),
            }
            for first, last, route in rows
        ]
        described = {
            "spec": msgspec.to_builtins(keyspace.spec),
            "tenant": keyspace.tenant,
            "quota": _quota_json(keyspace.quota),
            "shards": shards,
            "retiring": list(keyspace.retiring),
        }
        click.echo(json.dumps(described))
        return
    click.echo(f"tenant: {keyspace.tenant or '-'}   quota: {quota_text(keyspace.quota)}")
    if keyspace.retiring:
        click.echo(f"shrinking: retiring p-shards {', '.join(map(str, keyspace.retiring))}")
    out = Table(title=f"keyspace {name} (mapping v{keyspace.mapping_version})")
    for column in ("p-shard", "μshards", "primary", "epoch", "ready", "acceptors", "followers"):
        out.add_column(column)
    for first, last, route in rows:
        out.add_row(
            str(route.shard),
            f"{first}–{last}",
            route.primary,
            str(route.epoch),
            "yes" if route.ready else "no",
            ",".join(route.acceptors),
            ",".join(route.followers) or "-",
        )
    Console().print(out)


def _quota_json(quota: Quota) -> dict[str, float | int | None]:
    return {
        "reads_per_s": quota.reads_per_s,
        "writes_per_s": quota.writes_per_s,
        "bytes_max": quota.bytes_max,
    }


def quota_text(quota: Quota) -> str:
    """One line, e.g. `reads/s 1000, writes/s unlimited, bytes 10000000`."""

    def shown(value: float | None) -> str:
        return "unlimited" if value is None else f"{value:g}"

    return (
        f"reads/s {shown(quota.reads_per_s)}, writes/s {shown(quota.writes_per_s)}, "
        f"bytes {'unlimited' if quota.bytes_max is None else quota.bytes_max}"
    )


@keyspace_group.command("set-quota")
@click.argument("name")
@click.option("--reads-per-s", type=click.FloatRange(min=0, min_open=True), help="Reads/s.")
@click.option("--writes-per-s", type=click.FloatRange(min=0, min_open=True), help="Writes/s.")
@click.option("--bytes-max", type=click.IntRange(min=1), help="Stored bytes (approximate).")
@cluster_option
def set_quota_command(
    name: str,
    reads_per_s: float | None,
    writes_per_s: float | None,
    bytes_max: int | None,
    cluster: str,
) -> None:
    """Set keyspace NAME's cluster-wide quota. It replaces the whole quota: a limit not
    given is unlimited (no option at all removes every limit). Over reads/s or writes/s,
    requests fail with Throttled; over bytes, writes other than deletes fail with
    QuotaExceeded."""
    with connected(cluster) as client:
        keyspace = client.set_quota(
            name, reads_per_s=reads_per_s, writes_per_s=writes_per_s, bytes_max=bytes_max
        )
    click.echo(f"keyspace {keyspace.name} quota: {quota_text(keyspace.quota)}")


@keyspace_group.command("drop")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@cluster_option
def drop_command(name: str, yes: bool, cluster: str) -> None:
    """Delete keyspace NAME and all its data."""
    if not yes:
        click.confirm(f"Drop keyspace {name!r} and all its data?", abort=True)
    with connected(cluster) as client:
        client.drop_keyspace(name)
    click.echo(f"keyspace {name} dropped")
