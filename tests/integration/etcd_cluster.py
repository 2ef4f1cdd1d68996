"""Real etcd processes on 127.0.0.1 for integration tests: free ports, a tmp data dir.

Rules:
- A missing `etcd` binary FAILS the test (never skips): `make test` installs Debian's
  `etcd-server`, so a missing binary means the machine is not set up as documented.
- We stop only the processes we started, by their Popen handle (SIGTERM, then SIGKILL
  after a grace period), and always at teardown, also when the test failed.
- Start-up waits by polling `/health` with a deadline, never by a bare sleep.
- Elections are tuned short (heartbeat 50 ms, election 500 ms) so leader changes and
  lease expiry fit in a fast test; etcd then grants lease TTLs down to 1 s.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

HEALTHY_TIMEOUT_S = 15.0
HEALTH_POLL_S = 0.05
STOP_GRACE_S = 5.0
# At teardown every member stops at once, so a leader's hand-off on SIGTERM has nobody to
# hand to and would wait seconds; the data is a tmp dir we are about to drop anyway.
TEARDOWN_GRACE_S = 1.0
MEMBERS_MAX = 5
MISSING_ETCD = (
    "the `etcd` binary is not on PATH; `make test` installs Debian's etcd-server "
    "(sudo apt-get install etcd-server) — install it and run again"
)


def etcd_binary() -> str:
    """The etcd executable, or a failed test that says how to get it."""
    found = shutil.which("etcd")
    if found is None:
        pytest.fail(MISSING_ETCD, pytrace=False)
    return found


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out; held together so they are distinct."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(slots=True, kw_only=True)
class EtcdMember:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass(slots=True, kw_only=True)
class EtcdCluster:
    """1..MEMBERS_MAX etcd members we started; `endpoints` is what clients are given."""

    binary: str
    members: list[EtcdMember]
    token: str
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def endpoints(self) -> list[str]:
        return [member.client_url for member in self.members]

    def start(self, index: int) -> None:
        member = self.members[index]
        assert not member.is_running, f"{member.name} is already running"
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        command = [
            self.binary,
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            f"--listen-client-urls={member.client_url}",
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={initial}",
            f"--initial-cluster-token={self.token}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=50",
            "--election-timeout=500",
        ]
        with member.log_path.open("ab") as log:
            member.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.environment
            )

    def stop(self, index: int, *, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop one member we started: `sig` first, SIGKILL if it lingers."""
        process = self.members[index].process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_GRACE_S)

    def stop_all(self) -> None:
        """SIGTERM every member at once, SIGKILL whichever still runs after the grace."""
        running = [m.process for m in self.members if m.process and m.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGCONT)  # a test may have frozen it
            process.terminate()
        deadline = time.monotonic() + TEARDOWN_GRACE_S
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_GRACE_S)

    def wait_healthy(self, indexes: list[int] | None = None) -> None:
        """Poll `/health` of the given members (all by default) until each says true."""
        chosen = range(len(self.members)) if indexes is None else indexes
        deadline = time.monotonic() + HEALTHY_TIMEOUT_S
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            for index in chosen:
                self._wait_one_healthy(client, self.members[index], deadline)

    def _wait_one_healthy(self, client: httpx.Client, member: EtcdMember, deadline: float) -> None:
        while True:
            if not member.is_running:
                pytest.fail(f"etcd {member.name} exited; log:\n{self.log_of(member)}")
            try:
                answer = client.get(member.client_url + "/health")
                if answer.status_code == 200 and answer.json().get("health") == "true":
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"etcd {member.name} not healthy in time; log:\n{self.log_of(member)}")
            time.sleep(HEALTH_POLL_S)

    @staticmethod
    def log_of(member: EtcdMember) -> str:
        try:
            return member.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return "(no log)"


def make_cluster(directory: Path, size: int) -> EtcdCluster:
    """Describe (not start) a cluster of `size` members with fresh ports under `directory`."""
    assert 1 <= size <= MEMBERS_MAX
    ports = free_ports(2 * size)
    members = []
    for i in range(size):
        name = f"m{i}"
        (directory / name).mkdir(parents=True)
        members.append(
            EtcdMember(
                name=name,
                client_url=f"http://127.0.0.1:{ports[2 * i]}",
                peer_url=f"http://127.0.0.1:{ports[2 * i + 1]}",
                data_dir=directory / name / "data",
                log_path=directory / name / "etcd.log",
            )
        )
    # etcd reads ETCD_* variables as flags; a developer's own must not leak in.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    token = f"loom-test-{directory.name}-{ports[0]}"
    return EtcdCluster(binary=etcd_binary(), members=members, token=token, environment=environment)


@pytest.fixture
def etcd_cluster_factory(tmp_path: Path) -> Iterator[Callable[[int], EtcdCluster]]:
    """Start clusters of n members (healthy on return); all are stopped at teardown."""
    started: list[EtcdCluster] = []

    def start(size: int = 1) -> EtcdCluster:
        cluster = make_cluster(tmp_path / f"etcd-{len(started)}", size)
        started.append(cluster)
        for index in range(size):
            cluster.start(index)
        cluster.wait_healthy()
        return cluster

    try:
        yield start
    finally:
        for cluster in started:
            cluster.stop_all()


@pytest.fixture
def etcd(etcd_cluster_factory: Callable[[int], EtcdCluster]) -> EtcdCluster:
    """A single-member etcd of this test's own, free to stop or kill."""
    return etcd_cluster_factory(1)


@pytest.fixture(scope="session")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One single-member etcd for the whole session; tests isolate by key prefix, and
    must not stop it."""
    cluster = make_cluster(tmp_path_factory.mktemp("shared-etcd"), 1)
    try:
        cluster.start(0)
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop_all()
