"""`loom`: the command-line entry point. Subcommands live in their own modules."""

from __future__ import annotations

import click

from loom import __version__
from loom.cli.bench import bench_group
from loom.cli.cluster import cluster_group
from loom.cli.data import keyspace_group, kv_group
from loom.cli.functions import functions_group, scheduler_command, worker_command
from loom.cli.processes import node_command, sm_command
from loom.cli.sim import sim
from loom.cli.status import status_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loom")
def main() -> None:
    """loom: a sharded, replicated key-value store and a background-function platform."""


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
main.add_command(functions_group)

if __name__ == "__main__":
    main()
