"""A cluster of real `loom sm` and `loom node` processes on 127.0.0.1, for `loom cluster
up`, benchmarks and end-to-end tests. Every process is a child we started; we signal
only those, by PID. Each child's stderr (its log) goes to `DATA/logs/NAME.log`."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loom.runtime.tls import TlsConfig
from loom.runtime.tls_certs import CertificateFiles, init_certificates

LISTENING = re.compile(r"listening on [^\s:]+:(\d+)")
ADMIN_TOKEN = re.compile(r"admin token: (loom_\S+)")
WORKING = re.compile(r"loom worker \S+ running")
STOP_TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0


@dataclass(slots=True)
class LocalCluster:
    data_dir: Path
    lease_ms: float = 1000.0
    # Extra `loom node` arguments (e.g. a small `--log-entries-max` to force snapshots).
    node_args: tuple[str, ...] = ()
    processes: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    # How each process was started, so it can be restarted with the same arguments.
    commands: dict[str, list[str]] = field(default_factory=dict)

    # Names of the shard-manager processes (several with etcd).
    managers: list[str] = field(default_factory=list)
    # Tokens required (`--auth` to the manager and nodes); the admin token the manager
    # printed on its first start lands in `admin_token`.
    auth: bool = False
    admin_token: str | None = None
    # Every process with TLS (ADR 0015), certificates made once in DATA/tls.
    tls: bool = False
    # Injected inter-region latency (`--latency`, ADR 0013), given to the manager and
    # every node; the manager's region label (its side of the matrix).
    latency: str = ""
    manager_region: str = ""

    @property
    def manager_address(self) -> str:
        """Every shard manager's address, as clients and `--sm` take them."""
        return ",".join(f"127.0.0.1:{self.ports[m]}" for m in self.managers if m in self.ports)

    @property
    def certificates(self) -> CertificateFiles:
        """DATA/tls: the CA, cluster and client certificates (`loom tls init`)."""
        return CertificateFiles(directory=self.data_dir / "tls")

    def client_tls(self) -> TlsConfig | None:
        """What a client of this cluster connects with (None without TLS)."""
        return TlsConfig(ca=self.certificates.ca) if self.tls else None

    def _tls_args(self) -> list[str]:
        files = self.certificates
        if not files.exist():
            init_certificates(files.directory)
        return files.cluster().args()

    def _spawn(self, name: str, args: list[str], ready: re.Pattern[str] = LISTENING) -> int:
        if self.tls and "--tls-ca" not in args:
            args = [*args, *self._tls_args()]
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{name}.log").open("a") as log:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                [sys.executable, "-m", "loom.cli.main", *args],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                env=self._env(args[0]),
                # Its own process group: a Ctrl-C in our terminal reaches us, and we stop
                # the children in order.
                start_new_session=True,
            )
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the process listens
        match = ready.search(line)
        if match is None:
            proc.kill()
            proc.wait()
            _close(proc)
            raise RuntimeError(
                f"{name} did not start (see {logs / f'{name}.log'}): {line.strip()!r}"
            )
        self.processes[name] = proc
        if not match.groups():
            self.commands[name] = args
            return 0
        self.ports[name] = int(match.group(1))
        # A restart listens where this one does (nodes and clients know the address).
        self.commands[name] = [
            f"127.0.0.1:{self.ports[name]}" if arg == "127.0.0.1:0" else arg for arg in args
        ]
        return self.ports[name]

    def _env(self, command: str) -> dict[str, str] | None:
        """Schedulers and workers of a cluster with auth act for it with the admin
        token (`$LOOM_TOKEN`): a local cluster is one operator's, and its functions
        reach the queue and every app's keyspaces."""
        if command not in ("scheduler", "worker") or self.admin_token is None:
            return None
        return {**os.environ, "LOOM_TOKEN": self.admin_token}

    def start_manager(
        self,
        name: str = "sm",
        *,
        port: int = 0,
        etcd: str | None = None,
        data: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> int:
        """A shard manager with a file metastore (in `data`, default DATA/NAME), or
        (`etcd`: HOST:PORT,…) one of several sharing etcd, one of which leads."""
        store = ["--etcd", etcd] if etcd else ["--data", str(data or self.data_dir / name)]
        auth = ["--auth"] if self.auth else []
        where = ["--region", self.manager_region] if self.manager_region else []
        where += ["--latency", self.latency] if self.latency else []
        args = ["sm", "--listen", f"127.0.0.1:{port}", *store, *auth, *where, *extra]
        port = self._spawn(name, args)
        if name not in self.managers:
            self.managers.append(name)
        if self.auth:
            self._read_admin_token(name)
        return port

    def _read_admin_token(self, name: str) -> None:
        """`loom sm --auth` prints one more line: the admin token on the first start."""
        stdout = self.processes[name].stdout
        assert stdout is not None
        line = stdout.readline()
        match = ADMIN_TOKEN.search(line)
        if match is not None:
            self.admin_token = match.group(1)

    def start_node(
        self,
        name: str,
        *,
        port: int = 0,
        region: str = "",
        zone: str = "",
        tier: str = "",
        data: Path | None = None,
    ) -> int:
        args = [
            "node", "--id", name, "--listen", f"127.0.0.1:{port}",
            "--sm", self.manager_address,
            "--data", str(data or self.data_dir / name),
            "--lease-ms", str(self.lease_ms),
            *(["--auth"] if self.auth else []),
            *self.node_args,
        ]  # fmt: skip
        if region:
            args += ["--region", region]
        if zone:
            args += ["--zone", zone]
        if self.latency:
            args += ["--latency", self.latency]
        if tier:
            args += ["--tier", tier]
        return self._spawn(name, args)

    def start_worker(self, name: str, target: str, *, concurrency: int = 16) -> None:
        """`loom worker TARGET` (MODULE:APP, importable from the current directory)."""
        args = ["worker", target, "-c", self.manager_address, "--concurrency", str(concurrency)]
        self._spawn(name, args, ready=WORKING)

    def start_scheduler(self, name: str) -> int:
        """`loom scheduler`: dispatches due function calls to workers."""
        return self._spawn(name, ["scheduler", "-c", self.manager_address, "--port", "0"])

    def restart(self, name: str) -> int:
        """Starts a stopped or killed process again with its arguments (same data)."""
        assert name not in self.processes, f"{name} is running"
        ready = WORKING if self.commands[name][0] == "worker" else LISTENING
        port = self._spawn(name, self.commands[name], ready=ready)
        if name in self.managers and self.auth:
            self._read_admin_token(name)
        return port

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def kill(self, name: str) -> None:
        """SIGKILL: the process gets no chance to flush or say goodbye."""
        proc = self.processes.pop(name)
        self.ports.pop(name, None)  # workers listen nowhere
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)
        _close(proc)

    def pause(self, name: str) -> None:
        """SIGSTOP: a gray failure — the process holds its sockets but does nothing."""
        self.processes[name].send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGCONT)

    def stop(self, names: list[str] | None = None) -> None:
        """SIGTERM (after SIGCONT, in case it is paused), then SIGKILL after a timeout.
        Users of the store stop before it: workers and schedulers, then nodes, then the
        managers, so a scheduler can still hand its partitions back (stopped together,
        each waited out its kv timeout against a cluster already gone)."""
        chosen = list(self.processes) if names is None else names
        for rank in sorted({self._stop_rank(name) for name in chosen}):
            self._stop_together([name for name in chosen if self._stop_rank(name) == rank])

    def _stop_rank(self, name: str) -> int:
        if name in self.managers:
            return 2
        role = self.commands.get(name, ["node"])[0]
        return 0 if role in ("worker", "scheduler") else 1

    def _stop_together(self, names: list[str]) -> None:
        for name in names:
            proc = self.processes[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.send_signal(signal.SIGTERM)
        for name in names:
            proc = self.processes.pop(name)
            self.ports.pop(name, None)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _close(proc)

    def exited(self) -> list[str]:
        """Processes that ended without being stopped by us."""
        return [name for name, proc in self.processes.items() if proc.poll() is not None]


def _close(proc: subprocess.Popen[str]) -> None:
    if proc.stdout is not None:
        proc.stdout.close()
