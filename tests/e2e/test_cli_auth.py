"""`loom cluster up --auth` as a user runs it: it prints the admin token once (not again
on a restart on the same data); the CLI reaches the cluster with `--token` or
$LOOM_TOKEN and is refused without. Without `--auth` it warns loudly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CONNECT = re.compile(r"connect to (127\.0\.0\.1:\d+)")
TOKEN = re.compile(r"admin token \(shown once, keep it\): (loom_\S+)")


def loom(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LOOM_TOKEN"}
    if token is not None:
        env["LOOM_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "loom.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


class ClusterUp:
    """`loom cluster up` as a child process; reads what it prints until it is up."""

    def __init__(self, data: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loom.cli.main", "cluster", "up", "--port", "0",
             "--data", str(data), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        self.out: list[str] = []
        self.err = ""

    def wait_up(self) -> str:
        """Its stdout up to the 'Ctrl-C stops it' line (the test's timeout bounds it)."""
        assert self.proc.stdout is not None
        while not self.out or "Ctrl-C stops it" not in self.out[-1]:
            line = self.proc.stdout.readline()
            assert line, f"cluster up exited: {self.out}"
            self.out.append(line)
        return "".join(self.out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, self.err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.err = self.proc.communicate()


@pytest.mark.timeout(240)
def test_cluster_up_with_auth_prints_the_admin_token_once(tmp_path: Path) -> None:
    first = ClusterUp(tmp_path / "data", "--auth", "--nodes", "3")
    try:
        printed = first.wait_up()
        match = TOKEN.search(printed)
        assert match is not None, printed
        token = match.group(1)
        address = CONNECT.search(printed)
        assert address is not None
        at = ("-c", address.group(1))
        refused = loom("keyspace", "create", "ks", *at)
        assert refused.returncode != 0 and "PermissionDenied" in refused.stderr
        created = loom("--token", token, "keyspace", "create", "ks", *at)
        assert created.returncode == 0, created.stderr
        assert loom("kv", "put", "ks", "k", "v", *at, token=token).returncode == 0
    finally:
        first.stop()

    again = ClusterUp(tmp_path / "data", "--auth", "--nodes", "3")
    try:
        printed = again.wait_up()
        assert TOKEN.search(printed) is None and token not in printed
        assert "printed when this cluster was first up" in printed
        address = CONNECT.search(printed)
        assert address is not None
        got = loom("kv", "get", "ks", "k", "-c", address.group(1), token=token)
        assert got.returncode == 0 and got.stdout == "v\n", got.stderr
    finally:
        again.stop()


@pytest.mark.timeout(120)
def test_cluster_up_without_auth_warns(tmp_path: Path) -> None:
    cluster = ClusterUp(tmp_path / "data", "--nodes", "1")
    try:
        cluster.wait_up()
    finally:
        cluster.stop()
    assert "AUTH IS OFF" in cluster.err
