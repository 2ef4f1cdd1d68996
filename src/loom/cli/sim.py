"""`loom sim`: run the deterministic simulator over many seeds and report violations."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loom.functions_sim.run import BUGS as FUNCTIONS_BUGS
from loom.functions_sim.run import run_seed as run_functions_seed
from loom.paxos.params import KNOWN_BUGS
from loom.sim.faults import PROFILES
from loom.sim.run import SeedResult, replay_command, run_seed

SEEDS_MAX = 1_000_000
OPS_MAX = 100_000


def _ensure_fixed_hash_seed() -> None:
    """Traces replay in any process only with hashing fixed (PITFALLS 18): re-exec once."""
    if os.environ.get("PYTHONHASHSEED") == "0":
        return
    env = dict(os.environ, PYTHONHASHSEED="0")
    args = [sys.executable, "-m", "loom.cli.main", *sys.argv[1:]]
    os.execve(sys.executable, args, env)  # noqa: S606 - same interpreter, same arguments


@click.command()
@click.option(
    "--seeds",
    type=click.IntRange(1, SEEDS_MAX),
    default=20,
    show_default=True,
    help="How many seeds to run.",
)
@click.option(
    "--start", type=click.IntRange(0, None), default=1, show_default=True, help="First seed."
)
@click.option(
    "--faults",
    type=click.Choice(PROFILES),
    default="all",
    show_default=True,
    help="Which faults to inject.",
)
@click.option(
    "--ops",
    type=click.IntRange(10, OPS_MAX),
    default=300,
    show_default=True,
    help="Client operations per seed.",
)
@click.option(
    "--bug",
    "bugs",
    multiple=True,
    type=click.Choice(sorted(KNOWN_BUGS | FUNCTIONS_BUGS)),
    help="Deliberately break the protocol (repeatable) to see the checkers bite.",
)
@click.option(
    "--functions",
    is_flag=True,
    help="Simulate the functions platform's queue lifecycle instead (schedulers, workers, "
    "leases, limits) under crashes, pauses and store outages.",
)
@click.option("--fail-fast", is_flag=True, help="Stop at the first failing seed.")
@click.option("--verbose", is_flag=True, help="Print a line for every seed.")
def sim(
    seeds: int,
    start: int,
    faults: str,
    ops: int,
    bugs: tuple[str, ...],
    fail_fast: bool,
    verbose: bool,
    functions: bool,
) -> None:
    """Run the real protocol cores in a seeded simulation with faults, and check them.

    Ends with one line: `sim: <N> seeds, <V> violations, <X> operations checked`;
    exits 0 only if there were no violations. A failing seed prints the command that
    replays it exactly.
    """
    _ensure_fixed_hash_seed()
    known = FUNCTIONS_BUGS if functions else KNOWN_BUGS
    if not set(bugs) <= known:
        raise click.BadParameter(
            f"with{'' if functions else 'out'} --functions, bugs are {sorted(known)}"
        )
    if functions:
        _functions_sim(seeds, start, frozenset(bugs), fail_fast, verbose)
        return
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True)
    bug_set = frozenset(bugs)
    violations = checked = ran = 0
    began = time.monotonic()
    with Progress(
        TextColumn("sim"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[violations]} violations"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as progress:
        task = progress.add_task("seeds", total=seeds, violations=0)
        for seed in range(start, start + seeds):
            result = _run_guarded(seed, faults, ops, bug_set)
            ran += 1
            checked += result.operations_checked
            violations += len(result.violations)
            _report(out, result, faults, ops, bug_set, verbose)
            progress.update(task, advance=1, violations=violations)
            if fail_fast and result.violations:
                break
    elapsed = time.monotonic() - began
    if verbose:
        out.print(f"[dim]{ran} seeds in {elapsed:.1f}s[/dim]")
    out.print(f"sim: {ran} seeds, {violations} violations, {checked} operations checked")
    sys.exit(1 if violations else 0)


def _functions_sim(
    seeds: int, start: int, bugs: frozenset[str], fail_fast: bool, verbose: bool
) -> None:
    """`loom sim --functions`: the queue lifecycle, seed by seed (see loom.functions_sim)."""
    logging.disable(logging.WARNING)  # the platform logs every simulated fault
    out = Console(highlight=False, soft_wrap=True)
    violations = ran = runs = 0
    for seed in range(start, start + seeds):
        result = run_functions_seed(seed, bugs)
        ran += 1
        runs += result.runs
        violations += len(result.violations)
        bug = "".join(f" --bug {b}" for b in sorted(bugs))
        if result.violations:
            out.print(
                f"seed {seed}: {len(result.violations)} violations; "
                f"replay: loom sim --functions --start {seed} --seeds 1{bug}"
            )
            for violation in result.violations[:5]:
                out.print(f"  - {violation}", markup=False)
            if fail_fast:
                break
        elif verbose:
            faults = ", ".join(f"{n} {f}" for f, n in sorted(result.faults.items()))
            out.print(
                f"seed {seed}: ok, {result.submitted} calls, {result.runs} runs; faults: {faults}"
            )
    out.print(
        f"sim --functions: {ran} seeds, {violations} violations, {runs} function runs checked"
    )
    sys.exit(1 if violations else 0)


def _run_guarded(seed: int, faults: str, ops: int, bugs: frozenset[str]) -> SeedResult:
    """A core that crashes on a broken invariant is a finding, reported like a violation."""
    try:
        return run_seed(seed, faults=faults, ops=ops, bugs=bugs)
    except Exception as error:  # noqa: BLE001 - every crash becomes a reported seed
        trace = "".join(traceback.format_exception(error)[-3:]).strip()
        return SeedResult(seed=seed, violations=[f"crash: {error!r}\n{trace}"])


def _report(
    out: Console, result: SeedResult, faults: str, ops: int, bugs: frozenset[str], verbose: bool
) -> None:
    if result.violations:
        out.print(
            f"seed {result.seed}: {len(result.violations)} violations "
            f"(trace {result.trace_hash}); replay: {replay_command(result.seed, faults, ops, bugs)}"
        )
        for violation in result.violations[:5]:
            out.print(f"  - {violation}", markup=False)
    elif verbose:
        out.print(
            f"seed {result.seed}: ok, {result.operations_checked} operations checked, "
            f"{result.virtual_ms / 1000:.1f}s simulated (trace {result.trace_hash})"
        )
