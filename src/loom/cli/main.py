"""`loom`: the command-line entry point. Subcommands live in their own modules."""

from __future__ import annotations

from pathlib import Path

import click

from loom import __version__
from loom.cli.bench import bench_group
from loom.cli.cluster import cluster_group
from loom.cli.data import keyspace_group, kv_group
from loom.cli.demo import demo_group
from loom.cli.functions import functions_group, scheduler_command, worker_command
from loom.cli.processes import node_command, sm_command
from loom.cli.sim import sim
from loom.cli.status import status_command
from loom.cli.tenancy import tenant_group, token_group
from loom.cli.tls import root_tls_options, tls_config, tls_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loom")
@click.option(
    "--token",
    envvar="LOOM_TOKEN",
    help="Token for a cluster that runs with auth (default: $LOOM_TOKEN).",
)
@root_tls_options
@click.pass_context
def main(
    context: click.Context,
    token: str | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """loom: a sharded, replicated key-value store and a background-function platform."""
    context.obj = {"token": token, "tls": tls_config(tls_ca, tls_cert, tls_key)}


main.add_command(sim)
main.add_command(sm_command)
main.add_command(node_command)
main.add_command(status_command)
main.add_command(bench_group)
main.add_command(cluster_group)
main.add_command(kv_group)
main.add_command(keyspace_group)
main.add_command(worker_command)
main.add_command(scheduler_command)
main.add_command(demo_group)
main.add_command(functions_group)
main.add_command(tenant_group)
main.add_command(token_group)
main.add_command(tls_group)

if __name__ == "__main__":
    main()
