"""`loom tenant …` and `loom token …`: tenants and their tokens (admin token needed when
the cluster runs with auth; ADR 0008)."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from loom.cli.data import cluster_option, connected
from loom.shardmgr.tenancy import TENANT_WEIGHT_MAX


@click.group("tenant")
def tenant_group() -> None:
    """Create and list tenants (the owners of keyspaces and tokens)."""


@tenant_group.command("create")
@click.argument("name")
@click.option(
    "--weight",
    type=click.IntRange(1, TENANT_WEIGHT_MAX),
    default=1,
    show_default=True,
    help="Share of service under contention, relative to other tenants.",
)
@cluster_option
def create_tenant_command(name: str, weight: int, cluster: str) -> None:
    """Create tenant NAME (the same again is a no-op)."""
    with connected(cluster) as client:
        tenant = client.create_tenant(name, weight=weight)
    click.echo(f"tenant {tenant.name} (weight {tenant.weight})")


@tenant_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@cluster_option
def list_tenants_command(as_json: bool, cluster: str) -> None:
    """Every tenant and how many keyspaces it owns."""
    with connected(cluster) as client:
        tenants = client.tenants()
        keyspaces = client.keyspaces()
    owned = {t.name: sum(1 for k in keyspaces if k.tenant == t.name) for t in tenants}
    if as_json:
        rows = [{"name": t.name, "weight": t.weight, "keyspaces": owned[t.name]} for t in tenants]
        click.echo(json.dumps(rows))
        return
    table = Table(title="tenants")
    for column in ("name", "weight", "keyspaces"):
        table.add_column(column)
    for t in tenants:
        table.add_row(t.name, str(t.weight), str(owned[t.name]))
    Console().print(table)


@click.group("token")
def token_group() -> None:
    """Make tokens (the cluster keeps only their SHA-256)."""


@token_group.command("create")
@click.option("--tenant", required=True, help="The tenant the token acts for.")
@click.option("--admin", is_flag=True, help="Reach every keyspace and cluster operations.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the token.")
@cluster_option
def create_token_command(tenant: str, admin: bool, quiet: bool, cluster: str) -> None:
    """Make a token for TENANT and print it: it is shown this once, never again."""
    with connected(cluster) as client:
        made = client.create_token(tenant, admin=admin)
    if quiet:
        click.echo(made.secret)
        return
    kind = "admin token" if made.admin else "token"
    click.echo(f"{kind} {made.token_id} for tenant {made.tenant} (shown once, keep it):")
    click.echo(made.secret)


@token_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@cluster_option
def list_tokens_command(as_json: bool, cluster: str) -> None:
    """Every token's id, tenant and role (secrets are never kept, so never shown)."""
    with connected(cluster) as client:
        tokens = client.tokens()
    if as_json:
        rows = [{"id": t.token_id, "tenant": t.tenant, "admin": t.admin} for t in tokens]
        click.echo(json.dumps(rows))
        return
    table = Table(title="tokens")
    for column in ("id", "tenant", "role"):
        table.add_column(column)
    for t in tokens:
        table.add_row(t.token_id, t.tenant, "admin" if t.admin else "tenant")
    Console().print(table)


@token_group.command("revoke")
@click.argument("token_id")
@cluster_option
def revoke_token_command(token_id: str, cluster: str) -> None:
    """Delete token TOKEN_ID (from `loom token list`); it stops working within a second."""
    with connected(cluster) as client:
        client.revoke_token(token_id)
    click.echo(f"token {token_id} revoked")
