"""`loom sim` as a user runs it: its summary line, exit status and replay command."""

import re
import subprocess
import sys

SUMMARY = re.compile(r"^sim: (\d+) seeds, (\d+) violations, (\d+) operations checked$")


def loom(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loom.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_clean_run_ends_with_one_summary_line_and_exit_zero() -> None:
    done = loom("sim", "--seeds", "2", "--faults", "all", "--ops", "150")
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    match = SUMMARY.match(last)
    assert match is not None, last
    assert match.group(1) == "2"
    assert match.group(2) == "0"
    assert int(match.group(3)) > 200


def test_a_deliberate_bug_is_reported_with_a_replay_command_and_exit_one() -> None:
    done = loom("sim", "--seeds", "3", "--bug", "skip-prepare", "--fail-fast")
    assert done.returncode == 1
    assert "replay: PYTHONHASHSEED=0 loom sim --seeds 1 --start" in done.stdout
    match = SUMMARY.match(done.stdout.strip().splitlines()[-1])
    assert match is not None
    assert int(match.group(2)) > 0


def test_an_unknown_bug_name_is_refused_with_the_valid_choices() -> None:
    done = loom("sim", "--bug", "no-such-bug")
    assert done.returncode == 2
    assert "skip-prepare" in done.stderr


def test_a_replayed_seed_prints_the_same_trace() -> None:
    first = loom("sim", "--seeds", "1", "--start", "5", "--ops", "100", "--verbose")
    second = loom("sim", "--seeds", "1", "--start", "5", "--ops", "100", "--verbose")
    trace = re.compile(r"trace ([0-9a-f]{32})")
    assert trace.findall(first.stdout) == trace.findall(second.stdout) != []
